"""Online DPO (Guo et al. 2024, arXiv 2402.04792) and XPO (Xie et al. 2024, arXiv 2405.21046) on the rollout engine.

Per iteration, for each prompt x:
- online_dpo: two samples y_1, y_2 ~ pi_theta; the preference source (recipe ``reward`` section, aligntool/
  preferences.py) labels the pair; loss = a DPO-family loss (any TRL loss type, or a weighted list) on
  (chosen, rejected) with the frozen reference:            L = l_DPO(pi_theta, pi_ref; y_w, y_l)
  With hard labels (a score source, ``bt_temperature`` 0) a tie goes to the first sample, as TRL's ``>=``.
- xpo: one sample y ~ pi_theta and one y~ ~ pi_ref; labelled the same way; the exploration term lowers the policy's
  likelihood of the reference's sample:                    L = l_DPO(...) + alpha * sum_t log pi_theta(y~_t | x, y~_<t)
  ``alpha`` is a number or a list: with k values, value i applies to the i-th k-th of the iterations (TRL takes one
  value per epoch). TRL's default 1e-5; the paper leaves alpha open.

Conventions, as TRL's OnlineDPOTrainer / XPOTrainer: ``ipo`` is the IPO paper's loss on sequence log-ratios,
(delta - 1/(2 beta))^2 (eq. 17 of Azar et al. 2023); ``ipo_length_normalized: true`` gives DPOTrainer's per-token form.
``sft`` is the token mean of the chosen NLL over the batch. ``missing_eos_penalty`` lowers the preference score of a
sample cut off before EOS before the pair is labelled (score sources only; a judge gives no score).
``label_smoothing`` is the epsilon of robust / exo_pair / aot / aot_unpaired and is refused for the other losses.

The losses are aligntool.losses.preference.dpo_family_loss / xpo_loss; the samples' log-probs under pi_ref come from
the rollout (one reference forward), those under pi_theta from one forward with grad, so each iteration is one
gradient step (``updates_per_iteration``) on ``per_device_train_batch_size`` pairs per process.
"""

from __future__ import annotations

from pydantic import Field, field_validator, model_validator

from aligntool.online.engine import OnlineConfig


class AlgoConfig(OnlineConfig):
    beta: float = Field(0.1, gt=0, description="beta of the DPO-family loss (tau for ipo).")
    loss_type: str | list[str] = Field("sigmoid", description="Any TRL DPO loss type, or a list mixed by loss_weights.")
    loss_weights: list[float] | None = Field(None, description="Weights of a loss_type list (default: all 1).")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="epsilon of robust / exo_pair / aot / aot_unpaired "
                                   "(refused for the other losses).")
    discopop_tau: float = Field(0.05, gt=0)
    ipo_length_normalized: bool = Field(
        False, description="ipo: false = the IPO paper's loss on sequence log-ratios (TRL's OnlineDPO/XPO trainers); "
        "true = DPOTrainer's per-token-normalised form.")
    temperature: float = Field(0.9, gt=0, description="Sampling temperature (TRL's online DPO / XPO default 0.9).")
    max_new_tokens: int = Field(48, gt=0)

    @field_validator("loss_type")
    @classmethod
    def _known(cls, v):
        from aligntool.losses.preference import DPO_LOSS_TYPES

        for t in [v] if isinstance(v, str) else v:
            if t not in DPO_LOSS_TYPES:
                raise ValueError(f"unknown loss type {t!r}; expected one of {', '.join(DPO_LOSS_TYPES)}")
        return v

    @model_validator(mode="after")
    def _weights(self):
        types = [self.loss_type] if isinstance(self.loss_type, str) else self.loss_type
        if self.loss_weights is not None and len(self.loss_weights) != len(types):
            raise ValueError(f"loss_weights needs one weight per loss_type ({len(types)}), got {len(self.loss_weights)}")
        if "exo_pair" in types and self.label_smoothing <= 0:
            raise ValueError("exo_pair needs label_smoothing > 0 (its epsilon)")
        from aligntool.trainers.dpo import SMOOTHED_LOSSES

        if self.label_smoothing > 0 and not set(types) & set(SMOOTHED_LOSSES):
            raise ValueError(f"label_smoothing applies only to loss_type {', '.join(SMOOTHED_LOSSES)}, not {types}")
        return self

    def losses(self) -> list[tuple[str, float]]:
        types = [self.loss_type] if isinstance(self.loss_type, str) else list(self.loss_type)
        return list(zip(types, self.loss_weights or [1.0] * len(types)))


class XPOConfig(AlgoConfig):
    alpha: float | list[float] = Field(1e-5, description="Weight of the exploration term; a list is a schedule over "
                                       "equal parts of the iterations.")

    @field_validator("alpha")
    @classmethod
    def _alpha(cls, v):
        values = [v] if isinstance(v, (int, float)) else v
        if not values or any(a < 0 for a in values):
            raise ValueError("alpha must be >= 0 (or a non-empty list of such)")
        return v


def pair_loss(cfg: AlgoConfig, lp_w, lp_l, ref_w, ref_l, len_w, len_l):
    from aligntool.losses.preference import dpo_family_loss

    return sum(w * dpo_family_loss(t, cfg.beta, lp_w, lp_l, ref_w, ref_l, len_w, len_l, cfg.label_smoothing,
                                   cfg.discopop_tau, cfg.ipo_length_normalized) for t, w in cfg.losses())


class OnlineDPO:
    uses_preferences = True
    updates_per_iteration = 1
    explore = False

    def __init__(self, cfg: AlgoConfig, preferences):
        self.cfg, self.preferences = cfg, preferences

    def samples(self, engine, prompts):
        """The two rollouts compared per prompt."""
        return (engine.rollout(prompts, score=False, policy_logp=False),
                engine.rollout(prompts, score=False, policy_logp=False))

    def alpha(self, engine) -> float:
        return 0.0

    def label(self, prompts, a, b) -> tuple[list[bool], list[float]]:
        """(first sample wins?, P(first > second)) per prompt; ``missing_eos_penalty`` lowers the preference score
        of a sample cut off before EOS (TRL: ``rewards[~contain_eos_token] -= missing_eos_penalty``)."""
        penalty = self.cfg.missing_eos_penalty
        if not penalty:
            return self.preferences.prefer(prompts, a.texts, b.texts)
        pa, pb = ([penalty * float(m) for m in ro.missing_eos.tolist()] for ro in (a, b))
        return self.preferences.prefer(prompts, a.texts, b.texts, pa, pb)

    def step(self, engine, prompts):
        import torch

        from aligntool.losses.preference import xpo_loss
        from aligntool.online.engine import check_finite

        a, b = self.samples(engine, prompts)
        a_wins, prob = self.label(prompts, a, b)
        win = torch.tensor(a_wins, device=a.mask.device)
        lp_a, lp_b = engine.forward_with_grad(a), engine.forward_with_grad(b)
        seq = lambda lp, ro: (lp * ro.mask).sum(-1)  # noqa: E731
        la, lb, ra, rb = seq(lp_a, a), seq(lp_b, b), a.logp_ref.sum(-1), b.logp_ref.sum(-1)
        na, nb = a.mask.sum(-1), b.mask.sum(-1)
        pick = lambda x, y: torch.where(win, x, y)  # noqa: E731
        per_pair = pair_loss(self.cfg, pick(la, lb), pick(lb, la), pick(ra, rb), pick(rb, ra), pick(na, nb), pick(nb, na))
        alpha = self.alpha(engine)
        if self.explore:  # b is the reference's sample
            per_pair = xpo_loss(per_pair, lp_b, b.mask, alpha)
        check_finite(per_pair)
        loss = per_pair.mean()
        grad_norm = engine.optimizer_step(loss)
        margin = (pick(la, lb) - pick(ra, rb)) - (pick(lb, la) - pick(rb, ra))
        stats = {**engine.rollout_stats(a), "loss": loss.item(), "grad_norm": grad_norm,
                 "rewards/margins": self.cfg.beta * margin.mean().item(),
                 "rewards/accuracies": (margin > 0).float().mean().item(),
                 "preference_prob": sum(prob) / len(prob), "first_sample_wins": float(win.float().mean())}
        if self.explore:
            stats.update(alpha=alpha, ref_sample_logp=lb.mean().item(), policy_sample_wins=stats.pop("first_sample_wins"))
        return stats


class XPO(OnlineDPO):
    explore = True

    def samples(self, engine, prompts):
        return (engine.rollout(prompts, score=False, policy_logp=False),
                engine.rollout(prompts, score=False, from_reference=True, policy_logp=False))

    def alpha(self, engine) -> float:
        alpha = self.cfg.alpha
        if isinstance(alpha, (int, float)):
            return float(alpha)
        part = engine.state["iteration"] * len(alpha) // max(1, engine.iterations)
        return float(alpha[min(part, len(alpha) - 1)])


def pipeline(run) -> dict:
    from aligntool import models
    from aligntool.online.engine import Engine
    from aligntool.preferences import PreferenceSource
    from aligntool.recipe.schema import RewardConfig

    from aligntool.errors import UserError

    method = XPO if isinstance(run.algo, XPOConfig) else OnlineDPO
    reward = run.recipe.reward or RewardConfig()
    if run.algo.missing_eos_penalty and reward.judge:
        raise UserError(f"{run.loaded.source}: algo.missing_eos_penalty applies to score sources (reward.source / "
                        "reward.ensemble); a reward.judge gives probabilities, not scores")
    preferences = PreferenceSource(reward, seed=run.trl_config().seed, device=models.run_device())
    return Engine(run, method(run.algo, preferences)).train()
