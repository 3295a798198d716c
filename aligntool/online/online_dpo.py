"""Online DPO (Guo et al. 2024, arXiv 2402.04792) on the rollout engine; XPO builds on it.

Per iteration, for each prompt x:
- online_dpo: two samples y_1, y_2 ~ pi_theta; the preference source (recipe ``reward`` section, aligntool/
  preferences.py) labels the pair; loss = a DPO-family loss (any TRL loss type, or a weighted list) on
  (chosen, rejected) with the frozen reference:            L = l_DPO(pi_theta, pi_ref; y_w, y_l)
  With hard labels (a score source, ``bt_temperature`` 0) a tie goes to the first sample, as TRL's ``>=``.
- xpo (aligntool/online/xpo.py): one sample from pi_theta and one from pi_ref, the same loss plus XPO's
  exploration term.

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

from aligntool.online.contract import MethodBase
from aligntool.recipe.base import online_config


class AlgoConfig(online_config(temperature=0.9)):  # TRL's online DPO / XPO sample at 0.9
    beta: float = Field(0.1, gt=0, description="beta of the DPO-family loss (tau for ipo).")
    loss_type: str | list[str] = Field("sigmoid", description="Any loss type of TRL's DPOTrainer, restated on sequence "
                                       "log-probs (aligntool.losses.preference.dpo_family_loss), or a list mixed by "
                                       "loss_weights.")
    loss_weights: list[float] | None = Field(None, description="Weights of a loss_type list (default: all 1).")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="epsilon of robust / exo_pair / aot / aot_unpaired "
                                   "(refused for the other losses).")
    discopop_tau: float = Field(0.05, gt=0, description="tau of the discopop loss (its paper's 0.05).")
    ipo_length_normalized: bool = Field(
        False, description="ipo: false = the IPO paper's loss on sequence log-ratios (TRL's OnlineDPO/XPO trainers); "
        "true = DPOTrainer's per-token-normalised form.")

    @field_validator("loss_type")
    @classmethod
    def _known(cls, v):
        from aligntool.trainers.dpo import check_loss_types

        return check_loss_types(v)

    @model_validator(mode="after")
    def _weights(self):
        types = [self.loss_type] if isinstance(self.loss_type, str) else self.loss_type
        if self.loss_weights is not None and len(self.loss_weights) != len(types):
            raise ValueError(f"loss_weights needs one weight per loss_type ({len(types)}), "
                             f"got {len(self.loss_weights)}")
        if "exo_pair" in types and self.label_smoothing <= 0:
            raise ValueError("exo_pair needs label_smoothing > 0 (its epsilon)")
        from aligntool.trainers.dpo import SMOOTHED_LOSSES

        if self.label_smoothing > 0 and not set(types) & set(SMOOTHED_LOSSES):
            raise ValueError(f"label_smoothing applies only to loss_type {', '.join(SMOOTHED_LOSSES)}, not {types}")
        return self

    def losses(self) -> list[tuple[str, float]]:
        types = [self.loss_type] if isinstance(self.loss_type, str) else list(self.loss_type)
        return list(zip(types, self.loss_weights or [1.0] * len(types)))


def pair_loss(cfg: AlgoConfig, lp_w, lp_l, ref_w, ref_l, len_w, len_l):
    from aligntool.losses.preference import dpo_family_loss

    return sum(w * dpo_family_loss(t, cfg.beta, lp_w, lp_l, ref_w, ref_l, len_w, len_l, cfg.label_smoothing,
                                   cfg.discopop_tau, cfg.ipo_length_normalized) for t, w in cfg.losses())


class OnlineDPO(MethodBase):
    """One iteration: two samples per prompt -> labelled by the preference source -> the DPO-family loss on
    (chosen, rejected) -> one gradient step. Subclasses change which samples are compared (``samples``) and add to
    the loss (``add_terms``), as XPO does."""

    uses_preferences = True
    updates_per_iteration = 1
    first_sample = "first_sample"  # how the stats name the first of the two samples

    def __init__(self, cfg: AlgoConfig, preferences):
        self.cfg, self.preferences = cfg, preferences

    def samples(self, engine, prompts):
        """The two samples compared per prompt, with their reference log-probs."""
        a, b = engine.samples(prompts, ["sample", "sample"])  # both samples of every pair in one generate call
        return a.with_(logp_ref=engine.ref_logprobs(a)), b.with_(logp_ref=engine.ref_logprobs(b))

    def add_terms(self, engine, per_pair, b, lp_b):
        """(the per-pair loss with the method's extra terms, their stats): none for online DPO. ``b`` is the second
        sample, ``lp_b`` its per-token log-probs under the policy, with grad."""
        return per_pair, {}

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

        from aligntool.online.ops import check_finite

        a, b = self.samples(engine, prompts)
        a_wins, prob = self.label(prompts, a, b)
        second = "reference_sample" if self.first_sample == "policy_sample" else "second_sample"
        engine.note_completions([{"prompt": x, "chosen": ya if w else yb, "rejected": yb if w else ya,
                                  "chosen_is": self.first_sample if w else second, "preference_prob": p}
                                 for x, ya, yb, w, p in zip(prompts, a.texts, b.texts, a_wins, prob)])
        win = torch.tensor(a_wins, device=a.mask.device)
        (lp_a, _), (lp_b, _) = engine.policy_logprobs(a, grad=True), engine.policy_logprobs(b, grad=True)
        a, b = a.with_(logp=lp_a.detach()), b.with_(logp=lp_b.detach())
        la, lb, ra, rb = lp_a.sum(-1), lp_b.sum(-1), a.logp_ref.sum(-1), b.logp_ref.sum(-1)
        na, nb = a.mask.sum(-1), b.mask.sum(-1)
        pick = lambda x, y: torch.where(win, x, y)  # noqa: E731
        per_pair = pair_loss(self.cfg, pick(la, lb), pick(lb, la), pick(ra, rb), pick(rb, ra), pick(na, nb),
                             pick(nb, na))
        per_pair, extra_stats = self.add_terms(engine, per_pair, b, lp_b)
        check_finite(per_pair)
        loss = per_pair.mean()
        grad_norm = engine.optimizer_step(loss)
        margin = (pick(la, lb) - pick(ra, rb)) - (pick(lb, la) - pick(rb, ra))
        return {**engine.rollout_stats(a), "loss": loss.item(), "grad_norm": grad_norm,
                "rewards/margins": self.cfg.beta * margin.mean().item(),
                "rewards/accuracies": (margin > 0).float().mean().item(),
                "preference_prob": sum(prob) / len(prob), f"{self.first_sample}_wins": float(win.float().mean()),
                **extra_stats}


def preference_source(run):
    """The recipe's preference source; a judge gives probabilities, so the missing-EOS penalty cannot apply."""
    from aligntool import models
    from aligntool.errors import UserError
    from aligntool.preferences import PreferenceSource
    from aligntool.recipe.schema import RewardConfig

    reward = run.recipe.reward or RewardConfig()
    if run.algo.missing_eos_penalty and reward.judge:
        raise UserError(f"{run.loaded.source}: algo.missing_eos_penalty applies to score sources (reward.source / "
                        "reward.ensemble); a reward.judge gives probabilities, not scores")
    return PreferenceSource(reward, seed=run.trl_config().seed, device=models.run_device())


def method(run) -> OnlineDPO:
    return OnlineDPO(run.algo, preference_source(run))
