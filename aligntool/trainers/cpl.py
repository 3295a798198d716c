"""CPL: Contrastive Preference Learning (Hejna et al. 2023, arXiv 2310.13639), for language models.

    A(y) = alpha * sum_t log pi(y_t | x, y_<t)          (the response's discounted-free "advantage")
    L    = softplus(-(A(y_w) - lam * A(y_l)))  [ + bc_weight * NLL(y_w) ]

No reference model: CPL regularises through the conservative bias lam in (0, 1] and the optional behaviour-cloning
(NLL on the chosen response) term. Defaults follow the authors' cpl.yaml (alpha 0.1, lam 0.5). The NLL term is the
token-mean over chosen tokens, as in the authors' ``bc_coeff`` option.
"""

from __future__ import annotations

from pydantic import Field

from aligntool.recipe.schema import Strict


class AlgoConfig(Strict):
    alpha: float = Field(0.1, gt=0, description="Temperature alpha: A = alpha * sum log pi over the response.")
    contrastive_bias: float = Field(0.5, gt=0, le=1, description="Conservative bias lambda in (0, 1] on A(rejected).")
    bc_weight: float = Field(0.0, ge=0, description="Weight of the NLL (behaviour-cloning) term on chosen responses.")

    def trl_kwargs(self) -> dict:
        return {}  # nothing of CPL goes into DPOConfig


def build(run):
    import torch

    from aligntool.losses.preference import cpl_loss
    from aligntool.trainers.pairwise import PairLossTrainer

    cfg = run.algo

    class CPLTrainer(PairLossTrainer):
        uses_reference = False

        def pair_loss(self, b):
            loss = cpl_loss(b["chosen_logps"], b["rejected_logps"], cfg.alpha, cfg.contrastive_bias)
            margin = cfg.alpha * (b["chosen_logps"] - cfg.contrastive_bias * b["rejected_logps"])
            metrics = {"cpl/loss": loss}
            if cfg.bc_weight:
                nll = -b["chosen_logps"].sum() / b["chosen_tokens"].sum().clamp(min=1)
                loss = loss + cfg.bc_weight * nll
                metrics["cpl/nll"] = nll
            # the policy's implied preference A(y_w) > A(y_l); with lam < 1 the biased margin below is mostly negative
            # on long responses, because lam < 1 also acts as a likelihood (BC) regulariser
            metrics["rewards/accuracies"] = (b["chosen_logps"] > b["rejected_logps"]).float()
            metrics["rewards/margins"] = margin
            return loss, metrics

    return CPLTrainer(model=run.policy(), args=run.trl_config(), train_dataset=run.train_dataset,
                      eval_dataset=run.eval_dataset, processing_class=run.tokenizer,
                      peft_config=run.peft_config())
