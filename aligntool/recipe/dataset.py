"""The recipe's ``dataset`` section: where the data is (a file, a folder, a hub id, or a mixture of such sources),
which part of it, how its columns and published shape become the columns a method trains on, and the built-in toy
data. Read by aligntool/data (``load_for_recipe``); docs/DATASETS.md is the user's guide to these keys."""

from __future__ import annotations

from typing import Literal

from pydantic import (
    Field,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveInt,
    field_validator,
    model_validator,
)

from aligntool.recipe.base import Strict


class ToyDataConfig(Strict):
    size: PositiveInt = Field(2000, description="Number of generated training rows (preference data: pairs; unpaired "
                              "data: rows, made from size/2 pairs).")
    eval_size: NonNegativeInt = Field(0, description="Number of generated held-out rows (0: no eval set).")
    bt_temperature: NonNegativeFloat = Field(
        0.5, description="Bradley-Terry label noise of toy preference pairs: P(a>b)=sigmoid((r_a-r_b)/T); "
        "0 = noiseless."
    )
    seed: NonNegativeInt = Field(0, description="Seed of the generated rows (eval rows use seed + 1).")
    task: Literal["reviews", "arithmetic", "tools"] = Field(
        "reviews", description="'reviews': the toy world's review writing (every data kind). 'arithmetic': "
        "'Q: a+b= A:' questions with exactly checked answers, held-out questions never trained on (aligntool.toy."
        "arith; language-modeling and prompt data only). 'tools': 'What is 347 + 589?' as a conversational prompt "
        "with an `answer` column, for tool use (agent.tools: aligntool.toy.tools:calculator; reward "
        "aligntool.toy.tools:reward; model tiny-tools; prompt data only; held out by the unordered pair).")


DATA_FORMATS = ("trl", "hh-rlhf", "alpaca", "sharegpt", "ultrafeedback", "gsm8k")  # aligntool/data/published.py
STREAMING_CHECK_ROWS = 1000  # rows checked before a streamed dataset trains (aligntool/data/__init__.py)


class DataSourceFields(Strict):
    """What names one source of data: where it is, which part of it, and how its columns become aligntool's."""

    path: str = Field(description="A .jsonl/.json/.parquet/.csv file (or one compressed: .jsonl.gz, .json.zst, "
                      ".csv.bz2, ...), a glob of such files, a folder of them (e.g. parquet shards), a folder saved "
                      "by `datasets`, a hub id, or a datasets builder (json, csv, parquet, text) with `data_files`. "
                      "A relative path is looked for in the recipe file's folder first, then the working directory.")
    name: str | None = Field(None, description="Config (subset) of a hub dataset, passed to datasets.load_dataset "
                             "as `name` (openai/gsm8k: 'main' or 'socratic').")
    data_files: str | list[str] | dict[str, str | list[str]] | None = Field(
        None, description="Files of a hub id or a folder (relative to it), or of a builder `path` (json, csv, "
        "parquet, text; relative to the recipe's folder, then the working directory): one, a list, or a dict of "
        "split -> file(s), as datasets.load_dataset takes them.")
    split: str = Field("train", description="Split to train on, in datasets' split syntax with slices (train[:10%], "
                       "train[100:200], train+test); a file or a glob has one split, 'train'.")
    columns: dict[str, str] | None = Field(
        None, description="Rename map FROM the data's column names TO aligntool's ({question: prompt, response: "
        "completion}); applied first, before `format`. Unnamed columns keep their names; naming a column the data "
        "lacks is an error listing the columns found.")
    format: Literal[DATA_FORMATS] | None = Field(  # type: ignore[valid-type]
        None, description="A published shape converted to what the algorithm needs (docs/DATASETS.md): 'trl' "
        "(TRL's standard or conversational columns, as they are), 'hh-rlhf' (whole-dialogue chosen/rejected), "
        "'alpaca' (instruction/input/output), 'sharegpt' (conversations of from/value turns), 'ultrafeedback' "
        "(HuggingFaceH4's UltraFeedback-binarized), 'gsm8k' (question/answer; the number after '####' becomes "
        "column `answer` for reward functions, the worked solution column `solution`). Unset: TRL's columns.")

    @field_validator("columns")
    @classmethod
    def _distinct_targets(cls, value):
        if value is not None:
            twice = sorted({t for t in value.values() if list(value.values()).count(t) > 1})
            if twice:
                raise ValueError(f"two columns renamed to {', '.join(map(repr, twice))}")
        return value


class MixtureSource(DataSourceFields):
    """One source of ``dataset.mixture``: its own data and columns, and its share of the mixture."""

    weight: float | None = Field(None, gt=0, description="Relative share of the mixture (shares are weight / sum "
                                 "of weights); not with `fraction`. No weight nor fraction anywhere: equal shares.")
    fraction: float | None = Field(None, gt=0, le=1, description="Share of the mixture's rows (mixture_size); the "
                                   "sources' fractions sum to at most 1 (less: a smaller mixture); not with `weight`.")


class DatasetConfig(DataSourceFields):
    path: str = Field(
        "toy",
        description="'toy' (built-in data in the shape the algorithm needs), a .jsonl/.json/.parquet/.csv file (or "
        "one compressed: .jsonl.gz, .json.zst, .csv.bz2, ...), a glob of such files, a folder of them (e.g. parquet "
        "shards), a folder saved by `datasets`, a hub id, or a datasets builder (json, csv, parquet, text) with "
        "`data_files`. A relative path is looked for in the recipe file's folder first, then the working directory.",
    )
    eval_path: str | None = Field(None, description="Held-out data, same formats as `path`; `name`, `data_files`, "
                                  "`columns` and `format` apply to it too.")
    eval_split: str = Field("test", description="Split of `eval_path` to evaluate on (same syntax); an eval file with "
                            "eval_split left at its default is read whole.")
    max_samples: PositiveInt | None = Field(None, description="Keep only the first N training rows (of a mixture: "
                                            "of the mixed rows).")
    eval_fraction: float = Field(
        0.0, ge=0, lt=1, description="Without an eval set (eval_path, toy.eval_size): hold out this fraction of the "
        "training rows (seeded) for evaluation. With no eval set at all, evaluation is off and the log says so.")
    drop_invalid_rows: bool = Field(
        False, description="Drop rows with a null, non-text or mixed-format cell in a used column (counted in the "
        "log) instead of stopping with an error that names the first one.")
    unpaired_from_pairs: bool = Field(
        False, description="Unpaired-data algorithms (kto): read paired data (prompt, chosen, rejected: DPO's format) "
        "as two unpaired rows per pair, chosen -> label true, rejected -> label false, shuffled with toy.seed; "
        "eval_path too. The toy data of kto is made this way already.")
    mixture: list[MixtureSource] | None = Field(
        None, min_length=1, description="Several sources instead of `path`, each with its own path/name/data_files/"
        "split/columns/format and a `weight` or `fraction`; rows drawn with dataset.toy.seed (without replacement; a "
        "source asked for more rows than it has is repeated whole first), shuffled together; the realised count of "
        "each source is logged and written to data_mixture.json in output_dir. The top-level `columns`/`format`/"
        "`name`/`data_files` then apply to `eval_path` only.")
    mixture_size: PositiveInt | None = Field(
        None, description="Rows of the mixture. Unset: as many as the sources give without repeating a row (the "
        "source that runs out first at its share sets the total).")
    streaming: bool = Field(
        False, description=f"Language-modeling data (sft) only: read the training data as it is iterated (datasets' "
        f"IterableDataset) instead of loading it whole. The first {STREAMING_CHECK_ROWS} rows are checked before "
        "training; train.max_steps is required (the length is unknown); no eval_fraction, slices or mixture.")
    toy: ToyDataConfig = Field(default_factory=ToyDataConfig, description="Settings of the generated toy data.")

    @model_validator(mode="after")
    def _sources(self):
        if self.mixture is not None:
            if self.path != "toy":
                raise ValueError("set either path or mixture, not both")
            if self.streaming:
                raise ValueError("streaming: reads one source; a mixture is sampled from loaded sources")
            weighted = [s.weight is not None for s in self.mixture]
            fractions = [s.fraction is not None for s in self.mixture]
            if any(w and f for w, f in zip(weighted, fractions)) or (any(weighted) and any(fractions)):
                raise ValueError("mixture: give every source a weight or every source a fraction, not both kinds")
            if any(weighted) != all(weighted) or any(fractions) != all(fractions):
                which = "weight" if any(weighted) else "fraction"
                missing = [i for i, s in enumerate(self.mixture) if getattr(s, which) is None]
                raise ValueError(f"mixture[{missing[0]}] ({self.mixture[missing[0]].path}): has no {which}; give "
                                 f"every source a {which}")
            total = sum(s.fraction or 0 for s in self.mixture)
            if total > 1 + 1e-9:
                raise ValueError(f"mixture: the fractions sum to {total:g}, more than 1 (use weights for relative "
                                 "shares)")
        elif self.mixture_size is not None:
            raise ValueError("mixture_size: applies to a mixture (dataset.mixture); use max_samples for one source")
        if self.streaming and self.eval_fraction:
            raise ValueError("streaming: eval_fraction needs the whole training set; give an eval_path instead")
        return self
