"""Reward model: a one-output sequence classifier trained with the Bradley-Terry loss
-log sigmoid(r(x, y_w) - r(x, y_l)), through TRL's RewardTrainer."""

from __future__ import annotations

from pydantic import Field

from aligntool.recipe.base import Strict


class AlgoConfig(Strict):
    trl_fields = ("center_rewards_coefficient",)  # RewardConfig's own

    center_rewards_coefficient: float | None = Field(
        None, ge=0, description="Weight of the (r_w + r_l)^2 penalty that keeps rewards centred "
        "(Eisenstein et al. 2023)."
    )


def build(run):
    from trl import RewardTrainer

    return RewardTrainer(
        model=run.policy(head="reward"),
        args=run.trl_config(),
        train_dataset=run.train_dataset,
        eval_dataset=run.eval_dataset,
        processing_class=run.tokenizer,
        peft_config=run.peft_config(head="reward"),
    )
