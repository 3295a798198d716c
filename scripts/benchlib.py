"""Shared by the benchmark scripts: run one side in a fresh process, so the sides never share memory or caches."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile


def run_worker(script: str, side: str, *args: str) -> dict:
    """``python SCRIPT --worker SIDE --out TMP ARGS...``; the worker prints its result as the last line, in JSON."""
    with tempfile.TemporaryDirectory() as out:
        proc = subprocess.run([sys.executable, script, "--worker", side, "--out", out, *args], capture_output=True,
                              text=True)
        if proc.returncode != 0:
            sys.exit(f"{side} run failed:\n{proc.stderr[-3000:]}")
        return json.loads(proc.stdout.strip().splitlines()[-1])


def add_online_arguments(ap, batch_help: str = "prompts per iteration") -> None:
    """The arguments every online-RL benchmark shares: iterations, batch, new tokens, repeats and the model (the tiny
    model, a folder, or a widened random-init copy of the tiny model)."""
    ap.add_argument("--iterations", type=int, default=12)
    ap.add_argument("--batch-size", type=int, default=32, help=batch_help)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--hidden-size", type=int, help="benchmark a random-init copy of the tiny model widened to this "
                    "hidden size (512 with --layers 8: 27.6 M parameters), so that model memory is not dwarfed by "
                    "the runtime's")
    ap.add_argument("--layers", type=int, default=8, help="layers of the --hidden-size model")


def online_parser(doc: str, batch_help: str, sides):
    """The parser of an online-RL benchmark against TRL: described by ``doc``'s first line, with
    ``add_online_arguments`` and the hidden ``--worker SIDE`` / ``--out`` options of its worker processes."""
    import argparse

    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    add_online_arguments(ap, batch_help)
    ap.add_argument("--worker", choices=list(sides), help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    return ap


def parse_online(ap, warmup: int):
    """``ap.parse_args()``, refusing fewer iterations than ``warmup`` + 1 (none would be timed)."""
    a = ap.parse_args()
    if a.iterations <= warmup:
        ap.error(f"--iterations must be more than the {warmup} warm-up iterations")
    return a


def run_on_benchmark_model(a, compare) -> None:
    """Build the model first (outside the timed runs): ``a.model`` itself, or with ``--hidden-size`` a random-init
    copy of it widened to that size (kept for the duration of ``compare(a)``); then run ``compare(a)``."""
    from aligntool import models

    models.resolve(a.model)
    with tempfile.TemporaryDirectory() as scaled:
        if a.hidden_size:
            from aligntool.toy.tiny import widened_copy

            a.label = f"{a.model} widened to hidden {a.hidden_size}, {a.layers} layers (random init)"
            a.model = widened_copy(str(models.resolve(a.model)), a.hidden_size, a.layers, scaled)
        compare(a)


def rss_mb(field: str) -> float | None:
    """A /proc/self/status memory field (VmRSS, VmHWM) in MB; None where /proc is missing."""
    from pathlib import Path

    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


# ----------------------------------------------------------------- online-RL benchmarks against TRL (shared parts)
def memory_baseline() -> float | None:
    """The resident memory now, with the peak (VmHWM) reset to it through /proc/self/clear_refs (Linux >= 4.0), so
    that VmHWM - baseline is what the work after this call added; None where that is not possible."""
    from pathlib import Path

    baseline = rss_mb("VmRSS")
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return None
    return baseline


def engine_prompt_order(loaded, iterations: int, batch_size: int, seed: int) -> list[str]:
    """The prompts aligntool's online engine trains on, iteration after iteration (its own draw,
    Engine.batch_prompts, one process), so a TRL side can be fed the same batches through a sequential sampler."""
    from types import SimpleNamespace

    from aligntool import data
    from aligntool.online.engine import Engine

    train_set, _ = data.load_for_recipe(loaded.recipe, loaded.spec.data)
    fake = SimpleNamespace(args=SimpleNamespace(seed=seed), state={"iteration": 0}, batch_size=batch_size, world=1,
                           rank=0, prompts=list(dict.fromkeys(train_set["prompt"])))
    drawn = []
    for i in range(iterations):
        fake.state["iteration"] = i
        drawn += Engine.batch_prompts(fake)
    return drawn


def time_engine_iterations() -> tuple[list[float], list[int], list[float]]:
    """Patch aligntool's Engine to record, per iteration: its end time (``ends``, to be seeded with the start time by
    the caller), the tokens generated (every response of every ``Engine.samples`` call, greedy ones included, from
    the masks: through EOS) and the seconds spent generating."""
    import time

    from aligntool.online.engine import Engine

    ends: list[float] = []
    tokens: list[int] = []
    gen: list[float] = []
    inner_iteration, inner_samples = Engine._iteration, Engine.samples

    def iteration(self, *args, **kwargs):
        tokens.append(0)
        gen.append(0.0)
        result = inner_iteration(self, *args, **kwargs)
        ends.append(time.perf_counter())
        return result

    def samples(self, *args, **kwargs):
        t0 = time.perf_counter()
        rollouts = inner_samples(self, *args, **kwargs)
        if tokens:
            tokens[-1] += sum(int(ro.mask.sum()) for ro in rollouts)
            gen[-1] += time.perf_counter() - t0
        return rollouts

    Engine._iteration, Engine.samples = iteration, samples
    return ends, tokens, gen


def timing_summary(side: str, ends: list[float], tokens: list[int], gen: list[float], warmup: int,
                   baseline: float | None) -> dict:
    """Medians over the iterations after the first ``warmup``: seconds per iteration and of generation, seconds per
    generated token (their total time / their tokens), tokens per iteration; the peak memory training added (VmHWM -
    ``baseline``) and the process's peak (ru_maxrss)."""
    import resource
    import statistics

    peak = rss_mb("VmHWM") - baseline if baseline is not None else None
    iters = [t1 - t0 for t0, t1 in zip(ends, ends[1:])]
    if len(iters) != len(tokens):
        raise SystemExit(f"{side}: {len(iters)} timed iterations but {len(tokens)} generation counts")
    kept = slice(warmup, None) if len(iters) > warmup else slice(None)
    return {"iteration_s": statistics.median(iters[kept]), "generation_s": statistics.median(gen[kept]),
            "token_s": sum(iters[kept]) / sum(tokens[kept]),
            "tokens_per_iteration": sum(tokens[kept]) / len(tokens[kept]), "iterations": len(iters),
            "train_peak_mb": peak, "process_peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def alternate_runs(sides, repeats: int, run_side, width: int):
    """Run every side ``repeats`` times, in fresh processes (``run_side(side)``, a dict of ``timing_summary``),
    alternating the order (A B .., .. B A, ...) so that machine noise and drift hit all sides alike; print the table
    head, a row per run (with the load average before it) and then each side's medians. Returns ``med(side, key)``:
    the median of a figure over that side's runs (those where it is known), nan where none is."""
    import os
    import statistics

    print(f"{'run':>4} {'side':>{width}} {'load':>5} {'s/iter':>8} {'gen s':>6} {'ms/token':>9} {'tokens/iter':>12} "
          f"{'train +MB':>10} {'process peak MB':>16}")
    rows: dict[str, list[dict]] = {s: [] for s in sides}
    for i in range(repeats):
        for side in (sides if i % 2 == 0 else sides[::-1]):
            load1 = os.getloadavg()[0]
            r = run_side(side)
            rows[side].append(r)
            tp = f"{r['train_peak_mb']:.0f}" if r["train_peak_mb"] else "n/a"
            print(f"{i + 1:>4} {side:>{width}} {load1:>5.2f} {r['iteration_s']:>8.3f} {r['generation_s']:>6.3f} "
                  f"{1000 * r['token_s']:>9.3f} {r['tokens_per_iteration']:>12.0f} {tp:>10} "
                  f"{r['process_peak_mb']:>16.0f}", flush=True)

    def med(side: str, key: str) -> float:
        vals = [r[key] for r in rows[side] if r[key]]
        return statistics.median(vals) if vals else float("nan")

    for side in sides:
        print(f"median {side:>{width}}: {med(side, 'iteration_s'):.3f} s/iteration (generation "
              f"{med(side, 'generation_s'):.3f}), {1000 * med(side, 'token_s'):.3f} "
              f"ms/generated token, {med(side, 'tokens_per_iteration'):.0f} tokens/iteration, training peak "
              f"+{med(side, 'train_peak_mb'):.0f} MB, process peak {med(side, 'process_peak_mb'):.0f} MB")
    return med


def ratios(med, ours: str, theirs: str) -> dict:
    """``med(ours, key) / med(theirs, key)`` for every timed and memory figure (``med`` from ``alternate_runs``)."""
    return {k: med(ours, k) / med(theirs, k) for k in ("iteration_s", "generation_s", "token_s", "train_peak_mb",
                                                       "process_peak_mb")}


def memory_ratios_text(ratio: dict) -> str:
    """The end every ratio line shares: the training and process peak memory ratios (from ``ratios``)."""
    return f"training memory {ratio['train_peak_mb']:.3f}   process peak memory {ratio['process_peak_mb']:.3f}"


def print_end_load() -> None:
    import os

    load = os.getloadavg()
    print(f"load average at the end {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")


def time_trainer_iterations(make_trainer, count_tokens):
    """A TRL trainer timed like ``time_engine_iterations``: ``make_trainer(callback)`` builds it with that
    TrainerCallback (which records the start and every step's end in ``ends``); its ``_generate`` is wrapped to record
    the seconds it takes and ``count_tokens(its result)``. Returns the trainer, ends, tokens and generation seconds."""
    import time

    from transformers import TrainerCallback

    ends: list[float] = []
    tokens: list[int] = []
    gen: list[float] = []

    class IterationEnds(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            ends.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kw):
            ends.append(time.perf_counter())

    trainer = make_trainer(IterationEnds())
    inner_generate = trainer._generate

    def generate(*args, **kwargs):
        t0 = time.perf_counter()
        result = inner_generate(*args, **kwargs)
        gen.append(time.perf_counter() - t0)
        tokens.append(count_tokens(result))
        return result

    trainer._generate = generate
    return trainer, ends, tokens, gen


def timed_worker(side: str, a, import_libraries, work, warmup: int) -> dict:
    """One side's run in its worker process: ``import_libraries()``, ``a.threads`` torch threads (0: torch's
    default), the model ``a.model`` resolved, the memory baseline taken, then ``work()`` (-> ends, tokens, generation
    seconds) and its ``timing_summary``."""
    import os

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    import_libraries()
    if a.threads:
        import torch

        torch.set_num_threads(a.threads)
    from aligntool import models

    models.resolve(a.model)
    baseline = memory_baseline()
    ends, tokens, gen = work()
    return timing_summary(side, ends, tokens, gen, warmup, baseline)


# ----------------------------------------------------------------- model FLOP/s as a fraction of the matmul peak
FLOPS_NOTE = ("model FLOPs: 2N per token forward, 6N forward + backward, N = the parameters that take part in a "
              "matmul per token (all but the input embedding lookup; the output head counted once, tied or not), the "
              "attention score term (2 n_layer n_ctx d per token) left out: Kaplan et al. 2020, Table 1 / eq. 2.2; "
              "PaLM (Chowdhery et al. 2022), appendix B")
_PEAKS: dict = {}


def matmul_params(model) -> int:
    """N of ``FLOPS_NOTE``: the model's parameters less its input embedding matrix, plus its output head once (with
    tied embeddings the head is the embedding matrix, used as a matmul on every token)."""
    embed, head = model.get_input_embeddings().weight, model.get_output_embeddings()
    n = sum(p.numel() for p in model.parameters()) - embed.numel()
    if head is not None and head.weight is embed:  # tied: the head's matmul uses the embedding matrix
        n += embed.numel()
    return n


def matmul_peak_flops(dtype: str = "float32", device: str | None = None, size: int | None = None,
                      repeats: int = 20, again: bool = False) -> float:
    """This machine's measured matmul peak in FLOP/s: the best of ``repeats`` timed ``torch.matmul`` of two square
    ``size`` x ``size`` matrices in ``dtype`` (2 size^3 FLOPs each), after one untimed warm-up; on CUDA when
    available (the card's, synchronised), else on the CPU with torch's threads. Many short products: on a shared
    machine the best of them is the one that ran alone. Measured once per process and (dtype, device, size);
    ``again``: measure once more and keep the best of all (call it after the timed runs: a peak measured in a busy
    moment would put a run above 100%)."""
    import time

    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    size = size or (8192 if device.startswith("cuda") else 1024)
    key = (dtype, device, size)
    if key not in _PEAKS or again:
        a = torch.randn(size, size, device=device).to(getattr(torch, dtype))
        b = torch.randn(size, size, device=device).to(a.dtype)
        sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
        best = float("inf")
        for i in range(repeats + 1):
            sync()
            t0 = time.perf_counter()
            torch.matmul(a, b)
            sync()
            if i:  # the first is the warm-up
                best = min(best, time.perf_counter() - t0)
        _PEAKS[key] = max(_PEAKS.get(key, 0.0), 2 * size**3 / best)
    return _PEAKS[key]


def flops_text(flops: float, seconds: float, peak: float) -> str:
    """'achieved X GFLOP/s = Y% of measured matmul peak Z GFLOP/s' for ``flops`` model FLOPs in ``seconds``."""
    achieved = flops / seconds
    return (f"achieved {achieved / 1e9:.2f} GFLOP/s = {100 * achieved / peak:.2f}% of measured matmul peak "
            f"{peak / 1e9:.1f} GFLOP/s")


def model_matmul_params(path: str) -> int:
    """``matmul_params`` of the model at ``path`` (a folder, or a built-in name such as tiny), built from its config
    on the meta device (no weights)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from aligntool import models

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(models.resolve(path))))
    return matmul_params(model)


def measured_peak(threads: int = 0, dtype: str = "float32") -> float:
    """``matmul_peak_flops`` with ``threads`` torch threads (0: torch's default), as the benchmark's runs use, measured
    once more (``again``) and kept at the best: benchmarks call it after their timed runs."""
    import torch

    if threads and not torch.cuda.is_available():
        torch.set_num_threads(threads)
    return matmul_peak_flops(dtype, again=True)


def print_generation_flops(med, sides, path: str, threads: int, dtype: str = "float32") -> None:
    """Per side, the generation phase's model FLOP/s (``med`` from ``alternate_runs``): forward only, 2N per
    generated token (tokens_per_iteration, greedy rows included) over the median generation seconds. The prompts'
    prefill is not counted (a lower bound); the other phases (scoring forwards, the update's forward + backward)
    are not in it."""
    n, peak = model_matmul_params(path), measured_peak(threads, dtype)
    print(f"{FLOPS_NOTE}; N = {n / 1e6:.1f} M")
    for side in sides:
        flops = 2 * n * med(side, "tokens_per_iteration")
        print(f"generation of {side} (forward only, prompt prefill not counted): "
              f"{flops_text(flops, med(side, 'generation_s'), peak)}")


def count_forward_tokens(model_class) -> dict:
    """Wrap ``model_class.forward`` to count the tokens of every forward (the input positions the attention mask
    keeps: with a KV cache only the new ones, e.g. one per row and step in generation): ``with_grad`` (those of a
    forward + backward: a training forward) and ``no_grad`` (forward only: reference log-probs, generation). Returns
    the live counters. Give the decoder body's class (LlamaModel, not LlamaForCausalLM): TRL's fused LM head
    replaces the causal LM's forward and calls the body directly. vLLM's own model is not counted."""

    import functools

    import torch

    counts = {"with_grad": 0, "no_grad": 0}
    inner = model_class.forward

    @functools.wraps(inner)
    def forward(self, *args, **kwargs):
        mask, ids = kwargs.get("attention_mask"), kwargs.get("input_ids", args[0] if args else None)
        ids = ids if ids is not None else kwargs.get("inputs_embeds")
        new = ids.shape[1] if ids is not None else 0  # positions this forward computes (the rest are cached)
        tokens = int(mask[:, -new:].sum()) if mask is not None and new else (ids.shape[:2].numel() if new else 0)
        counts["with_grad" if torch.is_grad_enabled() else "no_grad"] += tokens
        return inner(self, *args, **kwargs)

    model_class.forward = forward
    return counts


def training_flops(n: int, counts: dict) -> float:
    """Model FLOPs of ``count_forward_tokens``' counts: 6N per token of a forward with grad (forward + backward),
    2N per token of a forward without."""
    return 6 * n * counts["with_grad"] + 2 * n * counts["no_grad"]
