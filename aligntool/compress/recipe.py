"""The compress recipe: ``aligntool compress --recipe aligntool/recipes/compress_*.yaml [KEY=VALUE ...]``.

Same machinery as ``train`` (YAML 1.2 safe loading, dotted overrides, one-line errors naming file:line and key), its own
schema: ``model``, ``calibration``, ``compress`` (method, mode, budget, search settings) and ``output_dir``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, NonNegativeInt, PositiveInt, ValidationError, model_validator

from aligntool.errors import UserError
from aligntool.recipe.base import Strict
from aligntool.recipe.loader import _explain, read_recipe
from aligntool.recipe.schema import ModelConfig


class CalibrationConfig(Strict):
    """Text the search and the codebooks are fitted on, cut into windows of ``seq_len`` tokens; the held-out windows
    (never seen by the search) give the report's perplexity and KL."""

    path: str = Field("toy", description="'toy' (documents of the toy world; held-out ones on held-out prompts), a "
                      ".txt file, a .jsonl/.json/.parquet/.csv file or `datasets` folder with a text column, "
                      "or a hub id.")
    text_column: str = Field("text", description="Column holding the text (tables and datasets).")
    split: str = Field("train", description="Split of a hub dataset or DatasetDict.")
    seq_len: PositiveInt = Field(128, description="Tokens per calibration window.")
    num_sequences: PositiveInt = Field(128, description="Calibration windows (the search samples its stages "
                                       "from these).")
    heldout_sequences: PositiveInt = Field(32, description="Held-out windows for the report (files: the last ones).")
    seed: NonNegativeInt = Field(0, description="Seed of the toy calibration text and of the order of the windows.")


class EvoPressConfig(Strict):
    """The evolutionary search (Sieberling et al., ICML 2025, `IST-DASLab/EvoPress`)."""

    generations: PositiveInt = Field(40, description="Generations of (mutate -> select).")
    offspring: PositiveInt = Field(16, description="Mutants of the parent per generation.")
    survivors: list[PositiveInt] = Field([4, 1], min_length=1, description="Candidates kept after each selection "
                                         "stage; the last must be 1.")
    tokens: list[PositiveInt] = Field([1024, 8192], min_length=1, description="Calibration tokens drawn afresh for "
                                      "each stage (multiples of calibration.seq_len).")
    fitness: Literal["kl", "ppl"] = Field("kl", description="kl: mean per-token KL(dense || compressed) over the "
                                          "vocabulary; ppl: perplexity on the stage's tokens.")
    initial_candidates: PositiveInt = Field(16, description="Random starting points scored on the first stage's "
                                            "tokens, best kept (depth pruning, non-integer bits).")
    max_flips: PositiveInt = Field(3, description="Level switches per mutation: min(U{1..m}, U{1..m}), biased to 1.")

    @model_validator(mode="after")
    def _stages(self):
        if len(self.survivors) != len(self.tokens):
            raise ValueError(f"survivors ({len(self.survivors)}) and tokens ({len(self.tokens)}) need one entry "
                             "per stage")
        if self.survivors[-1] != 1:
            raise ValueError(f"the last stage must keep 1 survivor, got {self.survivors[-1]}")
        if any(a < b for a, b in zip(self.survivors, self.survivors[1:])):
            raise ValueError(f"survivors must not grow from stage to stage, got {self.survivors}")
        if self.survivors[0] > self.offspring + 1:
            raise ValueError(f"the first stage keeps {self.survivors[0]} of only {self.offspring + 1} candidates")
        return self


class CompressConfig(Strict):
    method: Literal["evopress", "uniform", "jlcm"] = Field(
        "evopress", description="evopress: per-layer levels found by evolutionary search; uniform: every layer at the "
        "budget (the baseline; sparsity or quant); jlcm: per-group learned codebooks (Yvinec et al., ICLR 2024).")
    mode: Literal["sparsity", "quant", "depth"] = Field(
        "sparsity", description="sparsity: unstructured pruning (Wanda or M-FAC scores: saliency); quant: "
        "round-to-nearest bit-widths "
        "with groups; depth: attention / MLP sub-blocks replaced by identity. jlcm is always quant.")
    layers: str | None = Field(
        None, description="Regex (full match) over layer names: the layers that are compressed (sparsity, quant, "
        "jlcm). A layer is an nn.Linear, a transformers Conv1D (GPT-2) or one expert of a fused MoE weight, named "
        "<module>.<gate_up_proj|down_proj>.<expert> (an experts module's name selects all its experts). Default: "
        "every such layer inside the decoder blocks (the model's layer list: model.layers, transformer.h, "
        "gpt_neox.layers, ...), without the output head, the embeddings and the MoE routers and gates (layers with "
        "1 output or one per expert).")
    sparsity: float | None = Field(None, gt=0, lt=1, description="sparsity: average fraction of zero weights, "
                                   "0 < s < 1.")
    sparsity_levels: PositiveInt = Field(8, description="sparsity: levels on each side of the target (EvoPress L).")
    sparsity_step: PositiveInt | None = Field(None, description="sparsity: weights removed per level step, the same in "
                                              "every layer (default 0.5*min(s,1-s)/L * the smallest layer's size).")
    saliency: Literal["wanda", "mfac"] = Field(
        "wanda", description="sparsity: which weights each level prunes first. wanda: lowest |W_ij| * ||X_j||_2 "
        "(Sun et al. 2023); mfac: lowest OBS saliency w_j^2 / (2 [F^-1]_jj) with the blockwise M-FAC inverse of the "
        "empirical Fisher of per-window gradients (Frantar et al., NeurIPS 2021).")
    mfac_gradients: PositiveInt = Field(32, description="saliency mfac: per-sample gradients m in the empirical "
                                        "Fisher (one per calibration window, the first m windows).")
    mfac_block: PositiveInt = Field(128, description="saliency mfac: consecutive weights (row-major) per diagonal "
                                    "block of the Fisher; memory and time grow with m, not with the block.")
    mfac_damp: float = Field(1e-2, gt=0, description="saliency mfac: dampening lambda relative to the mean diagonal "
                             "of each layer's empirical Fisher (F = lambda I + (1/m) sum g g^T).")
    mfac_update: bool = Field(True, description="saliency mfac: also move the kept weights by the OBS update "
                              "-F^-1 sum_j (w_j / [F^-1]_jj) e_j of each level's pruned set (else they stay as they "
                              "are).")
    bits: float | None = Field(None, description="quant / jlcm: average bits per weight (codes only; scales and "
                               "codebooks are reported in the bytes).")
    bits_min: int = Field(2, ge=1, le=8, description="quant: lowest bit-width a layer may get.")
    bits_max: int = Field(8, ge=1, le=8, description="quant: highest bit-width a layer may get.")
    group_size: PositiveInt = Field(128, description="quant: weights per (scale, zero) group along each row.")
    drop: PositiveInt | None = Field(None, description="depth: number of units (sub-blocks or blocks) to drop.")
    drop_unit: Literal["sublayer", "block"] = Field("sublayer", description="depth: drop attention and MLP "
                                                    "separately, or whole decoder blocks.")
    jlcm_groups: PositiveInt = Field(8, description="jlcm: row groups per layer, one codebook each.")
    jlcm_steps: NonNegativeInt = Field(200, description="jlcm: joint codebook/mapping optimisation steps per layer.")
    jlcm_lr: float = Field(1e-2, gt=0, description="jlcm: Adam step size relative to the weight's std.")
    jlcm_tokens: PositiveInt = Field(2048, description="jlcm: calibration tokens whose layer inputs define the error.")
    evopress: EvoPressConfig = Field(default_factory=EvoPressConfig, description="Settings of the EvoPress search.")
    export: Literal["auto", "compressed-tensors", "none"] = Field(
        "auto", description="Also write the model in the compressed-tensors format (transformers and vLLM load it) "
        "into output_dir/compressed-tensors/. It holds mode quant (round-to-nearest, nn.Linear layers) only: auto "
        "writes it where it can and notes why not elsewhere; compressed-tensors makes that an error; none skips it. "
        "`aligntool export` writes it later from an output.")
    eval_batch_size: PositiveInt = Field(8, description="Windows per forward pass when scoring.")
    seed: NonNegativeInt = Field(0, description="Seed of the search (mutations, random starts) and of JLCM's "
                                 "initialisation.")

    @model_validator(mode="after")
    def _budget(self):
        mode = "quant" if self.method == "jlcm" else self.mode
        if self.method == "jlcm" and self.mode not in ("quant", "sparsity"):
            raise ValueError("method jlcm is a quantizer: mode must be quant")
        self.mode = mode
        if self.method == "uniform" and mode == "depth":
            raise ValueError("method uniform applies to mode sparsity or quant (depth pruning has no uniform "
                             "version; use method: evopress)")
        if mode == "sparsity":
            if self.sparsity is None:
                raise ValueError("mode sparsity needs compress.sparsity (0 < s < 1)")
        if mode == "quant":
            if self.bits is None:
                raise ValueError(f"method {self.method} needs compress.bits")
            if self.bits_min > self.bits_max:
                raise ValueError(f"bits_min {self.bits_min} is above bits_max {self.bits_max}")
            if self.method == "jlcm" and (self.bits != int(self.bits) or not 1 <= self.bits <= 8):
                raise ValueError(f"compress.bits: jlcm needs whole bits in 1..8, got {self.bits}")
            if self.method != "jlcm" and not self.bits_min <= self.bits <= self.bits_max:
                raise ValueError(f"compress.bits {self.bits} is outside the levels bits_min..bits_max = "
                                 f"{self.bits_min}..{self.bits_max}; no assignment can meet it")
            if self.method == "uniform" and self.bits != int(self.bits):
                raise ValueError(f"compress.bits: uniform quantization needs whole bits, got {self.bits}")
        if self.saliency == "mfac" and (mode != "sparsity" or self.method == "jlcm"):
            raise ValueError(f"saliency mfac ranks weights for pruning: it needs mode sparsity (method evopress or "
                             f"uniform), got method {self.method}, mode {mode}")
        if self.export == "compressed-tensors" and (mode != "quant" or self.method == "jlcm"):
            raise ValueError(f"compress.export: compressed-tensors holds round-to-nearest quantization (mode quant, "
                             f"method evopress or uniform), not method {self.method}, mode {mode}; the packed/ folder "
                             f"is the compact form of this one (or set compress.export: auto or none)")
        if mode == "depth" and self.drop is None:
            raise ValueError("mode depth needs compress.drop (how many units to drop)")
        return self


class CompressRecipe(Strict):
    description: str | None = Field(None, description="Free text, for the reader of the recipe.")
    model: ModelConfig = Field(default_factory=ModelConfig, description="The model to compress.")
    calibration: CalibrationConfig = Field(default_factory=CalibrationConfig,
                                           description="Calibration text and windows.")
    compress: CompressConfig = Field(default_factory=CompressConfig, description="What to compress and how.")
    output_dir: str | None = Field(None, description="The compressed model folder; default "
                                   "runs/compress-<method>-<mode>.")

    @model_validator(mode="after")
    def _tokens(self):
        seq, n = self.calibration.seq_len, self.calibration.num_sequences
        if self.compress.saliency == "mfac" and self.compress.mfac_gradients > n:
            raise ValueError(f"compress.mfac_gradients: {self.compress.mfac_gradients} gradients need as many "
                             f"calibration windows; calibration.num_sequences is {n}")
        if self.compress.method == "evopress":
            for t in self.compress.evopress.tokens:
                if t % seq:
                    raise ValueError(f"compress.evopress.tokens: {t} is not a multiple of calibration.seq_len {seq}")
                if t > seq * n:
                    raise ValueError(f"compress.evopress.tokens: a stage needs {t} tokens but the calibration set has "
                                     f"{seq * n} (calibration.num_sequences {n} x seq_len {seq})")
        return self


def load_compress_recipe(recipe: str | Path, overrides: list[str] | tuple = ()) -> CompressRecipe:
    return load_compress_mapping(*read_recipe(recipe, overrides))


def load_compress_mapping(data: dict, source: str, lines: dict | None = None) -> CompressRecipe:
    """A compress recipe's mapping (a YAML file's content with its overrides, or the Python API's dict) validated."""
    lines = {} if lines is None else lines
    if "algorithm" in data:
        raise UserError(f"{source}: is a training recipe (it has 'algorithm'); run it with `aligntool train`")
    try:
        parsed = CompressRecipe.model_validate(data)
    except ValidationError as exc:
        raise _explain(exc.errors(), CompressRecipe, (), source, lines) from None
    if parsed.output_dir is None:
        parsed.output_dir = f"runs/compress-{parsed.compress.method}-{parsed.compress.mode}"
    return parsed
