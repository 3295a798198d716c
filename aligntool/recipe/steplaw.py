"""Step Law: the peak learning rate and batch size suggested for N non-embedding parameters and D training tokens.

Li et al. 2025, "Predictable Scale: Part I -- Optimal Hyperparameter Scaling Law in Large Language Model
Pretraining" (arXiv 2503.04715), Eq. (1)-(2), fitted over about 3,700 pretraining runs (authors' tool:
``step-law/steplaw``, ``code/fit_tool.py pred-opt-lr-bs``)::

    eta_opt(N, D) = 1.79 * N^-0.713 * D^0.307          (peak learning rate)
    B_opt(D)      = 0.58 * D^0.571                      (batch size in tokens; in sequences: B_opt / sequence length)

N counts the **non-embedding** parameters: per decoder layer the attention and MLP weight matrices (the paper's
4h^2 + 3h*ffn for a dense Llama), without embeddings, output head, norms. The authors' tool predicts with the means of
1000 bootstrap fits (``data/1004_fitted_lr_bs_scaling_model_parameters.csv``), which we use by default
(``constants="tool"``); ``constants="paper"`` uses the rounded constants printed in the paper.

The law was fitted on **pretraining** from scratch (about 3,700 dense and MoE models trained with a grid of learning
rates and batch sizes): applied to fine-tuning (few tokens, a pretrained start, a preference or RL loss) it is an
extrapolation, a starting point to tune around rather than a prediction of the optimum.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# (log c_lr, exponent of N, exponent of D) and (log c_bs, exponent of D)
CONSTANTS = {
    "paper": {"lr": (math.log(1.79), -0.713, 0.307), "bs": (math.log(0.58), 0.571)},
    "tool": {"lr": (0.5863078, -0.7129223, 0.3074910), "bs": (-0.5435422, 0.5709444)},
}
EXTRAPOLATION_NOTE = ("Step Law (Li et al. 2025) was fitted on pretraining from scratch; for fine-tuning it is an "
                      "extrapolation: a starting point to tune around")


@dataclass(frozen=True)
class Suggestion:
    params: int  # N, non-embedding
    tokens: float  # D
    learning_rate: float
    batch_tokens: float
    seq_len: float | None = None

    @property
    def batch_sequences(self) -> float | None:
        return self.batch_tokens / self.seq_len if self.seq_len else None


def learning_rate(n: float, d: float, constants: str = "tool") -> float:
    """eta_opt = c * N^a * D^b (Step Law, Eq. 1)."""
    log_c, a, b = CONSTANTS[constants]["lr"]
    return math.exp(log_c + a * math.log(n) + b * math.log(d))


def batch_tokens(d: float, constants: str = "tool") -> float:
    """B_opt = c * D^b tokens (Step Law, Eq. 2): independent of N."""
    log_c, b = CONSTANTS[constants]["bs"]
    return math.exp(log_c + b * math.log(d))


def tokens_for_steps(steps: int, constants: str = "tool") -> float:
    """D when the batch follows the law and the number of optimizer steps S is fixed: D = S * B_opt(D), i.e.
    D = S * c * D^b, so D = (S * c)^(1 / (1 - b))."""
    log_c, b = CONSTANTS[constants]["bs"]
    return math.exp((math.log(steps) + log_c) / (1 - b))


def suggest(n: int, d: float, seq_len: float | None = None, constants: str = "tool") -> Suggestion:
    if n <= 0 or d <= 0:
        raise ValueError(f"Step Law needs N > 0 and D > 0, got N={n}, D={d}")
    return Suggestion(n, d, learning_rate(n, d, constants), batch_tokens(d, constants), seq_len)


def non_embedding_params(config, trust_remote_code: bool = False) -> int:
    """N of a transformers model config: the elements of every weight matrix (ndim >= 2) of the model, built on the
    meta device (no memory, no weights read), except the input embeddings and the output head. For a dense Llama this
    is layers * (attention + 3 * hidden * intermediate), the paper's count; MoE models count every expert (the paper
    fits MoE separately with active parameters: an approximation for them)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    skip = set()
    for module in (model.get_input_embeddings(), model.get_output_embeddings()):
        if module is not None:
            skip.update(id(p) for p in module.parameters())
    return sum(p.numel() for p in model.parameters() if p.ndim >= 2 and id(p) not in skip)


def format_suggestion(s: Suggestion, world: int = 1, grad_accum: int = 1) -> list[str]:
    lines = [f"N (non-embedding parameters): {s.params:,}", f"D (training tokens): {s.tokens:,.0f}",
             f"peak learning rate: {s.learning_rate:.4g}", f"batch size: {s.batch_tokens:,.0f} tokens"]
    if s.seq_len:
        seqs = s.batch_sequences
        lines[-1] += f" = {seqs:,.1f} sequences of {s.seq_len:,.0f} tokens"
        per_device = per_device_batch(s, world, grad_accum)
        lines.append(f"per_device_train_batch_size: {per_device} (x {world} processes x {grad_accum} accumulation "
                     f"steps = {per_device * world * grad_accum} sequences)")
    lines.append(f"note: {EXTRAPOLATION_NOTE}")
    return lines


def per_device_batch(s: Suggestion, world: int = 1, grad_accum: int = 1) -> int:
    """The suggested batch in sequences, shared over processes and accumulation steps (at least 1 per process)."""
    return max(1, round(s.batch_sequences / (world * grad_accum)))


def _row_tokens(row: dict, tokenizer) -> int:
    """Tokens of one training row: every text cell (prompt, completion, chosen, rejected, text; conversations as the
    concatenation of their turns' contents), as the trainer forwards them."""
    texts = []
    for value in row.values():
        if isinstance(value, str):
            texts.append(value)
        elif isinstance(value, list) and value and all(isinstance(t, dict) for t in value):
            texts.extend(str(t.get("content", "")) for t in value)
    return sum(len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]) if texts else 0


def mean_row_tokens(dataset, tokenizer, sample: int = 512) -> float:
    rows = [dataset[i] for i in range(min(len(dataset), sample))]
    return sum(_row_tokens(r, tokenizer) for r in rows) / max(1, len(rows))


def for_run(loaded, model_path: str, tokenizer, train_dataset, world: int = 1,
            force: bool = False) -> tuple[Suggestion, dict] | None:
    """The Step Law values of a run whose ``train.learning_rate`` / ``train.per_device_train_batch_size`` is 'auto'
    (the learning rate always with ``force``, for ``aligntool suggest``): (the suggestion, {key: value to use}), or
    None when nothing is 'auto'. N is counted from the model's config, D from the data and the schedule:

    - ``train.max_steps`` S (online methods: iterations, default the engine's 100; no accumulation) with a fixed
      batch b (per process) x W processes x A accumulation steps: D = S * b*W*A * L,
      L = the mean tokens of a training row (online methods: prompt + max_new_tokens);
    - ``max_steps`` S with the batch 'auto': D solves D = S * B_opt(D) (see ``tokens_for_steps``);
    - otherwise epochs E over R rows: D = E * R * L.
    """
    from aligntool.errors import UserError

    recipe, spec, source = loaded.recipe, loaded.spec, loaded.source
    t = recipe.train
    auto = {k for k in ("learning_rate", "per_device_train_batch_size") if getattr(t, k) == "auto"}
    if force:  # `aligntool suggest`: the learning rate for the recipe's schedule (and batch, unless it is 'auto')
        auto.add("learning_rate")
    if not auto:
        return None
    where = f"{source}: train.{sorted(auto)[0]}: auto"
    if spec.batch_unit in ("generated", "completions"):  # the registry: its batches hold what it samples in the run
        raise UserError(f"{where}: {spec.name} trains on rows it generates during the run, so the training tokens D "
                        "are not known beforehand; set the value")
    try:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(model_path, trust_remote_code=recipe.model.trust_remote_code,
                                            revision=recipe.model.revision)
        n = non_embedding_params(config, recipe.model.trust_remote_code)
    except Exception as exc:  # noqa: BLE001 -- any failure to build the config means N is unknown
        from aligntool.errors import first_line

        raise UserError(f"{where}: cannot count the non-embedding parameters of {model_path} (a causal LM config is "
                        f"needed): {first_line(exc)}") from None
    if n <= 0:
        raise UserError(f"{where}: {model_path} has no non-embedding weight matrices to count")
    try:
        rows = len(train_dataset)
    except TypeError:
        raise UserError(f"{where}: the training set's size is unknown (a streamed dataset); set the value") from None
    if rows == 0:
        raise UserError(f"{where}: the training set is empty")
    seq = mean_row_tokens(train_dataset, tokenizer)
    if spec.batch_unit == "prompts":  # the registry: a batch row is a prompt, trained on with its sampled response
        seq += getattr(loaded.algo, "max_new_tokens", 0)
    if t.max_length:
        seq = min(seq, t.max_length)
    if seq <= 0:
        raise UserError(f"{where}: the training rows hold no tokens")
    fields = spec.trl_config_class().__dataclass_fields__
    accum = t.gradient_accumulation_steps or fields["gradient_accumulation_steps"].default
    steps = t.max_steps
    if spec.kind == "online":  # the rollout engine runs max_steps iterations (or its default), one batch each
        from aligntool.recipe.base import DEFAULT_ITERATIONS

        steps, accum = steps or DEFAULT_ITERATIONS, 1
    constants = t.step_law_constants
    batch_auto = "per_device_train_batch_size" in auto
    if steps and batch_auto:
        d = tokens_for_steps(steps, constants)
    elif steps:
        batch = t.per_device_train_batch_size or fields["per_device_train_batch_size"].default
        d = steps * batch * world * accum * seq
    else:
        epochs = t.num_train_epochs or fields["num_train_epochs"].default
        d = epochs * rows * seq
    s = suggest(n, d, seq, constants)
    values = {}
    if "learning_rate" in auto:
        values["learning_rate"] = float(f"{s.learning_rate:.4g}")
    if batch_auto:
        values["per_device_train_batch_size"] = per_device_batch(s, world, accum)
    return s, values

