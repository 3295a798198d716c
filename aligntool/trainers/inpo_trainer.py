"""INPOTrainer: the INPO loss (aligntool.losses.preference.inpo_loss) against the fixed reference and the previous
iterate, both scored once before training through TRL's own collator. The recipe section, the pipeline and the paper
are in ``aligntool/trainers/inpo.py``."""

from __future__ import annotations

from aligntool.losses.preference import inpo_loss
from aligntool.trainers.base.pairwise import PairLossTrainer


class INPOTrainer(PairLossTrainer):
    extra_columns = ("last_chosen_logps", "last_rejected_logps")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # pi_t's log-probs, through TRL's own tokenisation: the policy *is* pi_t until the first update
        chosen, rejected = self.logps_pass(self.train_dataset, self.model, self.args.per_device_train_batch_size)
        self.train_dataset = self.train_dataset.add_column("last_chosen_logps", chosen).add_column(
            "last_rejected_logps", rejected)

    def pair_loss(self, b):
        cfg = self.algo
        loss = inpo_loss(b["chosen_logps"], b["rejected_logps"], b["ref_chosen_logps"], b["ref_rejected_logps"],
                         b["last_chosen_logps"], b["last_rejected_logps"], cfg.eta, cfg.ratio)
        h_margin = (b["chosen_logps"] - b["rejected_logps"]) - (b["last_chosen_logps"] - b["last_rejected_logps"])
        lr_w, lr_l = b["chosen_logps"] - b["ref_chosen_logps"], b["rejected_logps"] - b["ref_rejected_logps"]
        return loss, {"rewards/accuracies": (lr_w > lr_l).float(), "rewards/margins": lr_w - lr_l,
                      "inpo/margin_vs_last": h_margin}
