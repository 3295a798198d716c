"""SFT: maximise log p(y | x) on demonstrations, through TRL's SFTTrainer.

``loss: ce`` (default) is TRL's own token-level cross-entropy, untouched. ``loss: dco`` is Direct Coverage
Optimization (Chen et al. 2025, "Rethinking Fine-Tuning when Scaling Test-Time Compute: Limiting Confidence Improves
Mathematical Reasoning", arXiv 2502.07154, Sec. 4): per demonstration, -log(1 - (1 - p_hat(y|x))^N) with p_hat the
model's probability of the whole completion, which trains for pass@N (one of N samples right) instead of pass@1 by
no longer pushing examples the model already gets with probability well above 1/N (aligntool.losses.sft.dco_loss;
trainer in ``sft_trainer.py``). Not implemented from the paper: its replacement of examples whose gradient factor
falls below a threshold (to keep the effective batch size), and its step-wise and approximate (CoT) variants.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from aligntool.recipe.schema import Strict


class AlgoConfig(Strict):
    trl_fields = ("packing", "completion_only_loss", "assistant_only_loss", "dataset_text_field")  # SFTConfig's own

    packing: bool = Field(False, description="Pack several examples into one sequence of max_length tokens.")
    completion_only_loss: bool | None = Field(
        None, description="Loss on the completion only (prompt-completion data); None = TRL's default (yes)."
    )
    assistant_only_loss: bool = Field(False, description="Loss on assistant turns only (conversational data).")
    dataset_text_field: str = Field("text", description="Column holding plain text, for language-modeling data.")
    loss: Literal["ce", "dco"] = Field(
        "ce", description="'ce': TRL's token cross-entropy (trains for pass@1). 'dco': Direct Coverage Optimization, "
        "-log(1 - (1 - p_hat)^pass_n) per sequence (Chen et al. 2025), trains for pass@pass_n.")
    pass_n: int = Field(
        16, ge=1, description="N of loss 'dco': the number of samples the model will be allowed at test time "
        "(1 = cross-entropy on the whole sequence). The paper finds training N close to the test N best.")

    @model_validator(mode="after")
    def _dco_needs_whole_sequences(self):
        if self.loss == "dco" and self.packing:
            raise ValueError("loss 'dco' scores whole sequences: set packing: false")
        return self


def build(run):
    if run.algo.loss == "dco":
        from aligntool.trainers.sft_trainer import DCOSFTTrainer as trainer_cls
    else:
        from trl import SFTTrainer as trainer_cls

    kwargs = dict(algo=run.algo) if run.algo.loss == "dco" else {}
    return trainer_cls(
        model=run.policy(),
        args=run.trl_config(),
        train_dataset=run.train_dataset,
        eval_dataset=run.eval_dataset,
        processing_class=run.tokenizer,
        peft_config=run.peft_config(),
        **kwargs,
    )
