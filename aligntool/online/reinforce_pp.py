"""REINFORCE++ (Hu 2025, "REINFORCE++: A Simple and Efficient Approach for Aligning Large Language Models", arXiv
2501.03262): REINFORCE with PPO's tricks and no critic, as OpenRLHF implements it (``--algo.advantage.estimator
reinforce`` / ``reinforce_baseline``; github.com/OpenRLHF/OpenRLHF at commit 3c3be62, files
openrlhf/trainer/ppo_utils/experience_maker.py ``compute_advantages_and_returns`` / ``get_cumulative_returns``,
openrlhf/models/utils.py ``compute_approx_kl`` / ``compute_reward``, openrlhf/models/loss.py ``PolicyLoss``,
openrlhf/trainer/ray/ppo_actor.py ``training_step``). Per iteration, ``samples_per_prompt`` responses per prompt, then
(aligntool.losses.online):

    r_i    = score_i                               (baseline: none; OpenRLHF ``reinforce``)
           = score_i - mean_{j in prompt(i)} score_j    (baseline: group; ``reinforce_baseline``, gamma must be 1)
    KL_t   = clamp(k(log pi_old(y_t) - log pi_ref(y_t)), -10, 10),   k = k1 (d) | k2 (d^2/2) | k3 (e^-d - 1 + d)
    r_t    = 1[t = T] * clip(r_i, -c, c) - kl_coef * KL_t        (kl_in: reward; KL_t = 0 with kl_in: loss)
    G_t    = sum_{s >= t} gamma^(s - t) r_s
    A_t    = (G_t - mean) / max(std, 1e-4)            mean, std over every response token of the *global* batch
    L      = -sum_t min(rho_t A_t, clip(rho_t, 1 - eps, 1 + eps) A_t) / #tokens   [+ kl_coef * mean_t KL_t(pi_theta)]

with rho_t = pi_theta(y_t) / pi_old(y_t), ``ppo_epochs`` passes over ``num_minibatches`` minibatches (one optimizer
step each; OpenRLHF: ``--train.max_epochs`` passes over minibatches of ``--train.batch_size`` sequences), token means
over the global minibatch (OpenRLHF's token-level loss). The statistics of the normalisation are summed over the
processes, so 1 process x 8 prompts and 2 x 4 normalise alike (OpenRLHF's driver holds the whole batch).

OpenRLHF's defaults, kept here: kl_coef 0.01 (``--algo.kl.init_coef``), k1 in the reward, gamma 1, eps_clip 0.2,
reward clip (-10, 10), 1 sample per prompt, std normalisation on, 1 epoch, a fixed KL coefficient. The number of
updates per rollout there is rollout.batch_size x n_samples_per_prompt / train.batch_size (8 at its argparse
defaults, 1 in its reinforce_baseline example script); here it is num_minibatches x ppo_epochs (default 1). The
paper's REINFORCE++-baseline recipe (and OpenRLHF's reinforce_baseline example script) puts the KL in the loss with
k2: ``baseline: group, samples_per_prompt: 8, kl_in: loss, kl_estimator: k2``. Not carried over: OpenRLHF's dynamic
filtering, length penalties, running reward normalisation, dual clip and vLLM importance-sampling corrections.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from aligntool.online.contract import MethodBase
from aligntool.recipe.base import online_config


class AlgoConfig(online_config()):
    kl_coef: float = Field(0.01, ge=0, description="KL weight beta (OpenRLHF --algo.kl.init_coef, default 0.01); "
                           "fixed during training.")
    kl_estimator: Literal["k1", "k2", "k3"] = Field(
        "k1", description="Per-token KL estimate of d = log pi - log pi_ref: k1 = d, k2 = d^2/2, k3 = e^-d - 1 + d "
        "(OpenRLHF --algo.kl.estimator, default k1; the paper's baseline variant uses k2 in the loss).")
    kl_in: Literal["reward", "loss"] = Field(
        "reward", description="reward: -kl_coef * KL_t in each token's reward (REINFORCE++); loss: kl_coef * the "
        "token mean of KL_t under the current policy added to the loss (OpenRLHF --algo.kl.use_loss).")
    gamma: float = Field(1.0, gt=0, le=1, description="Discount of the cumulative returns (OpenRLHF "
                         "--algo.advantage.gamma, default 1; must be 1 with baseline: group).")
    clip_range: float = Field(0.2, gt=0, description="epsilon of the clipped ratio (OpenRLHF --actor.eps_clip).")
    baseline: Literal["none", "group"] = Field(
        "none", description="none: REINFORCE++ (OpenRLHF reinforce); group: subtract the mean reward of the "
        "prompt's samples_per_prompt responses (REINFORCE++-baseline, OpenRLHF reinforce_baseline).")
    samples_per_prompt: int = Field(1, ge=1, description="Responses sampled per prompt (OpenRLHF "
                                    "--rollout.n_samples_per_prompt, default 1; >= 2 with baseline: group).")
    reward_clip: float | None = Field(10.0, gt=0, description="Clip of the (baselined) reward to [-c, c] (OpenRLHF "
                                      "--reward.clip_range, default (-10, 10)); null = none.")
    normalize_std: bool = Field(True, description="Divide the advantages by their global std (false: only subtract "
                                "the mean; OpenRLHF --algo.advantage.no_std_norm).")
    ppo_epochs: int = Field(1, ge=1, description="Passes over each rollout batch (OpenRLHF --train.max_epochs, "
                            "default 1).")
    num_minibatches: int = Field(1, ge=1, description="Minibatches per pass, one optimizer step each; must divide "
                                 "the rows per process (per_device_train_batch_size x samples_per_prompt).")

    @model_validator(mode="after")
    def _check(self):
        if self.baseline == "group" and self.samples_per_prompt < 2:
            raise ValueError("baseline group needs samples_per_prompt >= 2 (with one sample every advantage is 0)")
        if self.baseline == "group" and self.gamma != 1:
            raise ValueError("baseline group needs gamma 1 (OpenRLHF sets it for reinforce_baseline)")
        return self


class ReinforcePP(MethodBase):
    """One iteration: samples -> rewards (baselined) -> token rewards with KL -> returns -> global normalisation ->
    ppo_epochs x num_minibatches clipped updates."""

    def __init__(self, cfg: AlgoConfig):
        self.cfg = cfg
        self.updates_per_iteration = cfg.ppo_epochs * cfg.num_minibatches
        self.initial_kl_coef = cfg.kl_coef

    def step(self, engine, prompts):
        import torch

        from aligntool.losses import online as L
        from aligntool.online.asynchronous import weight as tis_weight
        from aligntool.online.ops import check_finite, minibatches, on_generated

        cfg, n = self.cfg, self.cfg.samples_per_prompt
        ro = engine.sample_groups(prompts, n)  # rows n*j .. n*j+n-1: prompt j
        ro = ro.with_(score=engine.score(ro), logp_ref=engine.ref_logprobs(ro))
        single = self.updates_per_iteration == 1
        if single:  # one update: the forward with grad also gives pi_old (rho = 1), as TRL's GRPO does
            logp_grad, _ = engine.policy_logprobs(ro, grad=True)
            ro = ro.with_(logp=logp_grad.detach())
        else:
            ro = ro.with_(logp=engine.policy_logprobs(ro)[0])
        score = L.group_baseline(ro.score, n) if cfg.baseline == "group" else ro.score
        kl_coef = engine.state["kl_coef"]
        kl = L.kl_estimate(ro.logp, ro.logp_ref, cfg.kl_estimator) if cfg.kl_in == "reward" else \
            torch.zeros_like(ro.logp)
        rewards = L.reinforce_pp_token_rewards(score, kl, ro.mask, kl_coef, cfg.reward_clip)
        returns = on_generated(ro.mask, L.discounted_returns, rewards, ro.mask, cfg.gamma)  # tool replies: no steps
        adv = L.global_normalize(returns, ro.mask, engine.all_sum, cfg.normalize_std)
        check_finite(adv)
        if (w := tis_weight(engine, ro)) is not None:  # an asynchronous rollout: truncated importance weights
            adv = adv * w
        gen = torch.Generator().manual_seed(engine.state["iteration"])
        rows = len(ro.texts)
        size = rows // cfg.num_minibatches
        stats = {k: torch.zeros((), device=adv.device) for k in ("policy_loss", "kl_loss", "clipfrac")}
        for _ in range(cfg.ppo_epochs):
            for idx in ([torch.arange(rows)] if single else minibatches(rows, size, gen)):
                mb = ro if single else ro.select(idx)
                logp = logp_grad if single else engine.policy_logprobs(mb, grad=True)[0]
                tokens = engine.token_denominator(mb.mask)  # token means over the global minibatch
                pl, cf = L.ppo_policy_loss(logp, mb.logp, adv[idx], mb.mask, cfg.clip_range, denom=tokens)
                loss = pl
                if cfg.kl_in == "loss":
                    kl_loss = L.masked_mean(L.kl_estimate(logp, mb.logp_ref, cfg.kl_estimator), mb.mask,
                                            denom=tokens)
                    loss = pl + kl_coef * kl_loss
                    stats["kl_loss"] += kl_loss.detach()
                engine.optimizer_step(loss)
                stats["policy_loss"] += pl.detach()
                stats["clipfrac"] += cf.detach()
        out = {**engine.rollout_stats(ro), **{k: (v / self.updates_per_iteration).item() for k, v in stats.items()},
               "return": (returns[:, 0]).mean().item(), "advantage_abs": (adv.abs().sum() / ro.mask.sum()).item()}
        if cfg.baseline == "group":
            out["group_reward_std"] = ro.score.reshape(-1, n).std(-1).mean().item()
        if cfg.kl_in == "reward":
            out.pop("kl_loss")
        return out


def method(run) -> ReinforcePP:
    from aligntool.errors import UserError

    cfg = run.algo
    batch = getattr(run.recipe.train, "per_device_train_batch_size", None) or 8  # TrainingArguments' default
    if (batch * cfg.samples_per_prompt) % cfg.num_minibatches:
        raise UserError(f"{run.loaded.source}: algo.num_minibatches: {cfg.num_minibatches} does not divide the "
                        f"{batch * cfg.samples_per_prompt} rows per process (train.per_device_train_batch_size "
                        f"{batch} x algo.samples_per_prompt {cfg.samples_per_prompt})")
    return ReinforcePP(cfg)
