"""DPO and every loss TRL's DPOTrainer implements (Rafailov et al. 2023, arXiv 2305.18290):

    L = -log sigmoid(beta * [(log pi(y_w|x) - log pi_ref(y_w|x)) - (log pi(y_l|x) - log pi_ref(y_l|x))])

``loss_type`` picks the loss (``ipo``, ``hinge`` = SLiC, ``robust``, ``sppo_hard``, ...); a list of loss types with
``loss_weights`` mixes them, e.g. RPO = ``[sigmoid, sft]`` with weights ``[1, alpha]`` (Liu et al. 2024).
``f_divergence_type`` swaps the reverse-KL regulariser for another f-divergence (f-DPO, Wang et al. 2023).
The math is TRL's; this module only exposes and checks its knobs.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from aligntool.recipe.schema import Strict

LOSS_TYPES = (
    "sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot", "aot_unpaired",
    "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm",
)
# TRL accepts a non-default f-divergence only with losses built on the chosen-rejected reward difference.
F_DIVERGENCE_LOSSES = ("sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft")


class AlgoConfig(Strict):
    beta: float = Field(0.1, gt=0, description="KL strength (tau for IPO): higher keeps the policy nearer the reference.")
    loss_type: str | list[str] = Field("sigmoid", description=f"One of {', '.join(LOSS_TYPES)}, or a list of them.")
    loss_weights: list[float] | None = Field(None, description="Weights of a loss_type list (default: all 1).")
    f_divergence_type: Literal["reverse_kl", "forward_kl", "js_divergence", "alpha_divergence"] = "reverse_kl"
    f_alpha_divergence_coef: float = Field(0.5, gt=0, lt=1, description="alpha of the alpha-divergence (f-DPO).")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="Flip probability for robust DPO; epsilon for EXO.")
    use_weighting: bool = Field(False, description="WPO weighting of pairs by their length-normalised probability.")
    ld_alpha: float | None = Field(None, ge=0, le=1, description="LD-DPO weight of the verbose part of responses.")
    discopop_tau: float = Field(0.05, gt=0)
    precompute_ref_log_probs: bool = Field(False, description="Score the data with the reference once, before training.")

    @model_validator(mode="after")
    def _check(self):
        types = [self.loss_type] if isinstance(self.loss_type, str) else list(self.loss_type)
        for t in types:
            if t not in LOSS_TYPES:
                raise ValueError(f"loss_type {t!r} is not one of {', '.join(LOSS_TYPES)}")
        if self.loss_weights is not None and len(self.loss_weights) != len(types):
            raise ValueError(f"loss_weights has {len(self.loss_weights)} entries for {len(types)} loss types")
        if self.f_divergence_type != "reverse_kl":
            bad = [t for t in types if t not in F_DIVERGENCE_LOSSES]
            if bad:
                raise ValueError(f"f_divergence_type {self.f_divergence_type!r} does not apply to loss_type {bad}")
        return self


def build(run):
    from trl import DPOTrainer

    return DPOTrainer(
        model=run.policy(),
        ref_model=run.reference(),
        args=run.trl_config(),
        train_dataset=run.train_dataset,
        eval_dataset=run.eval_dataset,
        processing_class=run.tokenizer,
    )
