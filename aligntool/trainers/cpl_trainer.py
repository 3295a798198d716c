"""CPLTrainer: the CPL loss (aligntool.losses.preference.cpl_loss) on TRL's DPO data path, no reference model. The
recipe section and the paper are in ``aligntool/trainers/cpl.py``."""

from __future__ import annotations

from aligntool.losses.preference import cpl_loss
from aligntool.trainers.base.pairwise import PairLossTrainer


class CPLTrainer(PairLossTrainer):
    uses_reference = False

    def pair_loss(self, b):
        cfg = self.algo
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
