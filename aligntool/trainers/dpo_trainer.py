"""DPOTrainer: TRL's own DPOTrainer (every loss TRL implements), with the reference log-probs of
``precompute_ref_log_probs`` cached beside the run (aligntool.trainers.base.refcache). The recipe section is in
``aligntool/trainers/dpo.py``."""

from __future__ import annotations

from trl import DPOTrainer as TRLDPOTrainer

from aligntool.trainers.base.refcache import RefLogpsCache


class DPOTrainer(RefLogpsCache, TRLDPOTrainer):
    pass
