"""Reward-model overoptimization and ensembles (Coste et al. 2023, arXiv 2310.02743) at toy scale.

1. Data: toy preference pairs labelled by the gold reward without noise, then 25% of the labels flipped at random
   (the paper's 25% label noise); held-out clean pairs measure each proxy's accuracy.
2. Proxies: ``--members`` reward models from the reward recipe on those pairs, differing only in the seed (head
   init and data order).
3. Best-of-n: N samples per held-out prompt from the tiny policy, drawn once; for each objective -- a single proxy
   (member 0), mean, WCO (min), UWO (mean - lambda * population variance, ddof 0, lambda ``--uwo-bon``) -- the unbiased
   best-of-n estimate of proxy and gold score for n = 1..N against KL = log n - (n-1)/n.
4. PPO: aligntool/recipes/ppo.yaml with each objective as the reward, no KL penalty (kl_coef 0, as in the paper's
   overoptimization runs, so that the policy drifts as far as the proxy pulls it); every ``--eval-every`` iterations
   a checkpoint is scored on held-out prompts: gold, proxy objective and KL(pi || pi_0) of its samples.
   UWO here uses ``--uwo-ppo`` (the paper's PPO default 0.1) and, like best-of-n, the population variance (ddof 0;
   the authors' PPO code uses ddof 1 -- see reward.uwo_ddof).

Writes ``OUT/overoptimization.json`` and ``OUT/overoptimization.png`` (gold solid, proxy dashed, against KL), and
prints the tables and, per objective, the final gold reward and the drop from its peak (overoptimization shows as
gold falling while the proxy still rises).

    python scripts/reproduce_overoptimization.py [--out runs/overopt] [--members 4] [--bon-n 64]
                                                 [--ppo-iterations 80] [--quick]
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RECIPES = REPO / "aligntool" / "recipes"
OBJECTIVES = ("single", "mean", "wco", "uwo")


def noisy_pairs(n: int, flip: float, seed: int) -> list[dict]:
    from aligntool.toy import world

    rng = random.Random(seed + 99)
    rows = world.preference_pairs(n, seed=seed, split="train", bt_temperature=0.0)
    for r in rows:
        if rng.random() < flip:
            r["chosen"], r["rejected"] = r["rejected"], r["chosen"]
            r["score_chosen"], r["score_rejected"] = r["score_rejected"], r["score_chosen"]
    return rows


def reward_config(objective: str, members: list[str], uwo_lambda: float):
    from aligntool.recipe.schema import RewardConfig

    if objective == "single":
        return RewardConfig(source=members[0])
    return RewardConfig(ensemble=members, aggregate=objective, uwo_lambda=uwo_lambda)


def train_members(a, out: Path) -> list[str]:
    from aligntool.eval.toy import evaluate_reward_model
    from aligntool.recipe.loader import load_recipe
    from aligntool.train import train

    data = out / "pairs_25pct_flipped.jsonl"
    rows = noisy_pairs(a.pairs, a.label_noise, seed=0)
    data.write_text("".join(json.dumps({"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]}) + "\n"
                            for r in rows))
    members = []
    for seed in range(a.members):
        path = out / f"rm{seed}"
        if not (path / "summary.json").is_file():
            train(load_recipe(RECIPES / "reward.yaml", [
                f"output_dir={path}", f"dataset.path={data}", f"train.seed={seed}", f"train.max_steps={a.rm_steps}",
                "train.eval_strategy=no", f"train.save_steps={a.rm_steps}"]))
        acc = evaluate_reward_model(str(path), 512, 64, seed=0)["pairwise_accuracy"]
        print(f"proxy rm{seed}: clean held-out pairwise accuracy {acc:.3f}", flush=True)
        members.append(str(path))
    return members


def run_bon(a, members: list[str]) -> dict:
    from aligntool import rewards
    from aligntool.eval.bon import candidates, curve

    prompts, texts, gold = candidates("tiny", a.bon_n, a.prompts, seed=1)
    out = {}
    for obj in OBJECTIVES:
        proxy = rewards.load(reward_config(obj, members, a.uwo_bon))(prompts, texts)
        out[obj] = curve(proxy, gold, a.bon_n)
    return out


def score_policy(path: str, scorer, num_prompts: int) -> dict:
    from aligntool.eval.toy import _load_lm
    from aligntool.sampling import sample, sequence_logprobs
    from aligntool.toy import world

    prompts = world.prompts("eval", num_prompts, seed=2)
    policy, tok = _load_lm(path, "--model")
    ref, _ = _load_lm("tiny", "--reference")
    texts, ids = sample(policy, tok, prompts, 48, 1.0, 64, 2)
    kl = [a - b for a, b in zip(sequence_logprobs(policy, tok, prompts, ids, 64),
                                sequence_logprobs(ref, tok, prompts, ids, 64))]
    gold, proxy = [world.gold_reward(t) for t in texts], scorer(prompts, texts)
    mean = lambda v: sum(v) / len(v)  # noqa: E731
    return {"kl": mean(kl), "gold": mean(gold), "proxy": mean(proxy)}


def run_ppo(a, members: list[str], out: Path) -> dict:
    from aligntool import rewards
    from aligntool.recipe.loader import load_recipe
    from aligntool.train import train

    curves = {}
    for obj in OBJECTIVES:
        path = out / f"ppo_{obj}"
        cfg = reward_config(obj, members, a.uwo_ppo)
        reward = ({"source": cfg.source} if obj == "single"
                  else {"ensemble": members, "aggregate": obj, "uwo_lambda": a.uwo_ppo})
        overrides = [f"output_dir={path}", f"train.max_steps={a.ppo_iterations}", f"train.save_steps={a.eval_every}",
                     "train.save_total_limit=null", "algo.kl_coef=0.0", "algo.kl_target=null",
                     f"train.learning_rate={a.ppo_lr}"]
        overrides += [f"reward.{k}={json.dumps(v)}" for k, v in reward.items() if k != "source"]
        if "source" in reward:
            overrides.append(f"reward.source={reward['source']}")
        if not (path / "summary.json").is_file():
            t0 = time.time()
            train(load_recipe(RECIPES / "ppo.yaml", overrides))
            print(f"PPO {obj}: {time.time() - t0:.0f} s", flush=True)
        scorer = rewards.load(cfg)
        rows = [{"iteration": 0, **score_policy("tiny", scorer, a.prompts)}]
        for it in range(a.eval_every, a.ppo_iterations + 1, a.eval_every):
            rows.append({"iteration": it,
                         **score_policy(str(path / "checkpoints" / f"checkpoint-{it}"), scorer, a.prompts)})
        curves[obj] = rows
    return curves


def plot(result: dict, path: Path) -> bool:
    try:
        import matplotlib
    except ImportError:
        print("no PNG: matplotlib is missing (bash scripts/install.sh --extras plots)")
        return False

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    colors = dict(zip(OBJECTIVES, ("tab:red", "tab:blue", "tab:green", "tab:purple")))
    for obj in OBJECTIVES:
        bon = result["bon"][obj]
        axes[0].plot([r["kl_bound"] for r in bon], [r["gold"] for r in bon], color=colors[obj], label=f"{obj} gold")
        axes[0].plot([r["kl_bound"] for r in bon], [r["proxy"] for r in bon], color=colors[obj], ls="--", alpha=0.6,
                     label=f"{obj} proxy")
        if obj in result.get("ppo", {}):
            ppo = result["ppo"][obj]
            axes[1].plot([r["kl"] for r in ppo], [r["gold"] for r in ppo], "o-", color=colors[obj], label=f"{obj} gold")
            axes[1].plot([r["kl"] for r in ppo], [r["proxy"] for r in ppo], "x--", color=colors[obj], alpha=0.6,
                         label=f"{obj} proxy")
    axes[0].set(title="best-of-n (unbiased estimator)", xlabel="KL = log n - (n-1)/n (nats)", ylabel="reward")
    axes[1].set(title="PPO, no KL penalty (checkpoints)", xlabel="KL(pi || pi_0) (nats)", ylabel="reward")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    fig.suptitle("Toy overoptimization: proxy RMs trained on 25% flipped labels; gold = toy lexicon reward")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/overopt")
    ap.add_argument("--members", type=int, default=4)
    ap.add_argument("--pairs", type=int, default=3000)
    ap.add_argument("--label-noise", type=float, default=0.25)
    ap.add_argument("--rm-steps", type=int, default=150)
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--bon-n", type=int, default=64)
    ap.add_argument("--ppo-iterations", type=int, default=80)
    ap.add_argument("--ppo-lr", type=float, default=1e-4)
    ap.add_argument("--eval-every", type=int, default=10)
    ap.add_argument("--uwo-bon", type=float, default=0.5)
    ap.add_argument("--uwo-ppo", type=float, default=0.1)
    ap.add_argument("--no-ppo", action="store_true")
    ap.add_argument("--quick", action="store_true", help="a smoke run: 2 members, few steps")
    a = ap.parse_args()
    if a.quick:
        a.members, a.pairs, a.rm_steps, a.prompts, a.bon_n, a.ppo_iterations, a.eval_every = 2, 200, 5, 8, 4, 4, 2
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    members = train_members(a, out)
    result = {"settings": vars(a), "members": members, "bon": run_bon(a, members)}
    print(f"\nbest-of-n, {a.prompts} prompts x N={a.bon_n}: gold (proxy) at n = 1, 4, 16, {a.bon_n}")
    picks = sorted({n for n in (1, 4, 16, a.bon_n) if n <= a.bon_n})
    for obj in OBJECTIVES:
        c = result["bon"][obj]
        print(f"  {obj:>6}: " + "  ".join(f"n={n}: {c[n - 1]['gold']:.3f} ({c[n - 1]['proxy']:.3f})" for n in picks))
    if not a.no_ppo:
        result["ppo"] = run_ppo(a, members, out)
        print(f"\nPPO without KL penalty, {a.ppo_iterations} iterations: per checkpoint KL / gold / proxy")
        for obj in OBJECTIVES:
            rows = result["ppo"][obj]
            peak = max(r["gold"] for r in rows)
            print(f"  {obj:>6}: " + "  ".join(f"{r['kl']:.1f}/{r['gold']:.2f}/{r['proxy']:.2f}" for r in rows))
            print(f"          final gold {rows[-1]['gold']:.3f}, peak {peak:.3f}, "
                  f"drop from peak {peak - rows[-1]['gold']:.3f}")
    (out / "overoptimization.json").write_text(json.dumps(result, indent=1))
    png = plot(result, out / "overoptimization.png")
    print(f"\nwrote {out / 'overoptimization.json'}{' and ' + str(out / 'overoptimization.png') if png else ''} "
          f"in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
