"""Asynchronous vs synchronous generation on aligntool's rollout engine: time per iteration and the reward curve.

Both sides run the same method (``--method``, default reinforce_pp), model, prompts, seeds, batch, response length
and iterations; the asynchronous side sets ``generation.asynchronous: true`` (iteration t + 1's rollout sampled from a
copy of the policy of iteration t in a background thread while iteration t's update runs, with the truncated
importance-sampling correction: aligntool/online/asynchronous.py). Each side runs in a fresh process (sides alternate
over ``--repeats``), and times every iteration (rollout + reward + update; the first ``--warmup`` (2), which warm
the caches and of which the first is synchronous on both sides, are left out). Prints per iteration the mean reward
of each side (the reward curve), then seconds per iteration (median, mean), the ratio of the medians async / sync,
the mean reward over the last half of the iterations, the mean response length, and the asynchronous side's mean
importance weight and share of capped tokens.

On a CPU the two threads share the cores: the overlap pays only where generation leaves cores idle (small batches,
or more cores than one torch op uses); run it alone on a quiet machine.

    python scripts/bench_async_rollout.py [--method reinforce_pp] [--iterations 12] [--batch-size 32]
                                          [--max-new-tokens 48] [--repeats 2] [--learning-rate 1e-4] [--warmup 2]
                                          [--threads 0] [--quick]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

SIDES = ("sync", "async")


def worker(args) -> dict:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from aligntool import data, models
    from aligntool.online.engine import Engine
    from aligntool.recipe.loader import load_recipe
    from aligntool.train import Run

    overrides = [f"output_dir={args.out}", f"train.max_steps={args.iterations}", "train.logging_steps=1000",
                 f"train.per_device_train_batch_size={args.batch_size}", f"algo.max_new_tokens={args.max_new_tokens}",
                 f"train.learning_rate={args.learning_rate}", "train.save_steps=100000", "dataset.toy.size=512",
                 f"generation.asynchronous={'true' if args.worker == 'async' else 'false'}"]
    loaded = load_recipe(args.method, overrides)
    run = Run(loaded, Path(args.out))
    run.model_path = models.resolve("tiny")
    run.tokenizer = models.load_tokenizer(run.model_path)
    run.train_dataset, run.eval_dataset = data.load_for_recipe(loaded.recipe, loaded.spec.data)
    engine = Engine(run, loaded.spec.load().method(run))
    seconds, rows = [], []
    for _ in range(args.iterations):
        start = time.perf_counter()
        rows.append(engine._iteration())
        seconds.append(time.perf_counter() - start)
    if engine.asynchronous is not None:
        engine.asynchronous.close()
    tis = [r["tis/weight_mean"] for r in rows if "tis/weight_mean" in r]
    capped = [r["tis/capped_ratio"] for r in rows if "tis/capped_ratio" in r]
    return {"seconds": seconds, "reward": [r["reward"] for r in rows],
            "length": statistics.mean(r["completions/mean_length"] for r in rows),
            "tis_weight_mean": statistics.mean(tis) if tis else None,
            "tis_capped_ratio": statistics.mean(capped) if capped else None}


def main() -> None:
    from benchlib import run_worker

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", default="reinforce_pp", choices=("reinforce_pp", "remax", "ppo", "p3o"))
    ap.add_argument("--iterations", type=int, default=12)
    ap.add_argument("--batch-size", type=int, default=32, help="prompts per iteration")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--learning-rate", type=float, default=1e-4)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=2, help="first iterations left out of the timing")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads in each side (0: torch's "
                    "default, one per core). On a loaded machine the default's OpenMP waits inflate the synchronous "
                    "side's time (measured: 10x, gone with --threads 1): compare both")
    ap.add_argument("--quick", action="store_true", help="5 iterations, batch 8, 16 new tokens, 1 repeat")
    ap.add_argument("--worker", choices=SIDES, help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.quick:
        args.iterations, args.batch_size, args.max_new_tokens, args.repeats = 5, 8, 16, 1
    if args.iterations <= args.warmup:
        ap.error(f"--iterations must exceed --warmup ({args.warmup})")
    if args.worker:
        print(json.dumps(worker(args)))
        return
    passed = [f"--{k.replace('_', '-')}={getattr(args, k)}" for k in
              ("method", "iterations", "batch_size", "max_new_tokens", "learning_rate", "warmup", "threads")]
    results = {side: [] for side in SIDES}
    for r in range(args.repeats):
        for side in SIDES if r % 2 == 0 else SIDES[::-1]:
            results[side].append(run_worker(__file__, side, *passed))
    report(args, results)


def report(args, results) -> None:
    curve = {s: [statistics.mean(x) for x in zip(*(res["reward"] for res in results[s]))] for s in SIDES}
    print(f"{args.method}: {args.iterations} iterations x {args.batch_size} prompts, {args.max_new_tokens} new tokens, "
          f"lr {args.learning_rate}, {args.repeats} repeat(s) per side (same seeds), torch threads "
          f"{args.threads or 'default'}")
    print("iteration  reward sync  reward async")
    for i, (a, b) in enumerate(zip(curve["sync"], curve["async"]), 1):
        print(f"{i:9d}  {a:11.4f}  {b:12.4f}")
    per = {s: [t for res in results[s] for t in res["seconds"][args.warmup:]] for s in SIDES}
    half = args.iterations // 2
    summary = {s: {"mean_s": statistics.mean(per[s]), "median_s": statistics.median(per[s]),
                   "last_half_reward": statistics.mean(curve[s][half:]),
                   "mean_length": statistics.mean(res["length"] for res in results[s])} for s in SIDES}
    for s in SIDES:
        print(f"{s:5s}: median {summary[s]['median_s']:.3f} s/iteration (mean {summary[s]['mean_s']:.3f}; first "
              f"{args.warmup} left out), mean reward of the last {args.iterations - half} iterations "
              f"{summary[s]['last_half_reward']:.4f}, mean response length {summary[s]['mean_length']:.1f} tokens")
    ratio = summary["async"]["median_s"] / summary["sync"]["median_s"]
    tis = [res["tis_weight_mean"] for res in results["async"] if res["tis_weight_mean"] is not None]
    capped = [res["tis_capped_ratio"] for res in results["async"] if res["tis_capped_ratio"] is not None]
    print(f"async / sync median time per iteration: {ratio:.3f}; async importance weight mean "
          f"{statistics.mean(tis) if tis else float('nan'):.4f}, capped tokens "
          f"{statistics.mean(capped) if capped else float('nan'):.4f}")
    print(json.dumps({"summary": summary, "ratio": ratio, "curve": curve}))


if __name__ == "__main__":
    main()
