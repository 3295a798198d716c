"""aligntool DPO vs a plain TRL DPOTrainer script: same model, data, batch, steps and DPO settings.

Each run is a fresh subprocess (so peak memory is per run), and the two sides alternate (A B A B ...) so that machine
noise hits both alike. Measured per run:
- time per optimizer step: median wall time between on_step_begin and on_step_end, first 3 steps skipped;
- peak resident memory of the process (ru_maxrss), which includes Python, torch and the libraries;
- model FLOP/s as a fraction of this machine's measured matmul peak (scripts/benchlib.py): 6N per token of every
  forward with grad (the policy's forward + backward on chosen and rejected), 2N per token of every forward without
  (the reference's log-probs), tokens counted from the attention masks over all steps (mean per step), over the
  median step time.

Both sides train the built-in tiny model on the same toy preference pairs with DPOConfig(beta 0.1, sigmoid, lr 5e-4,
bf16 off, TensorBoard logging every 10 steps, no checkpoints): checkpointing is off on both sides because it is I/O,
not the training loop we compare. Prints every run, then the median ratios aligntool / TRL (target <= 1.05).

    python scripts/bench_dpo_vs_trl.py [--steps 40] [--batch-size 16] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time
from pathlib import Path

import benchlib
from benchlib import run_worker

REPO = Path(__file__).resolve().parent.parent
RECIPES = REPO / "aligntool" / "recipes"
SETTINGS = dict(learning_rate=5e-4, max_length=64, logging_steps=10, seed=0)
TOY_ROWS = 2000


def step_timer():
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times, self.t0 = [], None

        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.times.append(time.perf_counter() - self.t0)

    return StepTimer()


def worker_aligntool(steps: int, batch: int, out: str) -> list[float]:
    from aligntool import data, models
    from aligntool.recipe.loader import load_recipe
    from aligntool.train import Run

    overrides = [f"output_dir={out}", f"train.max_steps={steps}", f"train.per_device_train_batch_size={batch}",
                 "train.save_strategy=no", *(f"train.{k}={v}" for k, v in SETTINGS.items()),
                 f"dataset.toy.size={TOY_ROWS}"]
    loaded = load_recipe(RECIPES / "dpo.yaml", overrides)
    run = Run(loaded, Path(out))
    run.model_path = models.resolve("tiny")
    run.tokenizer = models.load_tokenizer(run.model_path)
    run.train_dataset, run.eval_dataset = data.load_for_recipe(loaded.recipe, loaded.spec.data)
    trainer = loaded.spec.load().build(run)  # exactly what `aligntool train` builds
    timer = step_timer()
    trainer.add_callback(timer)
    run.fit(trainer)  # aligntool's own loop: metrics.jsonl, COMPLETE markers, summary fields
    return timer.times


def worker_trl(steps: int, batch: int, out: str) -> list[float]:
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from aligntool.toy import world
    from aligntool.toy.tiny import tiny_model_path

    path = str(tiny_model_path())
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    train = datasets.Dataset.from_list(world.preference_pairs(TOY_ROWS, seed=0, split="train", bt_temperature=0.5))
    args = DPOConfig(output_dir=out, max_steps=steps, per_device_train_batch_size=batch, save_strategy="no",
                     bf16=False, report_to=["tensorboard"], beta=0.1, loss_type="sigmoid", **SETTINGS)
    trainer = DPOTrainer(model=model, args=args, train_dataset=train, processing_class=tokenizer)
    timer = step_timer()
    trainer.add_callback(timer)
    trainer.train()
    trainer.save_model(out)
    return timer.times


def run_side(side: str, steps: int, batch: int) -> dict:
    return run_worker(__file__, side, "--steps", str(steps), "--batch-size", str(batch))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--worker", choices=["aligntool", "trl"], help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        from transformers import LlamaModel

        counts = benchlib.count_forward_tokens(LlamaModel)  # the tiny model's body
        times = (worker_aligntool if a.worker == "aligntool" else worker_trl)(a.steps, a.batch_size, a.out)
        step = statistics.median(times[3:] or times)
        print(json.dumps({"step_s": step, "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                          "counts": {k: v / len(times) for k, v in counts.items()}}))
        return

    from aligntool.toy.tiny import tiny_model_path

    tiny_model_path()  # build outside the timed runs
    rows = {"aligntool": [], "trl": []}
    print(f"DPO, tiny model, batch {a.batch_size}, {a.steps} steps, {a.repeats} alternating repeats")
    print(f"{'run':>4} {'side':>10} {'ms/step':>9} {'peak MB':>9}")
    for i in range(a.repeats):
        for side in ("aligntool", "trl"):
            r = run_side(side, a.steps, a.batch_size)
            rows[side].append(r)
            print(f"{i + 1:>4} {side:>10} {1000 * r['step_s']:>9.1f} {r['peak_mb']:>9.0f}", flush=True)
    med = {s: (statistics.median(r["step_s"] for r in v), statistics.median(r["peak_mb"] for r in v))
           for s, v in rows.items()}
    t_ratio, m_ratio = med["aligntool"][0] / med["trl"][0], med["aligntool"][1] / med["trl"][1]
    print(f"time per step   aligntool/TRL = {t_ratio:.3f}  (target <= 1.05: {'met' if t_ratio <= 1.05 else 'NOT met'})")
    print(f"peak memory     aligntool/TRL = {m_ratio:.3f}  (target <= 1.05: {'met' if m_ratio <= 1.05 else 'NOT met'})")
    n, peak = benchlib.model_matmul_params(str(tiny_model_path())), benchlib.measured_peak()
    print(f"{benchlib.FLOPS_NOTE}; N = {n / 1e6:.2f} M")
    for side, runs in rows.items():
        c = runs[-1]["counts"]
        print(f"{side}: {c['with_grad']:.0f} tokens forward + backward, {c['no_grad']:.0f} forward only per step; "
              f"{benchlib.flops_text(benchlib.training_flops(n, c), med[side][0], peak)}")


if __name__ == "__main__":
    main()
