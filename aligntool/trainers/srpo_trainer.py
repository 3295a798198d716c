"""SRPOTrainer: one model as generator and self-reviser, three preference rows per pair in one batch, the SRPO loss
(aligntool.losses.preference.srpo_loss). The recipe section and the paper are in ``aligntool/trainers/srpo.py``."""

from __future__ import annotations

from aligntool.errors import UserError
from aligntool.losses.preference import srpo_loss
from aligntool.trainers.base.pairwise import PairLossTrainer

REVISION_COLUMNS = ("rev_l_ids", "rev_w_ids")  # token ids of rev(x, y_l) and rev(x, y_w)


class ThreeRoles:
    """Each example -> (x; yw, yl), (rev(x, yl); yw, yl), (rev(x, yw); yw, yl), grouped by role, through TRL's own
    preference collator (``inner``)."""

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, examples):
        rows = [{"prompt_ids": e["prompt_ids"], "chosen_ids": e["chosen_ids"], "rejected_ids": e["rejected_ids"]}
                for e in examples]
        for key in REVISION_COLUMNS:
            rows += [{"prompt_ids": e[key], "chosen_ids": e["chosen_ids"], "rejected_ids": e["rejected_ids"]}
                     for e in examples]
        return self.inner(rows)


class SRPOTrainer(PairLossTrainer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.data_collator = ThreeRoles(self.data_collator)

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        self._signature_columns = list(self._signature_columns) + list(REVISION_COLUMNS)

    def _precompute_ref_logps(self, *args, **kwargs):
        raise UserError("algo.precompute_ref_log_probs: not supported by srpo (six log-ratios per pair)")

    def pair_loss(self, b):
        cfg = self.algo
        lr_w = (b["chosen_logps"] - b["ref_chosen_logps"]).view(3, -1)
        lr_l = (b["rejected_logps"] - b["ref_rejected_logps"]).view(3, -1)
        # rows: 0 = on x, 1 = revising yl, 2 = revising yw
        h_w, h_w_given_l, h_w_given_w = lr_w
        h_l, h_l_given_l, h_l_given_w = lr_l
        loss = srpo_loss(h_w, h_l, h_w_given_l, h_l_given_l, h_w_given_w, h_l_given_w, cfg.beta, cfg.alpha)
        return loss, {"rewards/accuracies": (h_w > h_l).float(), "rewards/margins": cfg.beta * (h_w - h_l),
                      "srpo/revise_accuracy": (h_w_given_l > h_l_given_l).float(),
                      "srpo/revision_margin": cfg.beta * (h_w_given_l - h_l_given_l)}
