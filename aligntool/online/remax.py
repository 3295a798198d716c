"""ReMax (Li et al. 2023, arXiv 2310.10505): REINFORCE with the greedy response's reward as baseline; no critic.

Per prompt: one sampled response y ~ pi and one greedy response y_greedy. With the official code's returns
(aligntool.losses.online.remax_returns):

    R_t = kl_coef * (log pi_ref(y_t) - log pi(y_t)) + clip(r(x, y) - r(x, y_greedy), -c, c) * gamma^(T - t)
    L   = -sum_t R_t log pi(y_t | x, y_<t) / #tokens

Defaults are those of the shipped training scripts (kl_coef 0.05, gamma 0.99, clip 5, top_p 0.9); the argparse
defaults of the same code differ (gamma 0.95, kl 0.1). ``gamma: 1, kl_coef: 0, reward_clip: null`` is the paper's
plain form.
"""

from __future__ import annotations

from pydantic import Field

from aligntool.online.contract import MethodBase
from aligntool.recipe.base import online_config


class AlgoConfig(online_config(top_p=0.9)):  # the official scripts sample with top_p 0.9
    kl_coef: float = Field(0.05, ge=0, description="Per-token KL weight in the returns (official scripts: 0.05).")
    gamma: float = Field(0.99, gt=0, le=1, description="Discount of the reward difference toward early tokens.")
    reward_clip: float | None = Field(5.0, gt=0, description="Clip of r(y) - r(y_greedy); null = none.")


class ReMax(MethodBase):
    updates_per_iteration = 1

    def __init__(self, cfg: AlgoConfig):
        self.cfg = cfg
        self.initial_kl_coef = cfg.kl_coef

    def step(self, engine, prompts):
        from aligntool.losses.online import remax_loss, remax_returns
        from aligntool.online.asynchronous import weight as tis_weight
        from aligntool.online.ops import on_generated

        cfg = self.cfg
        ro, greedy = engine.samples(prompts, ["sample", "greedy"])  # one generate call; greedy is the baseline
        ro = ro.with_(score=engine.score(ro), logp_ref=engine.ref_logprobs(ro))
        greedy_score = engine.score(greedy)  # only the baseline's reward is used
        logp, _ = engine.policy_logprobs(ro, grad=True)  # one policy forward; its detached values enter the KL term
        ro = ro.with_(logp=logp.detach())
        returns = on_generated(ro.mask, remax_returns, ro.logp, ro.logp_ref, ro.mask, ro.score, greedy_score,
                               cfg.kl_coef, cfg.gamma, cfg.reward_clip)  # the discount over generated tokens only
        if (w := tis_weight(engine, ro)) is not None:  # an asynchronous rollout: truncated importance weights
            returns = returns * w
        loss = remax_loss(logp, returns, ro.mask, denom=engine.token_denominator(ro.mask))
        grad_norm = engine.optimizer_step(loss)
        return {**engine.rollout_stats(ro), "loss": loss.item(), "greedy_reward": greedy_score.mean().item(),
                "advantage": (ro.score - greedy_score).mean().item(), "grad_norm": grad_norm}


def method(run) -> ReMax:
    return ReMax(run.algo)
