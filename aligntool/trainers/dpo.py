"""DPO and every loss TRL's DPOTrainer implements (Rafailov et al. 2023, arXiv 2305.18290):

    L = -log sigmoid(beta * [(log pi(y_w|x) - log pi_ref(y_w|x)) - (log pi(y_l|x) - log pi_ref(y_l|x))])

``loss_type`` picks the loss (``ipo``, ``hinge`` = SLiC, ``robust``, ``sppo_hard``, ...); a list of loss types with
``loss_weights`` mixes them, e.g. RPO = ``[sigmoid, sft]`` with weights ``[1, alpha]`` (Liu et al. 2024).
``f_divergence_type`` swaps the reverse-KL regulariser for another f-divergence (f-DPO, Wang et al. 2023).
The math is TRL's; this module only exposes and checks its knobs.

Named variants (registry names with a preset ``algo``): ``ipo``, ``slic`` (hinge), ``robust_dpo`` (robust, with
label flip rate ``label_smoothing``), ``sppo_hard``, ``fdpo`` (``f_divergence_type``), ``rpo`` ([sigmoid, sft]).

Two conventions, stated because papers and reimplementations differ:
- f-DPO alpha: ``f_alpha`` is the *paper's* alpha, f'(u) = (1 - u^-alpha)/alpha (alpha -> 0: reverse KL, 1: forward
  KL). TRL 1.x's ``f_alpha_divergence_coef`` is 1 - alpha (TRL <= 0.26 used alpha itself); we convert.
- RPO: TRL's ``sft`` term is the token-mean NLL of the chosen responses, weighted by its ``loss_weights`` entry
  (= the paper's eta). The paper's Algorithm 2 scales a sequence-level NLL by eta*beta; to match it, set the weight to
  eta*beta times the mean chosen length. We keep TRL's form: it is what TRL users' RPO numbers mean.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from aligntool.recipe.base import Strict
from aligntool.trainers.base import trl_lists


def check_loss_types(value: str | list[str]) -> str | list[str]:
    """A validator: each named loss type must be one of TRL's DPO loss types."""
    return trl_lists.check(value, trl_lists.dpo_loss_types)


# TRL accepts a non-default f-divergence only with losses built on the chosen-rejected reward difference.
SMOOTHED_LOSSES = ("robust", "exo_pair", "aot", "aot_unpaired")
F_DIVERGENCE_LOSSES = ("sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft")


class AlgoConfig(Strict):
    beta: float = Field(0.1, gt=0, description="KL strength (tau for IPO): higher keeps the policy nearer the "
                        "reference.")
    loss_type: str | list[str] = Field("sigmoid", description="Any loss type of TRL's DPOTrainer (sigmoid, hinge, ipo, "
                                       "robust, sppo_hard, aot, apo_zero, discopop, sft, ...), or a list of them.")
    loss_weights: list[float] | None = Field(None, description="Weights of a loss_type list (default: all 1).")
    f_divergence_type: Literal["reverse_kl", "forward_kl", "js_divergence", "alpha_divergence"] = Field(
        "reverse_kl", description="f-DPO: the divergence regularising the policy toward the reference.")
    f_alpha: float | None = Field(
        None, gt=0, lt=1, description="The f-DPO paper's alpha of the alpha-divergence (default 0.5); "
        "TRL's coef = 1 - alpha."
    )
    label_smoothing: float = Field(
        0.0, ge=0, lt=0.5, description="Label flip rate epsilon: robust DPO, EXO and AOT losses only."
    )
    use_weighting: bool = Field(False, description="WPO weighting of pairs by their length-normalised probability.")
    ld_alpha: float | None = Field(None, ge=0, le=1, description="LD-DPO weight of the verbose part of responses.")
    discopop_tau: float | None = Field(None, gt=0, description="DiscoPOP temperature (loss_type discopop only).")
    precompute_ref_log_probs: bool = Field(False, description="Score the data with the reference once, "
                                           "before training.")

    @model_validator(mode="after")
    def _check(self):
        types = [self.loss_type] if isinstance(self.loss_type, str) else list(self.loss_type)
        check_loss_types(types)
        if self.loss_weights is not None and len(self.loss_weights) != len(types):
            raise ValueError(f"loss_weights has {len(self.loss_weights)} entries for {len(types)} loss types")
        if self.f_divergence_type != "reverse_kl":
            bad = [t for t in types if t not in F_DIVERGENCE_LOSSES]
            if bad:
                raise ValueError(f"f_divergence_type {self.f_divergence_type!r} does not apply to loss_type {bad}")
        if self.f_alpha is not None and self.f_divergence_type != "alpha_divergence":
            raise ValueError("f_alpha applies only with f_divergence_type: alpha_divergence")
        if self.label_smoothing > 0 and not set(types) & set(SMOOTHED_LOSSES):
            raise ValueError(f"label_smoothing applies only to loss_type {', '.join(SMOOTHED_LOSSES)}")
        if self.discopop_tau is not None and "discopop" not in types:
            raise ValueError("discopop_tau applies only to loss_type discopop")
        return self

    trl_fields = ("beta", "loss_type", "loss_weights", "f_divergence_type", "label_smoothing", "use_weighting",
                  "ld_alpha", "discopop_tau", "precompute_ref_log_probs")

    def trl_extra(self) -> dict:
        if self.f_divergence_type != "alpha_divergence":
            return {}
        from aligntool.losses.preference import f_alpha_to_trl_coef

        return {"f_alpha_divergence_coef": f_alpha_to_trl_coef(0.5 if self.f_alpha is None else self.f_alpha)}


def build(run):
    from aligntool.trainers.dpo_trainer import DPOTrainer

    return DPOTrainer(model=run.policy(), ref_model=run.reference(), args=run.trl_config(),
                      train_dataset=run.train_dataset, eval_dataset=run.eval_dataset, processing_class=run.tokenizer,
                      peft_config=run.peft_config())
