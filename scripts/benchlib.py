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
