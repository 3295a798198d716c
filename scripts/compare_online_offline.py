"""Offline DPO vs online DPO vs XPO with the same number of preference labels on the toy world.

Every method sees ``--labels`` preference labels from the same labeller (the toy gold reward, Bradley-Terry
temperature ``--bt-temperature``; 0 = the higher gold reward wins) in batches of ``--batch-size``, one gradient step per
batch, so the three take the same number of steps with the same lr and beta:
- offline: ``--labels`` toy pairs (two corpus completions per prompt, labelled once) -> the dpo recipe, one epoch;
- online_dpo: ``--labels / --batch-size`` iterations, each labelling two fresh policy samples per prompt;
- xpo: the same, one policy and one reference sample per prompt, plus the exploration term (``--alpha``).
Each model is then scored with ``aligntool eval`` on held-out prompts: gold reward (± s.e.), KL(pi || pi_ref), win rate
against the starting model. The XPO paper claims better sample efficiency than online DPO; this prints what we get.

    python scripts/compare_online_offline.py [--labels 2048] [--batch-size 32] [--lr 2e-4] [--seeds 1] [--out DIR]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RECIPES = REPO / "aligntool" / "recipes"


def run(method: str, a, seed: int, out: Path) -> dict:
    from aligntool.eval.toy import evaluate
    from aligntool.recipe.loader import load_recipe
    from aligntool.train import train

    steps = a.labels // a.batch_size
    common = [f"output_dir={out}", f"train.learning_rate={a.lr}", f"train.max_steps={steps}",
              f"train.per_device_train_batch_size={a.batch_size}", f"train.seed={seed}", f"algo.beta={a.beta}",
              "train.logging_steps=10", f"train.save_steps={steps}"]
    if method == "offline":
        overrides = [*common, f"dataset.toy.size={a.labels}", f"dataset.toy.bt_temperature={a.bt_temperature}",
                     "algo.precompute_ref_log_probs=false"]
        recipe = "dpo"
    else:
        overrides = [*common, f"reward.bt_temperature={a.bt_temperature}", f"algo.max_new_tokens={a.max_new_tokens}"]
        if method == "xpo":
            overrides.append(f"algo.alpha={a.alpha}")
        recipe = method
    t0 = time.time()
    train(load_recipe(RECIPES / f"{recipe}.yaml", overrides))
    wall = time.time() - t0
    ev = evaluate(str(out), reference="tiny", num_prompts=a.eval_prompts, seed=100 + seed)
    return {"gold": ev["gold_reward"], "se": ev["gold_reward_stderr"], "kl": ev["kl_to_reference"],
            "win": ev["win_rate"], "ref_gold": ev["reference_gold_reward"], "seconds": wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--labels", type=int, default=2048)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--alpha", type=float, default=1e-3, help="XPO exploration weight")
    ap.add_argument("--bt-temperature", type=float, default=0.0)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--eval-prompts", type=int, default=128)
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--methods", default="offline,online_dpo,xpo")
    ap.add_argument("--out", help="keep the runs here (default: a temporary folder)")
    a = ap.parse_args()
    methods = a.methods.split(",")
    results: dict[str, list[dict]] = {m: [] for m in methods}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(a.out or tmp)
        for seed in range(a.seeds):
            for m in methods:
                r = run(m, a, seed, root / f"{m}-seed{seed}")
                results[m].append(r)
                print(f"seed {seed} {m:>10}: gold {r['gold']:.3f} ± {r['se']:.3f}  KL {r['kl']:.2f}  "
                      f"win {r['win']:.3f}  ({r['seconds']:.0f} s)", flush=True)
    ref = statistics.mean(r["ref_gold"] for rs in results.values() for r in rs)
    print(f"\n{a.labels} preference labels each, batch {a.batch_size}, {a.labels // a.batch_size} steps, lr {a.lr}, "
          f"beta {a.beta}, BT temperature {a.bt_temperature}; starting model's gold reward {ref:.3f}")
    print(f"{'method':>10} {'gold':>7} {'± s.e.':>7} {'KL':>7} {'win':>6} {'gold gain / KL':>15}")
    for m, rs in results.items():
        gold, kl = statistics.mean(r["gold"] for r in rs), statistics.mean(r["kl"] for r in rs)
        se = statistics.mean(r["se"] for r in rs) / len(rs) ** 0.5
        gain = (gold - ref) / kl if kl > 0 else float("nan")
        print(f"{m:>10} {gold:>7.3f} {se:>7.3f} {kl:>7.2f} {statistics.mean(r['win'] for r in rs):>6.3f} {gain:>15.3f}")


if __name__ == "__main__":
    main()
