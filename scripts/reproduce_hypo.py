"""HyPO vs DPO at toy scale (Song et al. 2024, arXiv 2406.01462): the paper claims that adding the online
KL(pi || pi_ref) term to offline DPO reaches a lower KL to the reference at no lower reward.

Trains DPO (the dpo recipe) and HyPO (the hypo recipe) for one or more lambda (kl_coef) values with the same data,
steps, batch, learning rate and seed, evaluates each against the tiny reference on held-out prompts (gold reward,
sequence KL estimated on policy samples, win rate) and prints the table and the verdict, whatever it is.

    python scripts/reproduce_hypo.py [--lambdas 0.01 0.05] [--steps 100] [--num-prompts 128] [--out DIR]
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RECIPES = REPO / "aligntool" / "recipes"


def train_and_eval(recipe: str, out: Path, overrides: list[str], num_prompts: int) -> dict:
    from aligntool.eval.toy import evaluate
    from aligntool.recipe.loader import load_recipe
    from aligntool.train import train

    start = time.time()
    train(load_recipe(RECIPES / recipe, [f"output_dir={out}", *overrides]))
    result = evaluate(str(out), reference="tiny", num_prompts=num_prompts)
    result["train_s"] = time.time() - start
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lambdas", type=float, nargs="+", default=[0.01, 0.05])
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--num-prompts", type=int, default=128)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    root = Path(a.out or tempfile.mkdtemp(prefix="hypo-vs-dpo-"))
    shared = [f"train.max_steps={a.steps}", "train.save_steps=1000000", "train.seed=0", "dataset.toy.seed=0"]

    rows = [("DPO", None, train_and_eval("dpo.yaml", root / "dpo", shared, a.num_prompts))]
    for lam in a.lambdas:
        rows.append(("HyPO", lam, train_and_eval("hypo.yaml", root / f"hypo-{lam}", [*shared, f"algo.kl_coef={lam}"],
                                                 a.num_prompts)))
    print(f"\nHyPO vs DPO, {a.steps} steps, {a.num_prompts} held-out prompts (reference = tiny model)")
    print(f"{'method':>6} {'lambda':>7} {'gold reward':>15} {'KL to ref':>15} {'win rate':>9} {'time s':>7}")
    for name, lam, r in rows:
        print(f"{name:>6} {'-' if lam is None else lam:>7} {r['gold_reward']:>8.3f} ± {r['gold_reward_stderr']:.3f} "
              f"{r['kl_to_reference']:>8.2f} ± {r['kl_to_reference_stderr']:.2f} "
              f"{r['win_rate']:>9.3f} {r['train_s']:>7.1f}")
    dpo = rows[0][2]
    for _, lam, r in rows[1:]:
        se = math.sqrt(r["gold_reward_stderr"] ** 2 + dpo["gold_reward_stderr"] ** 2)
        lower_kl = r["kl_to_reference"] < dpo["kl_to_reference"]
        no_lower_reward = r["gold_reward"] >= dpo["gold_reward"] - 2 * se
        verdict = "holds" if lower_kl and no_lower_reward else "does not hold"
        print(f"lambda {lam}: KL {r['kl_to_reference']:.2f} vs DPO {dpo['kl_to_reference']:.2f} "
              f"({'lower' if lower_kl else 'not lower'}); gold {r['gold_reward']:.3f} vs {dpo['gold_reward']:.3f} "
              f"({'no lower, within 2 s.e.' if no_lower_reward else 'lower by more than 2 s.e.'}): the claim {verdict}")
    print(f"runs kept in {root}")


if __name__ == "__main__":
    main()
