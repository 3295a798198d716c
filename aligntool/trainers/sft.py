"""SFT: maximise log p(y | x) on demonstrations, through TRL's SFTTrainer (nothing of ours in the math)."""

from __future__ import annotations

from pydantic import Field

from aligntool.recipe.schema import Strict


class AlgoConfig(Strict):
    trl_fields = ("packing", "completion_only_loss", "assistant_only_loss", "dataset_text_field")  # SFTConfig's own

    packing: bool = Field(False, description="Pack several examples into one sequence of max_length tokens.")
    completion_only_loss: bool | None = Field(
        None, description="Loss on the completion only (prompt-completion data); None = TRL's default (yes)."
    )
    assistant_only_loss: bool = Field(False, description="Loss on assistant turns only (conversational data).")
    dataset_text_field: str = Field("text", description="Column holding plain text, for language-modeling data.")


def build(run):
    from trl import SFTTrainer

    return SFTTrainer(
        model=run.policy(),
        args=run.trl_config(),
        train_dataset=run.train_dataset,
        eval_dataset=run.eval_dataset,
        processing_class=run.tokenizer,
        peft_config=run.peft_config(),
    )
