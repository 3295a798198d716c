"""CE vs DCO fine-tuning for pass@N at toy scale (Chen et al. 2025, "Rethinking Fine-Tuning when Scaling Test-Time
Compute", arXiv 2502.07154): the paper claims that with cross-entropy, pass@N for large N falls as training goes on
(the model grows confident in wrong answers), while Direct Coverage Optimization (DCO) keeps it up.

Trains the tiny model on the toy addition task (aligntool/toy/arith.py, the sft_pass_at_n recipe) twice, with
``algo.loss=ce`` and ``algo.loss=dco`` (same data, steps, batch, learning rate, seed), checkpointing along each run;
at every checkpoint samples ``--samples`` completions per held-out question at temperature 1 and reports the
unbiased pass@k (k in ``--ks``, mean over questions), prints the table and the verdict, whatever it is, and writes
a PNG of pass@k against steps (matplotlib).

    python scripts/reproduce_pass_at_n.py [--steps 600] [--save-every 100] [--pass-n 16] [--out DIR] [--quick]
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RECIPES = REPO / "aligntool" / "recipes"


def evaluate(model_path: str, tokenizer, questions: list[str], samples: int, ks: list[int], max_new_tokens: int,
             seed: int) -> dict:
    """Mean unbiased pass@k over ``questions`` from ``samples`` temperature-1 samples each (and its standard
    error over questions)."""
    from transformers import AutoModelForCausalLM

    from aligntool.sampling import sample
    from aligntool.toy import arith

    model = AutoModelForCausalLM.from_pretrained(model_path).eval()
    prompts = [q for q in questions for _ in range(samples)]
    texts, _ = sample(model, tokenizer, prompts, max_new_tokens, temperature=1.0, batch_size=1024, seed=seed)
    correct = [sum(arith.is_correct(q, t) for t in texts[i * samples:(i + 1) * samples])
               for i, q in enumerate(questions)]
    out = {}
    for k in ks:
        values = [arith.pass_at_k(samples, c, k) for c in correct]
        mean = sum(values) / len(values)
        sd = math.sqrt(sum((v - mean) ** 2 for v in values) / max(1, len(values) - 1))
        out[k] = (mean, sd / math.sqrt(len(values)))
    return out


def train_run(loss: str, out: Path, a) -> float:
    from aligntool.recipe.loader import load_recipe
    from aligntool.train import train

    start = time.time()
    overrides = [f"output_dir={out}", f"algo.loss={loss}", f"algo.pass_n={a.pass_n}", f"train.max_steps={a.steps}",
                 f"train.save_steps={a.save_every}", f"train.learning_rate={a.lr}",
                 f"train.per_device_train_batch_size={a.batch_size}", f"dataset.toy.size={a.train_questions}",
                 "dataset.toy.eval_size=0", "train.eval_strategy=no", "train.logging_steps=20", "train.seed=0",
                 "dataset.toy.seed=0", "train.save_only_model=true", "train.disable_tqdm=true"]
    train(load_recipe(RECIPES / "sft_pass_at_n.yaml", overrides), overwrite=True)
    return time.time() - start


def plot(rows: dict, ks: list[int], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no PNG written (pip install matplotlib)")
        return False
    fig, axes = plt.subplots(1, len(ks), figsize=(3.2 * len(ks), 3.2), sharex=True)
    for ax, k in zip(axes, ks):
        for loss, style in (("ce", "o-"), ("dco", "s-")):
            steps = sorted(rows[loss])
            mean = [rows[loss][s][k][0] for s in steps]
            err = [rows[loss][s][k][1] for s in steps]
            ax.errorbar(steps, mean, yerr=err, fmt=style, capsize=2, label=loss.upper())
        ax.set_title(f"pass@{k}")
        ax.set_xlabel("SFT steps")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("held-out questions")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--save-every", type=int, default=100, help="evaluate a checkpoint every this many steps")
    ap.add_argument("--pass-n", type=int, default=16, help="N of the DCO loss")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--train-questions", type=int, default=100, help="distinct training questions (a small set is "
                    "seen many times: steps * batch / questions epochs)")
    ap.add_argument("--eval-questions", type=int, default=96)
    ap.add_argument("--samples", type=int, default=64, help="samples per held-out question (n of pass@k)")
    ap.add_argument("--ks", type=int, nargs="+", default=[1, 4, 16, 64])
    ap.add_argument("--out", default=None)
    ap.add_argument("--quick", action="store_true", help="a smoke test: 6 steps, 4 questions, 8 samples")
    a = ap.parse_args()
    if a.quick:
        a.steps, a.save_every, a.eval_questions, a.samples, a.ks, a.train_questions = 6, 3, 4, 8, [1, 8], 32
    if max(a.ks) > a.samples:
        ap.error(f"--ks up to {max(a.ks)} needs --samples >= {max(a.ks)}")
    root = Path(a.out or tempfile.mkdtemp(prefix="pass-at-n-"))
    root.mkdir(parents=True, exist_ok=True)

    from aligntool import models
    from aligntool.toy import arith
    from aligntool.toy.tiny import build_threads

    tiny = str(models.resolve("tiny"))
    tokenizer = models.load_tokenizer(tiny)
    questions = arith.prompts("eval", a.eval_questions, seed=0)
    ev = dict(tokenizer=tokenizer, questions=questions, samples=a.samples, ks=a.ks, max_new_tokens=4, seed=1234)
    rows, times = {}, {}
    with build_threads(log=print):
        base = evaluate(tiny, **ev)
        for loss in ("ce", "dco"):
            times[loss] = train_run(loss, root / loss, a)
            rows[loss] = {0: base}
            for ckpt in sorted((root / loss / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name[11:])):
                rows[loss][int(ckpt.name[11:])] = evaluate(str(ckpt), **ev)

    epochs = a.steps * a.batch_size / min(a.train_questions, len(arith.prompts("train")))
    print(f"\nCE vs DCO (N={a.pass_n}) on toy addition: tiny model, {a.steps} steps x batch {a.batch_size} on "
          f"{a.train_questions} questions ({epochs:.0f} epochs), lr {a.lr}; {len(questions)} held-out questions x "
          f"{a.samples} samples at T=1, mean unbiased pass@k ± standard error")
    print(f"{'loss':>4} {'step':>5} " + " ".join(f"{'pass@' + str(k):>14}" for k in a.ks))
    for loss in ("ce", "dco"):
        for step in sorted(rows[loss]):
            print(f"{loss:>4} {step:>5} " + " ".join(f"{rows[loss][step][k][0]:>7.3f} ± {rows[loss][step][k][1]:.3f}"
                                                     for k in a.ks))
    big, last = max(a.ks), a.steps
    for loss in ("ce", "dco"):
        best_step = max(rows[loss], key=lambda s: rows[loss][s][big][0])
        best, final = rows[loss][best_step][big], rows[loss][last][big]
        print(f"{loss}: pass@{big} best {best[0]:.3f} at step {best_step}, last {final[0]:.3f} at step {last} "
              f"(drop from peak {best[0] - final[0]:+.3f}); pass@1 last {rows[loss][last][1][0]:.3f}; "
              f"train {times[loss]:.0f}s")
    ce_best = max(r[big][0] for r in rows["ce"].values())
    ce, dco = rows["ce"][last][big], rows["dco"][last][big]
    se = math.sqrt(ce[1] ** 2 + dco[1] ** 2)
    ce_falls = ce_best - ce[0] > 2 * ce[1]
    dco_higher = dco[0] - ce[0] > 2 * se
    print(f"claim (CE's pass@{big} falls with training, DCO's ends higher): CE falls from its peak: "
          f"{'yes' if ce_falls else 'no'}; DCO above CE at the last step by more than 2 s.e.: "
          f"{'yes' if dco_higher else 'no'} -> {'holds' if ce_falls and dco_higher else 'does not hold'} on this run")
    (root / "pass_at_n.json").write_text(json.dumps(
        {loss: {str(s): {str(k): v for k, v in r.items()} for s, r in rows[loss].items()} for loss in rows}, indent=1))
    if plot(rows, a.ks, root / "pass_at_n.png"):
        print(f"plot: {root / 'pass_at_n.png'}")


if __name__ == "__main__":
    main()
