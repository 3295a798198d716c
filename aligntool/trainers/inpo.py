"""INPO: Iterative Nash Policy Optimization (Zhang et al. 2024, arXiv 2407.00617), as the authors' pipeline runs it.

For each iteration t = 1..T (a disjoint part of the prompts per iteration, as the authors use a fresh prompt set):
    1. sample K responses per prompt from the current iterate pi_t                         -> iter-t/samples.jsonl
    2. pick one pair per prompt with the preference source (recipe ``reward`` section):
         best_worst  chosen = highest score, rejected = lowest (needs a score source)
         tournament  the authors' selection (``get_pref_single.py``): for K = 8 their knockout -- winner bracket to
                     the champion (chosen), the first-round losers' bracket down to the worst (rejected); for any
                     other K their linear scans for the best and the worst. A match is won by the first player with
                     P(i > j) >= 1/2 (ties to the first player, as theirs)
       a pair is kept only if P(chosen > rejected) > 1/2 (the authors' final check; for K = 2 the authors keep a tie
       as a 'tie' row, which carries no preference direction: aligntool drops it)
    3. precompute log-probs of both responses under pi_ref (fixed: the starting model or ``ref_model``) and under
       pi_t, then train pi_{t+1} from pi_t on
           h = [log pi(y_w) - log pi(y_l)] - ratio [log pi_ref(y_w) - log pi_ref(y_l)]
               - (1 - ratio) [log pi_t(y_w) - log pi_t(y_l)],      L = (h - 1/(2 eta))^2,    ratio = tau/eta
                                                                                           -> iter-t/ (model, metrics)
Each iteration's data and model are kept; ``iter-t/iteration.done`` marks a finished one, so a rerun (or --resume)
continues at the next iteration. Authors' defaults: eta 0.005, ratio 1/3, K 8, T 3, temperature 1.0; the toy recipe
uses a larger eta (a smaller margin target 1/(2 eta)) for a 1 M-parameter model.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from aligntool.recipe.base import Sampling


class AlgoConfig(Sampling(temperature=1.0, seed=0)):  # the authors sample at temperature 1
    iterations: int = Field(3, ge=1, description="Iterations T (authors: 3).")
    num_samples: int = Field(8, ge=2, description="K responses per prompt (authors: 8); K >= 2.")
    eta: float = Field(0.005, gt=0, description="eta: the margin target of h is 1/(2 eta) (authors: 0.005).")
    ratio: float = Field(1 / 3, ge=0, le=1, description="tau/eta: weight of pi_ref against the last iterate (1/3).")
    pairing: Literal["tournament", "best_worst"] = Field(
        "tournament", description="How each prompt's pair is chosen: tournament = the authors' selection (knockout "
        "bracket for K = 8, linear best/worst scans otherwise); best_worst = highest/lowest score.")

    def trl_extra(self) -> dict:
        return {"precompute_ref_log_probs": True}  # pi_ref's log-probs once per iteration, as the authors' code


def preference_matrices(source, prompts: list[str], texts: list[str], k: int) -> list[list[list[float]]]:
    """P[i][j] = P(response i > response j) for each prompt's K responses (P[i][i] = 1/2)."""
    from aligntool.preferences import bt_probability

    n = len(prompts) // k
    scores = source.scores(prompts, texts)
    if scores is not None:
        t = source.config.bt_temperature
        return [[[bt_probability(scores[g * k + i], scores[g * k + j], t) for j in range(k)] for i in range(k)]
                for g in range(n)]
    pairs = [(g, i, j) for g in range(n) for i in range(k) for j in range(i + 1, k)]
    p = source.probabilities([prompts[g * k] for g, _, _ in pairs], [texts[g * k + i] for g, i, _ in pairs],
                             [texts[g * k + j] for g, _, j in pairs])
    mats = [[[0.5] * k for _ in range(k)] for _ in range(n)]
    for (g, i, j), x in zip(pairs, p):
        mats[g][i][j], mats[g][j][i] = x, 1 - x
    return mats


def select_pair(matrix: list[list[float]], scores: list[float] | None, pairing: str) -> tuple[int, int] | None:
    from aligntool.preferences import select_best_and_worst

    if pairing == "best_worst":
        w, worst = max(range(len(scores)), key=scores.__getitem__), min(range(len(scores)), key=scores.__getitem__)
    else:
        w, worst = select_best_and_worst(len(matrix), lambda i, j: matrix[i][j] >= 0.5)
    return (w, worst) if w != worst and matrix[w][worst] > 0.5 else None


def pipeline(run) -> dict:
    from aligntool import models
    from aligntool.errors import UserError
    from aligntool.preferences import PreferenceSource
    from aligntool.recipe.schema import RewardConfig
    from aligntool.trainers.base.stages import iterate, sample_groups
    from aligntool.trainers.inpo_trainer import INPOTrainer

    cfg: AlgoConfig = run.algo
    reward_cfg = run.recipe.reward or RewardConfig()
    if cfg.pairing == "best_worst" and reward_cfg.judge:
        raise UserError("algo.pairing: best_worst needs scores; with reward.judge use pairing: tournament")
    source = None
    ref_path = str(run.ref_path or (models.resolve(run.recipe.ref_model.name_or_path, key="ref_model.name_or_path")
                                    if run.recipe.ref_model and run.recipe.ref_model.name_or_path else run.model_path))

    def make_rows(t, policy_path, part):
        nonlocal source
        k = cfg.num_samples
        groups = sample_groups(run, policy_path, part, k, cfg, seed=cfg.seed + 1000 * t)
        repeated, texts = [p for p in part for _ in range(k)], [c for g in groups for c in g]
        source = source or PreferenceSource(reward_cfg, seed=cfg.seed + t)
        scores = source.scores(repeated, texts) if cfg.pairing == "best_worst" else None
        rows = []
        for g, (p, m) in enumerate(zip(part, preference_matrices(source, repeated, texts, k))):
            pair = select_pair(m, scores[g * k : (g + 1) * k] if scores else None, cfg.pairing)
            if pair:
                w, worst = pair
                rows.append({"prompt": p, "chosen": texts[g * k + w], "rejected": texts[g * k + worst],
                             "p_chosen_over_rejected": m[w][worst]})
        return rows

    def make_trainer(stage):
        reference = models.load_model(ref_path, **models.options(run.recipe.model))
        return INPOTrainer(model=stage.policy(), ref_model=reference, args=stage.trl_config(),
                           train_dataset=stage.train_dataset, processing_class=run.tokenizer,
                           peft_config=stage.peft_config(), algo=cfg)

    settings = {**cfg.model_dump(exclude={"iterations"}), "reward": reward_cfg.model_dump()}
    return iterate(run, "inpo", cfg.iterations, settings, make_rows, make_trainer)
