"""PPO for RLHF (Schulman et al. 2017; Ziegler et al. 2019; Ouyang et al. 2022), on aligntool's rollout engine.

Per iteration: roll out one response per prompt; per-token rewards are -kl_coef * (log pi - log pi_ref) on every
token plus the reward-source score on the last one; a value head on the policy's last hidden state (shared backbone)
(or on a separate critic copy, ``critic: separate``) gives V_t; GAE(gamma, lam) gives advantages (whitened) and
returns; then ``ppo_epochs`` passes over ``num_minibatches`` minibatches minimise

    L = -mean_t min(rho_t A_t, clip(rho_t, 1 - eps, 1 + eps) A_t)
        + vf_coef * 0.5 * mean_t max((V - R)^2, (V_clip - R)^2)

and the adaptive KL controller moves kl_coef toward ``kl_target`` (null = fixed coefficient).
Defaults follow Coste et al.'s trlx config (gamma 1, lam 0.95, clip 0.2, 4 epochs, init KL 0.1, target 6).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from aligntool.online.contract import MethodBase
from aligntool.recipe.base import online_config


class AlgoConfig(online_config()):
    kl_coef: float = Field(0.1, ge=0, description="Initial KL coefficient.")
    kl_target: float | None = Field(6.0, gt=0, description="Target sequence KL of the adaptive controller; "
                                    "null = fixed.")
    kl_horizon: int = Field(10000, gt=0, description="Horizon (samples) of the adaptive controller.")
    gamma: float = Field(1.0, gt=0, le=1, description="Discount of GAE (trlx: 1).")
    lam: float = Field(0.95, ge=0, le=1, description="GAE lambda.")
    clip_range: float = Field(0.2, gt=0, description="epsilon of the clipped policy ratio.")
    clip_range_value: float = Field(0.2, gt=0, description="epsilon of the clipped value update.")
    vf_coef: float = Field(0.1, ge=0, description="Weight of the value loss.")
    ppo_epochs: int = Field(4, ge=1, description="Passes over each rollout batch.")
    num_minibatches: int = Field(1, ge=1, description="Minibatches per pass (one optimizer step each).")
    whiten_advantages: bool = Field(True, description="Normalise advantages to zero mean, unit variance per batch.")
    critic: Literal["shared", "separate"] = Field(
        "shared", description="Value head on the policy's backbone (shared) or on a separate copy of it (separate).")


class PPO(MethodBase):
    """One iteration: rollout with values -> KL-penalised per-token rewards -> GAE -> ppo_epochs x minibatches of
    clipped policy and value updates -> adaptive KL coefficient."""

    value_head = True

    def __init__(self, cfg: AlgoConfig):
        self.cfg = cfg
        self.critic = cfg.critic
        self.initial_kl_coef = cfg.kl_coef  # adapted toward kl_target (step 5)
        self.updates_per_iteration = cfg.ppo_epochs * cfg.num_minibatches

    def step(self, engine, prompts):
        import torch

        from aligntool.losses import online as L
        from aligntool.online.asynchronous import weight as tis_weight
        from aligntool.online.ops import check_finite, minibatches, on_generated, sequence_kl

        cfg = self.cfg
        # 1. rollout: responses, their scores, log-probs and values at the sampling policy, reference log-probs
        ro = engine.rollout(prompts)
        # 2. rewards: -kl_coef * log-ratio on every token, + the score on the last one
        kl_coef = engine.state["kl_coef"]
        rewards = L.kl_penalised_rewards(ro.score, ro.logp, ro.logp_ref, ro.mask, kl_coef)
        # 3. advantages and returns by GAE, advantages whitened
        adv, returns = on_generated(ro.mask, L.gae, rewards, ro.values, ro.mask, cfg.gamma, cfg.lam)  # over generated
        # tokens only: a tool reply is no step of the MDP (aligntool.online.ops.on_generated)
        if cfg.whiten_advantages:
            adv = L.whiten(adv, ro.mask, all_sum=engine.all_sum)  # over the global batch
        check_finite(adv, returns)
        if (w := tis_weight(engine, ro)) is not None:  # an asynchronous rollout: truncated importance weights
            adv = adv * w
        # 4. ppo_epochs passes over minibatches: clipped policy loss + vf_coef * clipped value loss
        gen = torch.Generator().manual_seed(engine.state["iteration"])
        size = max(1, len(prompts) // cfg.num_minibatches)
        stats = {k: torch.zeros((), device=adv.device) for k in ("policy_loss", "value_loss", "clipfrac",
                                                                   "value_clipfrac")}
        n = 0
        for _ in range(cfg.ppo_epochs):
            for idx in minibatches(len(prompts), size, gen):
                mb = ro.select(idx)
                logp, values = engine.policy_logprobs(mb, grad=True)
                tokens = engine.token_denominator(mb.mask)  # token means over the global minibatch
                pl, cf = L.ppo_policy_loss(logp, mb.logp, adv[idx], mb.mask, cfg.clip_range, denom=tokens)
                vl, vcf = L.ppo_value_loss(values, mb.values, returns[idx], mb.mask, cfg.clip_range_value,
                                           denom=tokens)
                engine.optimizer_step(pl + cfg.vf_coef * vl)
                for k, v in (("policy_loss", pl), ("value_loss", vl), ("clipfrac", cf), ("value_clipfrac", vcf)):
                    stats[k] += v.detach()  # read once per iteration: no host sync per minibatch on a GPU
                n += 1
        # 5. the adaptive KL controller moves kl_coef toward kl_target
        kl = engine.global_mean(sequence_kl(ro))  # every process moves kl_coef alike
        controller = L.AdaptiveKL(kl_coef, cfg.kl_target, cfg.kl_horizon)
        engine.state["kl_coef"] = controller.update(kl, len(prompts) * engine.world)
        return {**engine.rollout_stats(ro), **{k: (v / n).item() for k, v in stats.items()},
                "value_mean": ro.values.sum().item() / ro.mask.sum().item()}


def method(run) -> PPO:
    return PPO(run.algo)
