"""XPO: Exploratory Preference Optimization (Xie et al. 2024, arXiv 2405.21046), on the rollout engine.

Online DPO (aligntool/online/online_dpo.py) with the pair built from one policy sample y ~ pi_theta and one
reference sample y~ ~ pi_ref per prompt, labelled by the preference source (a tie goes to the policy's sample, as
TRL's XPOTrainer), and the exploration term that lowers the policy's likelihood of what the reference would say:

    L = l_DPO(pi_theta, pi_ref; y_w, y_l) + alpha * sum_t log pi_theta(y~_t | x, y~_<t)     (losses.preference.xpo_loss)

``alpha`` is a number or a list: with k values, value i applies to the i-th k-th of the iterations (TRL takes one
value per epoch). TRL's default 1e-5; the paper leaves alpha open.
"""

from __future__ import annotations

from pydantic import Field, field_validator

from aligntool.online.online_dpo import AlgoConfig as OnlineDPOConfig
from aligntool.online.online_dpo import OnlineDPO, preference_source


class AlgoConfig(OnlineDPOConfig):
    alpha: float | list[float] = Field(1e-5, description="Weight of the exploration term; a list is a schedule over "
                                       "equal parts of the iterations.")

    @field_validator("alpha")
    @classmethod
    def _alpha(cls, v):
        values = [v] if isinstance(v, (int, float)) else v
        if not values or any(a < 0 for a in values):
            raise ValueError("alpha must be >= 0 (or a non-empty list of such)")
        return v


class XPO(OnlineDPO):
    first_sample = "policy_sample"
    samples_from_reference = True  # the engine refuses ZeRO-3 / FSDP, which keep the reference partitioned

    def samples(self, engine, prompts):
        a, b = engine.sample(prompts), engine.sample(prompts, from_reference=True)
        return a.with_(logp_ref=engine.ref_logprobs(a)), b.with_(logp_ref=engine.ref_logprobs(b))

    def alpha(self, engine) -> float:
        alpha = self.cfg.alpha
        if isinstance(alpha, (int, float)):
            return float(alpha)
        part = engine.state["iteration"] * len(alpha) // max(1, engine.iterations)
        return float(alpha[min(part, len(alpha) - 1)])

    def add_terms(self, engine, per_pair, b, lp_b):
        """+ alpha * sum_t log pi_theta of the reference's sample (b): losses.preference.xpo_loss."""
        from aligntool.losses.preference import xpo_loss

        alpha = self.alpha(engine)
        return xpo_loss(per_pair, lp_b, b.mask, alpha), {"alpha": alpha,
                                                         "ref_sample_logp": lp_b.detach().sum(-1).mean().item()}


def method(run) -> XPO:
    return XPO(run.algo, preference_source(run))
