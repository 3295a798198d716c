"""CPO and SimPO: reference-free preference losses on the policy's own log-probabilities, through TRL's
``trl.experimental.cpo.CPOTrainer``.

CPO (Xu, Sharaf, Chen, Tan, Shen, Van Durme, Murray and Kim 2024, "Contrastive Preference Optimization: Pushing the
Boundaries of LLM Performance in Machine Translation", ICML 2024, arXiv 2401.08417, Eq. 3 and Sec. 3; authors' code:
github.com/fe1ixxu/ALMA), DPO with a uniform reference plus behaviour cloning on the chosen responses:

    L = -log sigmoid( beta (log pi(y_w|x) - log pi(y_l|x)) ) + cpo_alpha * NLL(y_w | x)

SimPO (Meng, Xia and Chen 2024, "SimPO: Simple Preference Optimization with a Reference-Free Reward", NeurIPS 2024,
arXiv 2405.14734, Eq. 6; authors' code: github.com/princeton-nlp/SimPO), length-normalised log-probabilities and a
target margin gamma, no NLL term:

    L = -log sigmoid( beta/|y_w| log pi(y_w|x) - beta/|y_l| log pi(y_l|x) - gamma )

The registry name ``simpo`` is this module with the preset ``loss_type: simpo, cpo_alpha: 0`` (a recipe may set
``cpo_alpha`` > 0 for CPO-SimPO). ``simpo_gamma`` is the paper's gamma itself (the authors' code takes
gamma/beta, ``gamma_beta_ratio``): TRL subtracts gamma/beta from the margin before scaling by beta. The other TRL loss
types (hinge, ipo; alphapo = simpo with AlphaPO's reward shape ``alpha`` and cpo_alpha forced to 0, Gupta et al. 2025)
are accepted as TRL lists them, read from the installed TRL's CPOConfig. The NLL term is TRL's token-mean
cross-entropy over the chosen response (as in the authors' trainer, which became TRL's); with cpo_alpha = 0 it is not
computed. The math is TRL's; this module only exposes and checks its knobs.
"""

from __future__ import annotations

from pydantic import Field, field_validator, model_validator

from aligntool.recipe.base import Strict
from aligntool.trainers.base import trl_lists

SMOOTHED = ("sigmoid", "simpo", "alphapo")  # TRL ignores label_smoothing for hinge and ipo
SIMPO = ("simpo", "alphapo")


class AlgoConfig(Strict):
    beta: float = Field(0.1, gt=0, description="Inverse temperature of the margin (SimPO: the paper's beta, 2 to 10 "
                        "there; CPO: 0.1).")
    loss_type: str = Field("sigmoid", description="A loss type of TRL's CPOTrainer: sigmoid (CPO), simpo, hinge, ipo, "
                           "alphapo, ...")
    cpo_alpha: float = Field(1.0, ge=0, description="Weight of the NLL (behaviour cloning) term on the chosen "
                             "responses; 0 for plain SimPO.")
    simpo_gamma: float | None = Field(None, ge=0, description="SimPO's target reward margin gamma (loss_type simpo "
                                      "only; default TRL's 0.5).")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="Conservative loss for noisy labels: the "
                                   "assumed label flip rate (sigmoid / simpo losses only).")
    alpha: float = Field(0.0, description="AlphaPO's reward shape: r = (1 - p^-alpha) / alpha instead of log p "
                         "(0 = log-probabilities, every loss type).")

    @field_validator("loss_type")
    @classmethod
    def _known(cls, value: str) -> str:
        return trl_lists.check(value, trl_lists.cpo_loss_types, " CPO loss types")

    @model_validator(mode="after")
    def _check(self):
        if self.simpo_gamma is not None and self.loss_type not in SIMPO:
            raise ValueError(f"simpo_gamma applies only to loss_type simpo (loss_type is {self.loss_type!r})")
        if self.loss_type == "alphapo" and self.alpha == 0:
            raise ValueError("loss_type alphapo needs alpha != 0 (alpha 0 is SimPO: use loss_type simpo)")
        if self.label_smoothing > 0 and self.loss_type not in SMOOTHED:
            raise ValueError(f"label_smoothing applies only to loss_type {', '.join(SMOOTHED)}")
        return self

    trl_fields = ("beta", "loss_type", "cpo_alpha", "simpo_gamma", "label_smoothing", "alpha")


def build(run):
    import warnings

    with warnings.catch_warnings():  # trl.experimental warns that it is experimental on import
        warnings.simplefilter("ignore")
        from trl.experimental.cpo import CPOTrainer

    return CPOTrainer(model=run.policy(), args=run.trl_config(), train_dataset=run.train_dataset,
                      eval_dataset=run.eval_dataset, processing_class=run.tokenizer, peft_config=run.peft_config())
