"""Preference sources: who says which of two completions of a prompt is better (online DPO, XPO, INPO).

From the recipe's ``reward`` section:
- a score source (``source: gold`` / a reward-model folder / ``module:function``, or an ``ensemble``): P(a > b) =
  sigmoid((r_a - r_b) / bt_temperature), or 1 / 1/2 / 0 by the higher score when ``bt_temperature`` is 0;
- ``judge: module:function``: fn(prompts, completions_a, completions_b) returns P(a > b) for each pair.

Every label is a draw from Bernoulli(P) (so a soft judge or a Bradley-Terry temperature gives noisy labels, and
ties are coin flips); ``probabilities`` gives P itself (INPO's final check keeps a pair only if P > 1/2).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable

from aligntool.errors import UserError
from aligntool.recipe.schema import RewardConfig

Judge = Callable[[list[str], list[str], list[str]], list[float]]


class PreferenceSource:
    def __init__(self, config: RewardConfig, seed: int = 0):
        from aligntool import rewards

        self.config, self.rng = config, random.Random(seed)
        self.scorer = None if config.judge else rewards.load(config)
        self.judge = rewards.function_scorer(config.judge, key="reward.judge") if config.judge else None

    def scores(self, prompts: list[str], completions: list[str]) -> list[float] | None:
        """Scores when the source has them (best-vs-worst pairing needs them), else None."""
        return self.scorer(prompts, completions) if self.scorer else None

    def probabilities(self, prompts: list[str], a: list[str], b: list[str]) -> list[float]:
        if self.judge is not None:
            p = list(self.judge(prompts, a, b))
            if len(p) != len(a) or not all(isinstance(x, (int, float)) and 0.0 <= x <= 1.0 for x in p):
                bad = next((x for x in p if not (isinstance(x, (int, float)) and 0.0 <= x <= 1.0)), None)
                raise UserError(f"reward.judge: {self.config.judge} returned {len(p)} values for {len(a)} pairs"
                                + (f" (e.g. {bad!r})" if bad is not None else "") + "; expected one P(a > b) in [0, 1] each")
            return [float(x) for x in p]
        ra, rb = self.scorer(prompts, a), self.scorer(prompts, b)
        return [bt_probability(x, y, self.config.bt_temperature) for x, y in zip(ra, rb)]

    def prefer(self, prompts: list[str], a: list[str], b: list[str]) -> tuple[list[bool], list[float]]:
        """(a wins?, P(a > b)) for each pair; the label is drawn from Bernoulli(P)."""
        p = self.probabilities(prompts, a, b)
        return [self.rng.random() < x if 0.0 < x < 1.0 else x == 1.0 for x in p], p


def bt_probability(r_a: float, r_b: float, temperature: float) -> float:
    if temperature <= 0:
        return 1.0 if r_a > r_b else 0.0 if r_a < r_b else 0.5
    z = max(-60.0, min(60.0, (r_a - r_b) / temperature))
    return 1.0 / (1.0 + math.exp(-z))


def knockout(n: int, beats: Callable[[int, int], bool]) -> tuple[int, int]:
    """INPO's knockout tournament over candidates 0..n-1 -> (chosen, rejected): the winner bracket pairs 0v1, 2v3, ...
    round by round to the champion; the losers of the first round play a loser bracket (the loser of each match goes
    on) down to the worst. An odd one out gets a bye. ``beats(i, j)`` decides a match."""
    def bracket(players: list[int], winner_goes_on: bool) -> tuple[int, list[int]]:
        first_losers = []
        rnd = 0
        while len(players) > 1:
            nxt = []
            for k in range(0, len(players) - 1, 2):
                i, j = players[k], players[k + 1]
                win, lose = (i, j) if beats(i, j) else (j, i)
                nxt.append(win if winner_goes_on else lose)
                if rnd == 0:
                    first_losers.append(lose)
            if len(players) % 2:
                nxt.append(players[-1])
            players, rnd = nxt, rnd + 1
        return players[0], first_losers

    if n < 2:
        raise ValueError("a tournament needs at least 2 candidates")
    champion, losers = bracket(list(range(n)), True)
    worst, _ = bracket(losers, False) if len(losers) > 1 else (losers[0], [])
    return champion, worst
