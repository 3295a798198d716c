"""HF ``model.generate`` vs vLLM: generated tokens/s on the same model, prompts and sampling settings.

Sides (each in a fresh subprocess, so they never share memory, caches or a GPU allocator):
- hf: aligntool's own HF path (``aligntool.sampling.generate_from_ids``: one left-padded batch through
  ``model.generate`` with the KV cache), the path the online methods take with ``generation.backend: hf``;
- vllm: ``vllm.LLM.generate`` on the same token ids (on a CPU: ``enforce_eager``, ``gpu_memory_utilization`` 0.2 and
  ``VLLM_CPU_KVCACHE_SPACE=1`` GiB unless set; on a GPU: ``gpu_memory_utilization`` 0.5, CUDA graphs).
Both sample at temperature 1, top_p 1, no top-k, up to ``--max-new-tokens`` per prompt, and stop at any of the model's
stop tokens (EOS, generation_config.json's list, the end of turn). The prompts are the toy world's training prompts
(what ``dataset.path: toy`` gives the online methods), tokenized as aligntool tokenizes them.

Measured per side: load time (weights + engine start), then ``--repeats`` timed calls on all prompts after one
untimed warm-up call; tokens = generated tokens without padding (the stop token counted, as both keep it). Prints each
side's median tokens/s, the ratio vLLM / HF, and each side's model FLOP/s (2N per generated token, forward only) as a
fraction of the measured matmul peak in the same dtype (scripts/benchlib.py; the card's on a GPU). Without an
importable vllm it says so in one line and reports HF only.

    python scripts/bench_generation.py [--model tiny | 27m | qwen2-0.5b | FOLDER] [--num-prompts 64]
                                       [--max-new-tokens 64] [--dtype auto] [--backends hf,vllm] [--repeats 3]
    python scripts/bench_generation.py --build-qwen2-0.5b FOLDER    # only build that model into FOLDER

``27m`` is bench_remax_vs_ppo.py's model (a random-init copy of the tiny model widened to hidden 512 x 8 layers, 27.6 M
parameters); ``qwen2-0.5b`` a random-init model with Qwen2-0.5B's shape (hidden 896, 24 layers, 14 query / 2 KV
heads, MLP 4864, tied embeddings, q/k/v biases) over the qwen2 test family's tokenizer (aligntool.toy.families), saved
in bf16: 0.36 B parameters, as the real model's body, whose 151,936-token vocabulary adds 0.14 B more.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BACKENDS = ("hf", "vllm")
QWEN2_05B = dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                 intermediate_size=4864, max_position_embeddings=4096, rope_theta=1_000_000.0,
                 tie_word_embeddings=True, rms_norm_eps=1e-6)


# ------------------------------------------------------------------------------------------------ models
def build_qwen2_05b(out: str | Path, layers: int | None = None) -> Path:
    """A random-init (seed 0) Qwen2-0.5B-shaped model, bf16 safetensors, with the qwen2 test family's tokenizer,
    chat template and generation_config.json copied beside it (``aligntool.toy.families``, built once and cached)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from aligntool.toy.families import family_model_path

    src = family_model_path("qwen2")
    fam = AutoConfig.from_pretrained(src)
    shape = dict(QWEN2_05B, num_hidden_layers=layers or QWEN2_05B["num_hidden_layers"])
    config = AutoConfig.for_model("qwen2", vocab_size=fam.vocab_size, bos_token_id=fam.bos_token_id,
                                  eos_token_id=fam.eos_token_id, pad_token_id=fam.pad_token_id, **shape)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):  # initialising 0.36 B parameters on a GPU takes a second, on 2 CPU cores ~30 s
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(out, safe_serialization=True)
    for f in src.iterdir():  # tokenizer files, chat template, generation_config.json (stop tokens)
        if f.is_file() and f.name not in ("config.json", "model.safetensors"):
            shutil.copy2(f, out / f.name)
    n = sum(p.numel() for p in model.parameters())
    print(f"model: random-init Qwen2-0.5B-shaped, {n / 1e6:.1f} M parameters (hidden {shape['hidden_size']}, "
          f"{shape['num_hidden_layers']} layers, vocab {config.vocab_size}), bf16, in {out} "
          f"({time.perf_counter() - t0:.0f} s)", flush=True)
    return out


def resolve_model(name: str, scratch: str) -> str:
    """tiny | 27m | qwen2-0.5b | a model folder -> a model folder (the built ones in ``scratch`` or the cache)."""
    from aligntool.toy.tiny import tiny_model_path, widened_copy

    if name == "tiny":
        return str(tiny_model_path())
    if name == "27m":  # as bench_remax_vs_ppo.py --hidden-size 512 --layers 8
        return widened_copy(str(tiny_model_path()), 512, 8, scratch)
    if name == "qwen2-0.5b":
        return str(build_qwen2_05b(scratch))
    if not (Path(name) / "config.json").is_file():
        sys.exit(f"--model {name}: expected tiny, 27m, qwen2-0.5b or a local model folder (no downloads)")
    return name


def parameters_m(folder: str) -> float:
    from safetensors import safe_open

    total = 0
    for f in Path(folder).glob("*.safetensors"):
        with safe_open(str(f), "pt") as fh:
            for k in fh.keys():
                n = 1
                for d in fh.get_slice(k).get_shape():
                    n *= d
                total += n
    return total / 1e6


# ------------------------------------------------------------------------------------------------ workers
def _prompts(folder: str, n: int):
    """(token ids per prompt, stop ids, pad id) of the toy world's first ``n`` training prompts."""
    from transformers import AutoTokenizer

    from aligntool.tokens import encode_prompts, ensure_pad, stop_ids
    from aligntool.toy import world

    tok = AutoTokenizer.from_pretrained(folder)
    ensure_pad(tok, log=lambda m: None)
    return encode_prompts(tok, world.prompts("train", n, seed=0)), stop_ids(tok), tok.pad_token_id


def _dtype(name: str, cuda: bool) -> str:
    return ("bfloat16" if cuda else "float32") if name == "auto" else name


def worker_hf(a) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from aligntool.sampling import generate_from_ids

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    ids, stops, pad = _prompts(a.model, a.num_prompts)
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=getattr(torch, _dtype(a.dtype, cuda))).to(device)
    model.eval()
    load_s = time.perf_counter() - t0

    def call(seed: int) -> list[list[int]]:
        torch.manual_seed(seed)
        return generate_from_ids(model, ids, pad, stops, a.max_new_tokens, temperature=1.0, top_p=1.0,
                                 empty_as_stop=False)

    call(1000)  # warm-up: kernels, allocator, caches
    times, lengths = [], []
    for r in range(a.repeats):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        rows = call(r)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        lengths += [len(row) for row in rows]
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else None
    return _result(times, lengths, a, load_s, peak_mb=peak)


def worker_vllm(a) -> dict:
    import torch

    cuda = torch.cuda.is_available()
    if not cuda:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache; the CPU default is far larger
    from vllm import LLM, SamplingParams

    ids, stops, _ = _prompts(a.model, a.num_prompts)
    from transformers import AutoConfig

    limit = getattr(AutoConfig.from_pretrained(a.model), "max_position_embeddings", None) or 4096
    max_len = min(limit, max(map(len, ids)) + a.max_new_tokens + 8)
    t0 = time.perf_counter()
    llm = LLM(model=a.model, dtype=_dtype(a.dtype, cuda), gpu_memory_utilization=0.5 if cuda else 0.2,
              enforce_eager=not cuda, max_model_len=max_len, seed=0)
    load_s = time.perf_counter() - t0
    params = SamplingParams(n=1, temperature=1.0, top_p=1.0, top_k=0, max_tokens=a.max_new_tokens,
                            stop_token_ids=stops)
    prompts = [{"prompt_token_ids": p} for p in ids]

    def call() -> list[list[int]]:
        outs = llm.generate(prompts, params, use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outs]

    call()  # warm-up
    times, lengths = [], []
    for _ in range(a.repeats):
        t0 = time.perf_counter()
        rows = call()
        times.append(time.perf_counter() - t0)
        lengths += [len(row) for row in rows]
    return _result(times, lengths, a, load_s)


def _result(times: list[float], lengths: list[int], a, load_s: float, **extra) -> dict:
    tokens = sum(lengths) / a.repeats  # per call
    return {"load_s": load_s, "call_s": statistics.median(times), "tokens_per_call": tokens,
            "tokens_per_s": statistics.median(tokens / t for t in times), "mean_length": sum(lengths) / len(lengths),
            "at_max": sum(n >= a.max_new_tokens for n in lengths) / len(lengths), **extra}


def run_side(side: str, a) -> dict | None:
    """``python THIS --worker SIDE ...`` in a fresh process (its own session); the worker writes its result to a file
    (vLLM logs to stdout, also at exit). Whatever the worker leaves behind (vLLM's engine-core process, say) is killed
    with its process group. None, with the log's tail printed, when it failed or ran past ``--timeout``."""
    import signal

    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, __file__, "--worker", side, "--out", out, "--model", a.model, "--num-prompts",
               str(a.num_prompts), "--max-new-tokens", str(a.max_new_tokens), "--dtype", a.dtype, "--repeats",
               str(a.repeats)]
        log = Path(out, "log.txt")
        with log.open("w") as fh:
            proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
            try:
                rc = proc.wait(timeout=a.timeout)
            except subprocess.TimeoutExpired:
                rc = f"timeout after {a.timeout} s"
            finally:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait()
        result = Path(out, "result.json")
        if not result.is_file():
            print(f"{side}: run failed (exit {rc}):\n{log.read_text(errors='replace')[-2500:]}", flush=True)
            return None
        return json.loads(result.read_text())


# ------------------------------------------------------------------------------------------------ main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny", help="tiny, 27m, qwen2-0.5b, or a local model folder")
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                    help="auto: bfloat16 on a GPU, float32 on a CPU")
    ap.add_argument("--backends", default="hf,vllm", help="comma-separated: hf, vllm")
    ap.add_argument("--repeats", type=int, default=3, help="timed calls per side, after one warm-up call")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per side (load, warm-up and timed calls)")
    ap.add_argument("--json", help="also write the results to this JSON file")
    ap.add_argument("--build-qwen2-0.5b", dest="build", metavar="FOLDER",
                    help="only build the random-init Qwen2-0.5B-shaped model into FOLDER and exit")
    ap.add_argument("--layers", type=int, help="layers of the --build-qwen2-0.5b model (default 24)")
    ap.add_argument("--worker", choices=BACKENDS, help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.build:
        build_qwen2_05b(a.build, a.layers)
        return
    if a.worker:
        result = (worker_hf if a.worker == "hf" else worker_vllm)(a)
        Path(a.out, "result.json").write_text(json.dumps(result))
        return
    backends = [b.strip() for b in a.backends.split(",") if b.strip()]
    if unknown := set(backends) - set(BACKENDS):
        sys.exit(f"--backends: unknown {', '.join(sorted(unknown))} (expected hf, vllm)")
    if "vllm" in backends and importlib.util.find_spec("vllm") is None:
        print(f"vLLM: not importable in this Python ({sys.executable}); reporting HF only")
        backends.remove("vllm")
    with tempfile.TemporaryDirectory() as scratch:
        label = a.model
        a.model = resolve_model(a.model, scratch)
        sys.exit(compare(a, label, backends))


def compare(a, label: str, backends: list[str]) -> int:
    import torch

    cuda = torch.cuda.is_available()
    device = torch.cuda.get_device_name(0) if cuda else \
        f"CPU ({os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}: a busy CPU slows HF's torch threads most)"
    print(f"generation, model {label} ({parameters_m(a.model):.1f} M parameters, {_dtype(a.dtype, cuda)}), "
          f"{a.num_prompts} toy prompts, up to {a.max_new_tokens} new tokens, temperature 1, top_p 1, stop at EOS; "
          f"{device}; median of {a.repeats} calls after a warm-up", flush=True)
    print(f"{'backend':>8} {'load s':>7} {'s/call':>8} {'tokens/call':>12} {'tokens/s':>10} {'mean len':>9} "
          f"{'at max':>7}", flush=True)
    rows, failed = {}, []
    for side in backends:
        r = run_side(side, a)
        if r is None:
            failed.append(side)
            continue
        rows[side] = r
        print(f"{side:>8} {r['load_s']:>7.1f} {r['call_s']:>8.3f} {r['tokens_per_call']:>12.0f} "
              f"{r['tokens_per_s']:>10.0f} {r['mean_length']:>9.1f} {r['at_max']:>7.0%}", flush=True)
    if "hf" in rows and "vllm" in rows:
        print(f"vLLM/HF tokens/s {rows['vllm']['tokens_per_s'] / rows['hf']['tokens_per_s']:.2f}")
    if rows:
        import benchlib

        n, peak = benchlib.model_matmul_params(a.model), benchlib.matmul_peak_flops(_dtype(a.dtype, cuda), again=True)
        print(f"{benchlib.FLOPS_NOTE}; N = {n / 1e6:.1f} M")
        for side, r in rows.items():  # forward only; the prompts' prefill is not counted (a lower bound)
            r.update(model_flops_per_s=2 * n * r["tokens_per_s"], matmul_peak_flops_per_s=peak)
            r["peak_fraction"] = r["model_flops_per_s"] / peak
            print(f"{side} generation (forward only, prefill not counted): "
                  f"{benchlib.flops_text(r['model_flops_per_s'], 1.0, peak)}")
    if a.json:
        Path(a.json).write_text(json.dumps({"model": label, "folder": a.model, "device": device,
                                            "num_prompts": a.num_prompts, "max_new_tokens": a.max_new_tokens,
                                            "results": rows, "failed": failed}, indent=2) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    main()
