"""Reference log-probs once vs a reference forward every step (DPO, tiny model, same data/batch/steps).

`algo.precompute_ref_log_probs: true` scores the training data with the reference in one pass before training (and
caches it in output_dir/ref_logps); every training step then runs the policy only. The two settings alternate
(A B A B ...), each run in a fresh subprocess. Measured per run: median time per optimizer step (on_step_begin to
on_step_end, first 3 steps skipped), and for the precomputed side the one-off pass (trainer construction time minus
that of the per-step side, which builds the same trainer without the pass). Prints the ratio precomputed / per-step
(target <= 0.7), and per side the model FLOP/s of a step as a fraction of the measured matmul peak (benchlib: 6N per
token of a forward with grad, 2N per token of one without, the one-off pass left out).

    python scripts/bench_ref_precompute.py [--steps 40] [--batch-size 16] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RECIPES = REPO / "aligntool" / "recipes"
sys.path.insert(0, str(Path(__file__).resolve().parent))


def worker(precompute: bool, steps: int, batch: int, out: str) -> dict:
    from bench_dpo_vs_trl import step_timer
    from benchlib import count_forward_tokens
    from transformers import LlamaModel

    from aligntool import data, models
    from aligntool.recipe.loader import load_recipe
    from aligntool.train import Run

    rows = max(steps * batch, 256)  # the pass scores only the rows training will see
    loaded = load_recipe(RECIPES / "dpo.yaml", [
        f"output_dir={out}", f"train.max_steps={steps}", f"train.per_device_train_batch_size={batch}",
        "train.save_strategy=no", f"dataset.toy.size={rows}",
        f"algo.precompute_ref_log_probs={str(precompute).lower()}",
    ])
    run = Run(loaded, Path(out))
    run.model_path = models.resolve("tiny")
    run.tokenizer = models.load_tokenizer(run.model_path)
    run.train_dataset, run.eval_dataset = data.load_for_recipe(loaded.recipe, loaded.spec.data)
    counts = count_forward_tokens(LlamaModel)  # the tiny model's body
    start = time.perf_counter()
    trainer = loaded.spec.load().build(run)
    build_s = time.perf_counter() - start
    before = dict(counts)  # the one-off pass is not a step's
    timer = step_timer()
    trainer.add_callback(timer)
    run.fit(trainer)
    return {"step_s": statistics.median(timer.times[3:] or timer.times), "build_s": build_s, "rows": rows,
            "counts": {k: (counts[k] - before[k]) / len(timer.times) for k in counts}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--worker", choices=["precomputed", "per-step"], help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        print(json.dumps(worker(a.worker == "precomputed", a.steps, a.batch_size, a.out)))
        return

    from aligntool.toy.tiny import tiny_model_path

    tiny_model_path()
    results = {"per-step": [], "precomputed": []}
    print(f"DPO reference log-probs, tiny model, batch {a.batch_size}, {a.steps} steps, "
          f"{a.repeats} alternating repeats")
    print(f"{'run':>4} {'reference':>12} {'ms/step':>9} {'build s':>8}")
    for i in range(a.repeats):
        for side in ("per-step", "precomputed"):
            with tempfile.TemporaryDirectory() as out:
                cmd = [sys.executable, __file__, "--worker", side, "--steps", str(a.steps), "--batch-size",
                       str(a.batch_size), "--out", out]
                proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode:
                sys.exit(f"{side} run failed:\n{proc.stderr[-3000:]}")
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            results[side].append(r)
            print(f"{i + 1:>4} {side:>12} {1000 * r['step_s']:>9.1f} {r['build_s']:>8.2f}", flush=True)
    step = {k: statistics.median(r["step_s"] for r in v) for k, v in results.items()}
    build = {k: statistics.median(r["build_s"] for r in v) for k, v in results.items()}
    ratio = step["precomputed"] / step["per-step"]
    rows = results["precomputed"][0]["rows"]
    print(f"time per step   precomputed/per-step = {ratio:.3f}  "
          f"(target <= 0.7: {'met' if ratio <= 0.7 else 'NOT met'})")
    print(f"one-off pass    {build['precomputed'] - build['per-step']:.2f} s for {rows} pairs "
          f"(= {(build['precomputed'] - build['per-step']) / max(step['per-step'] - step['precomputed'], 1e-9):.0f} "
          "steps' worth of the per-step saving)")
    import benchlib

    n, peak = benchlib.model_matmul_params(str(tiny_model_path())), benchlib.measured_peak()
    print(f"{benchlib.FLOPS_NOTE}; N = {n / 1e6:.2f} M")
    for side, runs in results.items():  # tokens per step: mean over the steps; time: the median step
        c = runs[-1]["counts"]
        print(f"{side}: {c['with_grad']:.0f} tokens forward + backward, {c['no_grad']:.0f} forward only per step; "
              f"{benchlib.flops_text(benchlib.training_flops(n, c), step[side], peak)}")


if __name__ == "__main__":
    main()
