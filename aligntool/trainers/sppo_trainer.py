"""SPPOTrainer: the soft SPPO loss (aligntool.losses.preference.sppo_loss) on pairs carrying their win rates. The
recipe section, the pipeline and the paper are in ``aligntool/trainers/sppo.py``."""

from __future__ import annotations

from aligntool.losses.preference import sppo_loss
from aligntool.trainers.base.pairwise import PairLossTrainer


class SPPOTrainer(PairLossTrainer):
    extra_columns = ("p_chosen", "p_rejected")

    def pair_loss(self, b):
        beta = self.algo.beta
        lr_w = b["chosen_logps"] - b["ref_chosen_logps"]
        lr_l = b["rejected_logps"] - b["ref_rejected_logps"]
        loss = sppo_loss(lr_w, lr_l, b["p_chosen"], b["p_rejected"], beta)
        return loss, {"rewards/chosen": beta * lr_w, "rewards/rejected": beta * lr_l,
                      "rewards/accuracies": (lr_w > lr_l).float(), "rewards/margins": beta * (lr_w - lr_l),
                      "sppo/p_chosen": b["p_chosen"], "sppo/p_rejected": b["p_rejected"]}
