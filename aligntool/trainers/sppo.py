"""SPPO: Self-Play Preference Optimization (Wu et al. 2024, arXiv 2405.00675), soft and iterative, as the official code.

For each iteration t = 1..T (the prompts are split into T disjoint parts, as the official pipeline uses a fresh
prompt set per iteration):
    1. sample K completions per prompt from the current policy pi_t                    -> iter-t/samples.jsonl
    2. score them (recipe ``reward`` section) and turn scores into win rates against pi_t,
           P_i = (1/K) sum_j sigmoid(s_i - s_j)          (the self-pair j = i contributes 1/2)
       chosen = argmax s, rejected = argmin s; prompts whose K scores are all equal are skipped (no signal)
    3. train pi_{t+1} from pi_t with pi_t as the reference (refreshed every iteration):
           L = [(lr(y_w) - (P_w - 1/2)/beta)^2 + (lr(y_l) - (P_l - 1/2)/beta)^2] / 2,   beta = 1/eta
       (halved as in the authors' trainer, uclaml/SPPO ``sppo/trainer.py``)
                                                                                       -> iter-t/ (model, metrics)
The last iterate is also saved in output_dir. ``--resume`` skips finished iterations. The official default beta is
0.001 with PairRM scores; the toy recipe uses a larger beta (smaller log-ratio targets) for a 1 M-parameter model.
"""

from __future__ import annotations

from pydantic import Field

from aligntool.recipe.base import Sampling


class AlgoConfig(Sampling(temperature=0.7, top_p=0.9, seed=0)):  # the official pipeline's vLLM sampling
    iterations: int = Field(3, ge=1, description="Self-play iterations T (official: 3).")
    num_samples: int = Field(5, ge=2, description="K completions per prompt (official: 5); K >= 2.")
    beta: float = Field(0.1, gt=0, description="beta = 1/eta: the log-ratio targets are (P - 1/2)/beta.")


def win_rate_rows(prompt: str, completions: list[str], scores: list[float]) -> list[dict]:
    """The SPPO training row of one prompt: chosen/rejected with their win rates, or [] if all scores tie."""
    import torch

    from aligntool.losses.preference import sppo_win_rates

    if max(scores) == min(scores):
        return []
    p = sppo_win_rates(torch.tensor(scores, dtype=torch.float64)).tolist()
    w, worst = max(range(len(scores)), key=scores.__getitem__), min(range(len(scores)), key=scores.__getitem__)
    return [{"prompt": prompt, "chosen": completions[w], "rejected": completions[worst], "p_chosen": p[w],
             "p_rejected": p[worst], "score_chosen": scores[w], "score_rejected": scores[worst]}]


def pipeline(run) -> dict:
    from aligntool import rewards
    from aligntool.recipe.schema import RewardConfig
    from aligntool.trainers.base.stages import iterate, sample_groups
    from aligntool.trainers.sppo_trainer import SPPOTrainer

    cfg: AlgoConfig = run.algo
    reward_cfg = run.recipe.reward or RewardConfig()
    scorer = None

    def make_rows(t, policy_path, part):
        nonlocal scorer
        groups = sample_groups(run, policy_path, part, cfg.num_samples, cfg, seed=cfg.seed + 1000 * t)
        scorer = scorer or rewards.load(reward_cfg)
        scores = scorer([p for p, g in zip(part, groups) for _ in g], [c for g in groups for c in g])
        k, rows = cfg.num_samples, []
        for i, (p, g) in enumerate(zip(part, groups)):
            rows.extend(win_rate_rows(p, g, scores[i * k : (i + 1) * k]))
        return rows

    def make_trainer(stage):
        # the reference is this iteration's starting policy: TRL loads it from the policy's folder
        return SPPOTrainer(model=stage.policy(), args=stage.trl_config(), train_dataset=stage.train_dataset,
                           processing_class=run.tokenizer, peft_config=stage.peft_config(), algo=cfg)

    settings = {**cfg.model_dump(exclude={"iterations"}), "reward": reward_cfg.model_dump()}
    return iterate(run, "sppo", cfg.iterations, settings, make_rows, make_trainer)
