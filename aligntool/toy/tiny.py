"""The built-in tiny model: a ~1 M-parameter Llama with a byte-level BPE tokenizer trained on the toy corpus.

``tiny_model_path()`` builds it on first use (deterministically, about a minute on 2 CPU cores) and caches it under
``$ALIGNTOOL_CACHE/tiny-v<N>`` (default ``~/.cache/aligntool``). The folder is an ordinary transformers checkpoint
(safetensors + tokenizer with a chat template), so every code path that loads a hub model loads it too.

``tiny_arith_model_path()`` (the built-in name ``tiny-arith``) is the tiny model fine-tuned on the toy addition task
(``aligntool.toy.arith``; train split only) with the same loop, cross-entropy on the answer tokens only:
``-sum_t log p(y_t | question, y_<t)`` over the answer and EOS. ``ARITH_SFT`` is tuned so that it solves some held-out
questions and leaves headroom for RL on the verifiable reward: greedy accuracy 0.26 +- 0.03 on all 306 held-out
questions, sampled (T = 1) accuracy 0.18 +- 0.01, pass@8 0.68 +- 0.03. Cached as ``tiny-arith-v<N>.<M>``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from pathlib import Path

from aligntool.toy import world

BUILD_VERSION = 1  # bump when anything below changes what is built
SPECIAL_TOKENS = ["<|pad|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
MODEL_SHAPE = dict(
    hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
    max_position_embeddings=256, tie_word_embeddings=True,
)
VOCAB_SIZE = 640
PRETRAIN = dict(documents=24_000, steps=500, batch_size=48, learning_rate=3e-3, warmup=50, seed=0)
ARITH_BUILD_VERSION = 1  # bump when ARITH_SFT or build_tiny_arith_model changes what tiny-arith is
ARITH_SFT = dict(steps=400, batch_size=128, learning_rate=3e-3, warmup=30, seed=0)


def cache_dir() -> Path:
    return Path(os.environ.get("ALIGNTOOL_CACHE", Path.home() / ".cache" / "aligntool")).expanduser()


@contextlib.contextmanager
def build_lock(target: Path, log=lambda message: None):
    """One builder at a time for ``target``: a second process (another test worker, a second run started at once)
    waits for the first instead of building a copy beside it -- two builds on a small machine oversubscribe its cores
    and both take many times longer. An flock: released when its holder dies, so a killed build never blocks."""
    import fcntl

    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"waiting for another process that is building {target} ...")
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def tiny_model_path(log=print) -> Path:
    """Path of the built tiny model, building it first if the cache does not hold it yet."""
    return cached_build(cache_dir() / f"tiny-v{BUILD_VERSION}", "the built-in tiny model", "about a minute",
                        build_tiny_model, log)


def tiny_arith_model_path(log=print) -> Path:
    """Path of ``tiny-arith`` (the tiny model fine-tuned on toy addition, ``build_tiny_arith_model``), building it
    (and the tiny model it starts from) first if the cache does not hold it yet."""
    base = tiny_model_path(log=log)
    return cached_build(cache_dir() / f"tiny-arith-v{BUILD_VERSION}.{ARITH_BUILD_VERSION}", "the tiny-arith model",
                        "under a minute", lambda out, progress: build_tiny_arith_model(out, base, progress=progress),
                        log)


def cached_build(target: Path, what: str, duration: str, build, log=print) -> Path:
    """``target``, built by ``build(folder, progress=...)`` first if it holds no model yet: one builder at a time
    (``build_lock``), into a temporary folder renamed into place when done (a killed build leaves nothing behind)."""
    if (target / "model.safetensors").is_file():
        return target
    with build_lock(target, log):
        if (target / "model.safetensors").is_file():  # built by another process while this one waited
            return target
        if target.exists():  # a folder without weights (copied in half, or from an older layout): built anew
            log(f"note: {target} holds no model.safetensors; rebuilding it")
            shutil.rmtree(target)
        stem = target.name.rsplit("-v", 1)[0]  # .tiny-build-*, .tiny-arith-build-*
        for stale in target.parent.glob(f".{stem}-build-*"):  # left by a killed build (we hold the lock)
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{stem}-build-", dir=target.parent))
        tmp.chmod(0o755)  # mkdtemp's 0700 would keep a shared ALIGNTOOL_CACHE from other users
        try:
            log(f"Building {what} into {target} (once; {duration})...")
            start = time.time()
            with build_threads(log), stop_on_sigterm():
                build(tmp, progress=True)
            try:
                os.rename(tmp, target)  # atomic: a concurrent builder that lost the race just uses the winner's copy
            except OSError:
                if not (target / "model.safetensors").is_file():
                    raise
            log(f"Built {what} in {time.time() - start:.0f}s.")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


@contextlib.contextmanager
def stop_on_sigterm():
    """SIGTERM ends a build at once, cleaning up its temporary folder (a run's preemption handler, which only asks
    for a checkpoint at the next step end, would otherwise keep it building for minutes)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def build_threads(log=print):
    """torch threads for a build on a busy machine: one per idle core when the machine is already loaded (torch's
    default of one thread per core oversubscribes it: a single thread was 9x faster on a loaded 2-core machine).
    OMP_NUM_THREADS, when set, decides instead."""
    import torch

    before = torch.get_num_threads()
    cores = os.cpu_count() or 1
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    threads = before
    if "OMP_NUM_THREADS" not in os.environ and load >= cores - 0.5:
        threads = max(1, cores - round(load))
        log(f"the machine is busy (load {load:.1f} on {cores} cores): building with {threads} torch thread(s); "
            "set OMP_NUM_THREADS to choose")
    torch.set_num_threads(threads)
    try:
        yield threads
    finally:
        torch.set_num_threads(before)


def train_tokenizer(texts: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<|pad|>", eos_token="<|end|>",
        model_max_length=MODEL_SHAPE["max_position_embeddings"],
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_tiny_model(out: Path, progress: bool = False) -> None:
    """Train the tokenizer, pretrain the model on the toy corpus, save both to ``out``."""
    cfg = PRETRAIN
    docs = [p + c for p, c in world.corpus(cfg["documents"], seed=cfg["seed"])]
    tokenizer = train_tokenizer(docs + world.all_prompts())
    pretrain(tokenizer, MODEL_SHAPE, cfg, out, docs, progress=progress)


def pretrain(tokenizer, shape: dict, cfg: dict, out: Path, docs: list[str] | None = None, log=None,
             progress: bool = False):
    """A Llama of ``shape`` pretrained on the toy corpus with ``tokenizer`` (AdamW, warmup then linear decay)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(cfg["seed"])
    if docs is None:
        docs = [p + c for p, c in world.corpus(cfg["documents"], seed=cfg["seed"])]
    eos = tokenizer.eos_token_id
    encoded = [ids + [eos] for ids in tokenizer(docs, add_special_tokens=False)["input_ids"]]

    config = LlamaConfig(
        vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, eos_token_id=eos, bos_token_id=None, **shape
    )
    model = LlamaForCausalLM(config)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["learning_rate"], weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / cfg["warmup"]) * max(0.05, 1 - s / cfg["steps"])
    )
    gen = torch.Generator().manual_seed(cfg["seed"])
    model.train()
    from tqdm.auto import tqdm

    for step in tqdm(range(cfg["steps"]), desc="pretraining the tiny model", disable=not progress, mininterval=2):
        idx = torch.randint(len(encoded), (cfg["batch_size"],), generator=gen).tolist()
        batch = [encoded[i] for i in idx]
        width = max(map(len, batch))
        ids = torch.full((len(batch), width), tokenizer.pad_token_id)
        mask = torch.zeros_like(ids)
        for row, seq in enumerate(batch):
            ids[row, : len(seq)] = torch.tensor(seq)
            mask[row, : len(seq)] = 1
        loss = lm_step(model, opt, sched, ids, mask, ids.masked_fill(mask == 0, -100))
        if log and (step + 1) % 50 == 0:
            log(f"pretrain step {step + 1}/{cfg['steps']}: loss {loss.item():.3f}")
    model.eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = eos
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def lm_step(model, opt, sched, ids, mask, labels):
    """One pretraining step (the tiny model's, and the optimizer benchmark's): next-token loss, backward, gradient
    norm clipped to 1, optimizer and schedule step. Returns the loss."""
    import torch

    loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    return loss


def toy_model_path(hidden: int, layers: int, steps: int = 300, log=print) -> Path:
    """A larger toy model built the way the tiny one is (its tokenizer, the toy corpus, the same optimiser and
    schedule; ``hidden`` wide, ``layers`` deep, head size 32), cached beside it. hidden 512 x 8 layers is 27.6 M
    parameters and takes about 10 minutes on 2 CPU cores."""
    from transformers import AutoTokenizer

    target = cache_dir() / f"toy-h{hidden}-l{layers}-s{steps}-v{BUILD_VERSION}"
    if (target / "model.safetensors").is_file():
        return target
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path(log=log))
    shape = dict(MODEL_SHAPE, hidden_size=hidden, intermediate_size=3 * hidden, num_hidden_layers=layers,
                 num_attention_heads=hidden // 32, num_key_value_heads=hidden // 32)
    cfg = dict(PRETRAIN, steps=steps, learning_rate=1e-3, batch_size=32)
    tmp = Path(tempfile.mkdtemp(prefix=".toy-build-", dir=target.parent))
    try:
        log(f"Building a {hidden}x{layers} toy model into {target} (once)...")
        pretrain(tokenizer, shape, cfg, tmp, log=log)
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "model.safetensors").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def widened_copy(path: str, hidden: int, layers: int, out: str) -> str:
    """A random-init Llama with ``path``'s tokenizer and vocabulary, ``hidden`` wide and ``layers`` deep (head size
    kept), saved to ``out`` -- for benchmarks where the tiny model's memory would be dwarfed by the runtime's."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    cfg = AutoConfig.from_pretrained(path)
    cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers = hidden, 3 * hidden, layers
    cfg.num_attention_heads = cfg.num_key_value_heads = hidden // cfg.head_dim
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(path).save_pretrained(out)
    print(f"model: random-init {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters "
          f"(hidden {hidden}, {layers} layers)")
    return out


def build_tiny_arith_model(out: Path, base: Path, cfg: dict = ARITH_SFT, progress: bool = False, log=None) -> None:
    """``tiny-arith``: the tiny model at ``base`` fine-tuned on toy addition (``arith.sft_rows`` of the train split,
    never a held-out question: ``steps x batch_size`` rows, cycling through the split in a seeded order), with the
    pretraining loop (``lm_step``, AdamW, warmup then linear decay) and the loss on the answer tokens only (the
    answer and EOS, not the question). Prompt and answer are tokenised apart and concatenated, as a sampler sees
    them (the prompt's tokens, then generated ones). Saved to ``out`` with the base's tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from aligntool.toy import arith

    torch.manual_seed(cfg["seed"])
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    rows = arith.sft_rows(cfg["steps"] * cfg["batch_size"], seed=cfg["seed"], split="train")
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    prompt_ids = tokenizer([r["prompt"] for r in rows], add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer([r["completion"] for r in rows], add_special_tokens=False)["input_ids"]
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["learning_rate"], weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / cfg["warmup"]) * max(0.05, 1 - s / cfg["steps"])
    )
    model.train()
    from tqdm.auto import tqdm

    for step in tqdm(range(cfg["steps"]), desc="fine-tuning tiny-arith", disable=not progress, mininterval=2):
        batch = range(step * cfg["batch_size"], (step + 1) * cfg["batch_size"])
        seqs = [(prompt_ids[i], answer_ids[i] + [eos]) for i in batch]
        width = max(len(p) + len(a) for p, a in seqs)
        ids = torch.full((len(seqs), width), pad)
        mask = torch.zeros_like(ids)
        labels = torch.full_like(ids, -100)
        for row, (p, a) in enumerate(seqs):
            ids[row, : len(p) + len(a)] = torch.tensor(p + a)
            mask[row, : len(p) + len(a)] = 1
            labels[row, len(p) : len(p) + len(a)] = torch.tensor(a)
        loss = lm_step(model, opt, sched, ids, mask, labels)
        if log and (step + 1) % 50 == 0:
            log(f"tiny-arith step {step + 1}/{cfg['steps']}: loss {loss.item():.3f}")
    model.eval()
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
