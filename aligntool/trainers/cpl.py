"""CPL: Contrastive Preference Learning (Hejna et al. 2023, arXiv 2310.13639), for language models.

    A(y) = alpha * sum_t log pi(y_t | x, y_<t)          (the response's discounted-free "advantage")
    L    = softplus(-(A(y_w) - lam * A(y_l)))  [ + bc_weight * NLL(y_w) ]

No reference model: CPL regularises through the conservative bias lam in (0, 1] and the optional behaviour-cloning
(NLL on the chosen response) term. Defaults follow the authors' cpl.yaml (alpha 0.1, lam 0.5). The NLL term is the
token-mean over chosen tokens, as in the authors' ``bc_coeff`` option.
"""

from __future__ import annotations

from pydantic import Field

from aligntool.recipe.base import Strict


class AlgoConfig(Strict):
    alpha: float = Field(0.1, gt=0, description="Temperature alpha: A = alpha * sum log pi over the response.")
    contrastive_bias: float = Field(0.5, gt=0, le=1, description="Conservative bias lambda in (0, 1] on A(rejected).")
    bc_weight: float = Field(0.0, ge=0, description="Weight of the NLL (behaviour-cloning) term on chosen responses.")


def build(run):
    from aligntool.trainers.cpl_trainer import CPLTrainer

    return CPLTrainer(model=run.policy(), args=run.trl_config(), train_dataset=run.train_dataset,
                      eval_dataset=run.eval_dataset, processing_class=run.tokenizer, peft_config=run.peft_config(),
                      algo=run.algo)
