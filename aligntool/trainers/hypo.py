"""HyPO: Hybrid Preference Optimization (Song et al. 2024, "The Importance of Online Data", arXiv 2406.01462).

    L(theta) = L_DPO(theta; offline pairs) + lam * KL(pi_theta(.|x) || pi_ref(.|x))

The reverse KL is estimated on fresh, unlabelled samples y ~ pi_theta(.|x) for the prompts x of each batch: k samples
per prompt (temperature 1, no top-k/top-p, so the samples are exactly on-policy), reward r = -(log pi - log pi_ref)
summed over the sequence, and the RLOO score-function gradient with a leave-one-out baseline
(aligntool.losses.preference.rloo_kl_loss). No reward model and no labels are needed online.

Open details (the paper publishes no code): the KL is sequence-level; lam and k are options (defaults
lam = 0.05, k = 2); the DPO part is TRL's sigmoid loss with ``beta``. With ``num_kl_prompts`` the KL term uses only
the first prompts of each batch, to bound generation cost.
"""

from __future__ import annotations

from pydantic import Field

from aligntool.recipe.base import Strict


class AlgoConfig(Strict):
    beta: float = Field(0.1, gt=0, description="DPO beta.")
    kl_coef: float = Field(0.05, ge=0, description="lambda: weight of the online KL(pi || pi_ref) term.")
    kl_samples: int = Field(2, ge=2, description="k: on-policy samples per prompt for the RLOO estimator (>= 2).")
    num_kl_prompts: int | None = Field(None, gt=0, description="Use only this many prompts of each batch "
                                       "(default all).")
    max_new_tokens: int = Field(48, gt=0, description="Length limit of the online samples.")


def build(run):
    from aligntool.trainers.hypo_trainer import HyPOTrainer

    return HyPOTrainer(model=run.policy(), ref_model=run.reference(), args=run.trl_config(),
                       train_dataset=run.train_dataset, eval_dataset=run.eval_dataset, processing_class=run.tokenizer,
                       peft_config=run.peft_config(), algo=run.algo)
