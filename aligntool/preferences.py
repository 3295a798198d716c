"""Preference sources: who says which of two completions of a prompt is better (online DPO, XPO, INPO).

From the recipe's ``reward`` section:
- a score source (``source: gold`` / a reward-model folder / ``module:function``, or an ``ensemble``): P(a > b) =
  sigmoid((r_a - r_b) / bt_temperature), or 1 / 1/2 / 0 by the higher score when ``bt_temperature`` is 0;
- ``judge: module:function``: fn(prompts, completions_a, completions_b) returns P(a > b) for each pair.

Labels: with a score source and ``bt_temperature`` 0 the label is deterministic, a wins iff r_a >= r_b, so a tie goes
to the first completion, as in TRL's OnlineDPOTrainer and XPOTrainer (``first >= second``; in XPO the policy's sample
is the first). Otherwise (a Bradley-Terry temperature, or a judge) the label is a draw from Bernoulli(P), and a tie
(P = 1/2) is a coin flip. ``probabilities`` gives P itself (INPO's final check keeps a pair only if P > 1/2).
Scores may be lowered by a per-completion penalty first (``missing_eos_penalty`` of the online methods, applied to
the preference scores as TRL does).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable

from aligntool.errors import UserError
from aligntool.recipe.schema import RewardConfig

Judge = Callable[[list[str], list[str], list[str]], list[float]]


class PreferenceSource:
    def __init__(self, config: RewardConfig, seed: int = 0, device=None):
        from aligntool import rewards

        self.config, self.rng = config, random.Random(seed)
        self.scorer = None if config.judge else rewards.load(config, device)
        self.judge = (rewards.function_scorer(config.judge, "reward.judge", rewards.search_dirs(config))
                      if config.judge else None)

    def scores(self, prompts: list[str], completions: list[str]) -> list[float] | None:
        """Scores when the source has them (best-vs-worst pairing needs them), else None."""
        return self.scorer(prompts, completions) if self.scorer else None

    def probabilities(self, prompts: list[str], a: list[str], b: list[str], penalty_a: list[float] | None = None,
                      penalty_b: list[float] | None = None) -> list[float]:
        """P(a > b) for each pair; ``penalty_*`` are subtracted from the scores first (score sources only)."""
        if self.judge is not None:
            if penalty_a is not None or penalty_b is not None:
                raise UserError("algo.missing_eos_penalty: applies to score sources (reward.source / reward.ensemble); "
                                "a reward.judge gives probabilities, not scores")
            p = list(self.judge(prompts, a, b))
            if len(p) != len(a) or not all(isinstance(x, (int, float)) and 0.0 <= x <= 1.0 for x in p):
                bad = next((x for x in p if not (isinstance(x, (int, float)) and 0.0 <= x <= 1.0)), None)
                raise UserError(f"reward.judge: {self.config.judge} returned {len(p)} values for {len(a)} pairs"
                                + (f" (e.g. {bad!r})" if bad is not None else "")
                                + "; expected one P(a > b) in [0, 1] each")
            return [float(x) for x in p]
        ra, rb = self.scorer(prompts, a), self.scorer(prompts, b)
        ra = [r - d for r, d in zip(ra, penalty_a)] if penalty_a is not None else ra
        rb = [r - d for r, d in zip(rb, penalty_b)] if penalty_b is not None else rb
        return [bt_probability(x, y, self.config.bt_temperature) for x, y in zip(ra, rb)]

    @property
    def deterministic(self) -> bool:
        """Hard labels: a score source with bt_temperature 0 (a tie then goes to the first completion)."""
        return self.judge is None and self.config.bt_temperature <= 0

    def prefer(self, prompts: list[str], a: list[str], b: list[str], penalty_a: list[float] | None = None,
               penalty_b: list[float] | None = None) -> tuple[list[bool], list[float]]:
        """(a wins?, P(a > b)) for each pair: r_a >= r_b with hard labels, else a draw from Bernoulli(P)."""
        p = self.probabilities(prompts, a, b, penalty_a, penalty_b)
        if self.deterministic:
            return [x >= 0.5 for x in p], p
        return [self.rng.random() < x if 0.0 < x < 1.0 else x == 1.0 for x in p], p


def bt_probability(r_a: float, r_b: float, temperature: float) -> float:
    if temperature <= 0:
        return 1.0 if r_a > r_b else 0.0 if r_a < r_b else 0.5
    z = max(-60.0, min(60.0, (r_a - r_b) / temperature))
    return 1.0 / (1.0 + math.exp(-z))


def select_best_and_worst(n: int, beats: Callable[[int, int], bool]) -> tuple[int, int]:
    """INPO's choice of (chosen, rejected) among candidates 0..n-1, as the authors' ``get_pref_single.py``
    (XuHuang441/Multi-player-Nash-Policy-Optimization, ``INPO_server/annotate_data``) makes it. ``beats(i, j)``
    decides a match with i as the first player; the authors' matches give ties to the first player (P >= 1/2).

    - n = 8: the knockout bracket. Winner bracket 0v1, 2v3, 4v5, 6v7, then the winners, then the final: the champion
      is chosen. The four first-round losers play a loser bracket (l1 v l2, l3 v l4, then the two losers): the last
      loser is rejected.
    - any other n: linear scans. best = 0; for i = 1..n-1: best = i if i beats best (best is the first player).
      worst = 1 if best == 0 else 0; for every other i: worst = i if worst beats i (worst is the first player).

    The caller keeps the pair only if P(chosen > rejected) > 1/2 (the authors' final check)."""
    if n < 2:
        raise ValueError("a selection needs at least 2 candidates")

    def match(i: int, j: int) -> tuple[int, int]:  # (winner, loser)
        return (i, j) if beats(i, j) else (j, i)

    if n == 8:
        firsts = [match(i, i + 1) for i in range(0, 8, 2)]
        (w1, l1), (w2, l2), (w3, l3), (w4, l4) = firsts
        best = match(match(w1, w2)[0], match(w3, w4)[0])[0]
        worst = match(match(l1, l2)[1], match(l3, l4)[1])[1]
        return best, worst
    best = 0
    for i in range(1, n):
        if not beats(best, i):
            best = i
    worst = 1 if best == 0 else 0
    for i in range(n):
        if i not in (best, worst) and beats(worst, i):
            worst = i
    return best, worst
