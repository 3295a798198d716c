"""SFT: maximise log p(y | x) on demonstrations, through TRL's SFTTrainer.

``loss: ce`` (default) is TRL's own token-level cross-entropy, untouched. ``loss: dco`` is Direct Coverage
Optimization (Chen et al. 2025, "Rethinking Fine-Tuning when Scaling Test-Time Compute: Limiting Confidence Improves
Mathematical Reasoning", arXiv 2502.07154, Sec. 4): per demonstration, -log(1 - (1 - p_hat(y|x))^N) with p_hat the
model's probability of the whole completion, which trains for pass@N (one of N samples right) instead of pass@1 by
no longer pushing examples the model already gets with probability well above 1/N (aligntool.losses.sft.dco_loss;
trainer in ``sft_trainer.py``). Not implemented from the paper: its replacement of examples whose gradient factor
falls below a threshold (to keep the effective batch size), and its step-wise and approximate (CoT) variants.

Conversational ``messages`` rows are trained on the assistant's turns only (each reply and its end-of-turn token),
not on the system and user turns (``assistant_only_loss``, on by default for them). TRL masks by the ``{% generation
%}`` markers of the chat template, which real templates lack; ``aligntool.tokens.training_chat_template`` supplies a
marked copy that renders byte-identically (aligntool's for every supported family and the tiny model, TRL's for the
checkpoints it knows), used while the trainer tokenizes the data only. A template nobody has marked leaves the
default on the whole conversation, said in a note; asking for assistant-only loss explicitly is then an error naming
the fix (``model.chat_template``: a copy with the markers). Prompt/completion rows keep TRL's completion-only loss.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from aligntool.recipe.base import Strict


class AlgoConfig(Strict):
    trl_fields = ("packing", "completion_only_loss", "assistant_only_loss", "dataset_text_field")  # SFTConfig's own

    packing: bool = Field(False, description="Pack several examples into one sequence of max_length tokens.")
    completion_only_loss: bool | None = Field(
        None, description="Loss on the completion only (prompt-completion data); None = TRL's default (yes)."
    )
    assistant_only_loss: bool | None = Field(
        None, description="Loss on the assistant's turns only (each reply and its end-of-turn token), for "
        "conversational data. None = yes for `messages` rows when the chat template has a training copy with "
        "{% generation %} markers (every supported family, the tiny model, TRL's known checkpoints, or a template "
        "that has the markers), else the whole conversation with a note; prompt/completion rows: completion_only_loss.")
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


def _no_markers(run) -> tuple[str, str]:
    """What the template lacks and the fix, for the note and the error."""
    from aligntool import tokens

    spec = run.recipe.model.chat_template
    which = f"model.chat_template {spec}" if spec else f"the chat template of {run.model_path}"
    return (f"{which} has no {{% generation %}} markers and aligntool knows no marked copy of it", "set "
            "model.chat_template to a copy of the template with {% generation %} ... {% endgeneration %} around each "
            f"assistant reply and its end-of-turn token (examples: {tokens.TRAINING_TEMPLATES_DIR})")


def assistant_only(run) -> tuple[bool, str | None]:
    """(assistant-only loss on?, the marked training template to tokenize with) for this run's data and tokenizer.
    Rows without an assistant turn would have nothing in the loss (TRL stops with a RuntimeError): they are dropped
    from ``run``'s datasets, counted in a note."""
    from trl.data_utils import is_conversational

    from aligntool import data as data_mod
    from aligntool import tokens
    from aligntool.errors import UserError
    from aligntool.outputs import log

    setting, source, data = run.algo.assistant_only_loss, run.loaded.source, run.train_dataset
    if setting is False:
        return False, None
    streamed = not hasattr(data, "__len__")  # dataset.streaming: an IterableDataset, its rows read as it trains
    if not is_conversational(next(iter(data)) if streamed else data[0]):
        if setting:
            raise UserError(f"{source}: algo.assistant_only_loss: applies to conversational rows (`messages`, or "
                            f"`prompt`/`completion` lists of {{role, content}} messages); dataset.path "
                            f"{data_mod.shown_path(run.recipe.dataset.path, run.loaded.base_dir)} holds plain text")
        return False, None
    messages = "prompt" not in data.column_names  # TRL's own order: prompt/completion first, then messages
    if setting is None and not messages:
        return False, None  # prompt/completion rows: the completion only (TRL's completion_only_loss)
    template = tokens.training_chat_template(run.tokenizer)
    if template is None:
        lacks, fix = _no_markers(run)
        if setting:
            raise UserError(f"{source}: algo.assistant_only_loss: {lacks}; {fix}")
        log(f"note: {lacks}: the loss covers whole conversations, system and user turns included; for the assistant's "
            f"turns only, {fix} (algo.assistant_only_loss: false silences this note)")
        return False, None
    if messages:
        where = f"dataset.path {data_mod.shown_path(run.recipe.dataset.path, run.loaded.base_dir)}"
        run.train_dataset = _rows_with_an_assistant_turn(data, "training", where, log)
        if run.eval_dataset is not None:
            run.eval_dataset = _rows_with_an_assistant_turn(run.eval_dataset, "eval", "the eval set", log)
    return True, template


def _rows_with_an_assistant_turn(data, name: str, where: str, log):
    if not hasattr(data, "__len__"):  # streamed: such rows are skipped as they come
        return data.filter(lambda row: any(m.get("role") == "assistant" for m in row["messages"]))
    keep = [i for i, turns in enumerate(data["messages"]) if any(m.get("role") == "assistant" for m in turns)]
    if not keep:
        from aligntool.errors import UserError

        raise UserError(f"{where}: none of the {len(data)} {name} rows has an assistant message, and the loss covers "
                        "only the assistant's turns (algo.assistant_only_loss; false trains on whole conversations)")
    if len(keep) == len(data):
        return data
    log(f"note: {len(data) - len(keep)} of {len(data)} {name} rows were dropped (no assistant message: nothing to "
        "train on with the loss on the assistant's turns only)")
    return data.select(keep)


def build(run):
    from aligntool import tokens

    if run.algo.loss == "dco":
        from aligntool.trainers.sft_trainer import DCOSFTTrainer as trainer_cls
    else:
        from trl import SFTTrainer as trainer_cls

    kwargs = dict(algo=run.algo) if run.algo.loss == "dco" else {}
    on, template = assistant_only(run)
    # the marked copy while TRL tokenizes the data (in its __init__); the tokenizer saved with the model keeps its own
    with tokens.chat_template_swapped(run.tokenizer, template):
        return trainer_cls(
            model=run.policy(),
            args=run.trl_config(assistant_only_loss=on),
            train_dataset=run.train_dataset,
            eval_dataset=run.eval_dataset,
            processing_class=run.tokenizer,
            peft_config=run.peft_config(),
            **kwargs,
        )
