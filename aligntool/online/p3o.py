"""P3O: Pairwise Proximal Policy Optimization (Wu et al. 2023, arXiv 2310.00212); no critic, trajectory-wise.

Two responses per prompt from the current policy; their rewards r_i = score_i - kl_coef * KL-penalty(y_i), with the
sequence log-ratio log pi(y_i|x) - log pi_ref(y_i|x) as penalty; then ``ppo_epochs`` passes of the clipped pairwise
surrogate (aligntool.losses.online.p3o_loss) on whole-sequence ratios rho_i = pi(y_i)/pi_old(y_i):
``variant: separate`` (V1, each response clipped on its own) or ``joint`` (V2, the ratio rho_1/rho_2 clipped; our
reconstruction, see the loss docstring). The gradient only sees r1 - r2, so it is invariant to a per-prompt shift of
the reward.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from aligntool.online.contract import MethodBase
from aligntool.recipe.base import online_config


class AlgoConfig(online_config()):
    kl_coef: float = Field(0.05, ge=0, description="beta of the sequence-level KL penalty in the reward.")
    clip_range: float = Field(0.2, gt=0, description="epsilon of the clipped surrogate.")
    variant: Literal["separate", "joint"] = Field("separate", description="V1 (separate) or V2 (joint) clipping.")
    ppo_epochs: int = Field(2, ge=1, description="Passes (optimizer steps) over each rollout batch.")


class P3O(MethodBase):
    def __init__(self, cfg: AlgoConfig):
        self.cfg = cfg
        self.updates_per_iteration = cfg.ppo_epochs
        self.initial_kl_coef = cfg.kl_coef

    def step(self, engine, prompts):
        from aligntool.losses.online import p3o_loss
        from aligntool.online.asynchronous import weight as tis_weight
        from aligntool.online.ops import sequence_kl

        cfg = self.cfg
        ro = engine.rollout(prompts, per_prompt=2)  # a group of 2 per prompt: rows 2i and 2i+1 share prompt i
        reward = ro.score - cfg.kl_coef * sequence_kl(ro)
        w = tis_weight(engine, ro, group=2)  # an asynchronous rollout: the pair's truncated sequence weight
        losses = []
        for _ in range(cfg.ppo_epochs):
            logp, _ = engine.policy_logprobs(ro, grad=True)
            seq = ((logp - ro.logp) * ro.mask).sum(-1)  # log rho_i
            loss = p3o_loss(seq[0::2], seq[1::2], reward[0::2], reward[1::2], cfg.clip_range, cfg.variant)
            loss = (loss if w is None else loss * w).mean()
            engine.optimizer_step(loss)
            losses.append(loss.item())
        return {**engine.rollout_stats(ro), "loss": sum(losses) / len(losses),
                "reward_gap": (reward[0::2] - reward[1::2]).abs().mean().item()}


def method(run) -> P3O:
    return P3O(run.algo)
