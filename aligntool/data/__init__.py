"""Datasets: the built-in toy data, local files, saved folders and hub ids, checked against what an algorithm needs.

    readers.py   files (compressed too), globs, folders, saved datasets, hub ids (config name, data_files),
                 builders with data_files; split syntax; streaming              (``load_any``, ``shown_path``)
    published.py ``dataset.columns`` renames and ``dataset.format``: published shapes (HH-RLHF, Alpaca, ShareGPT,
                 UltraFeedback, GSM8K) as the method's columns             (``apply_columns``, ``apply_format``)
    mixture.py   ``dataset.mixture``: several sources at set shares, drawn with a seed            (``mix``)
    formats.py   data kinds and row shapes, toy rows, conversions between shapes  (``DATA_KINDS``, ``toy_rows``)
    checks.py    columns and cells, row by row; chat templates                    (``check_columns``, ``check_rows``)
    here         ``load_for_recipe``: a recipe's (train, eval) datasets, read, renamed, converted, mixed and
                 checked in that order

The data kinds and their columns are listed in formats.py; the whole ``dataset`` spec in docs/DATASETS.md.
"""

from __future__ import annotations

from pathlib import Path

from aligntool.data.checks import check_columns, check_rows, check_template, invalid_rows
from aligntool.data.formats import (
    ASSISTANT_TURN,
    DATA_KINDS,
    cell_kind,
    implicit_prompts,
    labels_as_bool,
    prompts_as_text,
    split_implicit_prompt,
    toy_rows,
    unpair_rows,
)
from aligntool.data.published import FORMATS, apply_columns, apply_format, gsm8k_final_answer
from aligntool.data.readers import FILE_LOADERS, GLOB_CHARS, apply_split, load_any, local_candidates, shown_path
from aligntool.errors import UserError
from aligntool.quiet import without_progress_bars

__all__ = ["ASSISTANT_TURN", "DATA_KINDS", "FILE_LOADERS", "FORMATS", "GLOB_CHARS", "apply_columns", "apply_format",
           "apply_split", "cell_kind", "check_columns", "check_rows", "check_template", "gsm8k_final_answer",
           "implicit_prompts", "invalid_rows", "labels_as_bool", "load_any", "load_for_recipe", "local_candidates",
           "prompts_as_text", "shown_path", "split_implicit_prompt", "toy_rows", "unpair_dataset", "unpair_rows"]


@without_progress_bars  # our checks answer in one line; datasets' bars for each file and map would come first
def load_for_recipe(recipe, kind: str, tokenizer=None, log=print, base_dir: Path | None = None,
                    output_dir: Path | None = None, keep_conversations: bool = False):
    """(train, eval or None) datasets for a validated recipe and a data kind, checked row by row. ``eval_fraction``
    carves a held-out split off the training rows when there is no eval set; with a tokenizer, conversational
    prompts of the sampling methods become text, unless ``keep_conversations`` (the trainer applies the chat template
    itself: TRL's GRPO / RLOO, the engine's multi-turn episodes). Relative data paths are looked for in ``base_dir``
    (the recipe's folder) first, then the working directory. A mixture's realised counts go to
    ``output_dir``/data_mixture.json. With ``dataset.streaming`` the training set is an ``IterableDataset``
    (``_streamed``)."""
    cfg = recipe.dataset
    from_pairs = getattr(cfg, "unpaired_from_pairs", False)
    if from_pairs and kind != "unpaired":
        raise UserError(f"dataset.unpaired_from_pairs: applies to algorithms that train on unpaired data (kto); this "
                        f"one trains on {kind} data")
    if cfg.streaming:
        return _streamed(recipe, kind, tokenizer, log, base_dir)
    where = "dataset.mixture" if cfg.mixture else f"dataset.path {shown_path(cfg.path, base_dir)}"
    train, evald = _read(recipe, kind, base_dir, log, output_dir)
    if from_pairs and (cfg.path != "toy" or cfg.mixture):  # unpaired toy rows are made from the toy pairs already
        train, evald = _unpaired_from_pairs(cfg, train, evald, where, log)
    columns = check_columns(train, kind, where)
    train = labels_as_bool(check_rows(train, columns, where, cfg.drop_invalid_rows, log))
    if kind == "unpaired" and not from_pairs and (cfg.path != "toy" or cfg.mixture):
        # TRL's KTOTrainer reads rows in order and estimates its KL reference point from each batch's rows shifted by
        # one: a file sorted by label or with a pair's rows side by side would bias it; shuffled with toy.seed
        train = train.shuffle(seed=cfg.toy.seed).flatten_indices()
    if evald is not None:
        evald = _checked_eval(cfg, kind, evald, where, from_pairs, base_dir, log)
    elif cfg.eval_fraction:
        train, evald = _fraction_split(train, cfg.eval_fraction, cfg.toy.seed, log)
    if kind == "preference":
        train, evald = _with_prompts(cfg, train, evald, where, base_dir, log)
    if tokenizer is not None:
        check_template(train, columns, tokenizer, where)
    if tokenizer is not None and kind == "prompt" and not keep_conversations:
        train = prompts_as_text(train, tokenizer, where)
        evald = prompts_as_text(evald, tokenizer, where) if evald is not None else None
    return train, evald


def _read(recipe, kind: str, base_dir: Path | None, log, output_dir: Path | None):
    """(train, eval or None) as the recipe's ``dataset`` section names them (toy rows, files or a mixture), renamed
    and converted (``columns``, ``format``), ``max_samples`` applied; rows not checked yet."""
    import datasets

    cfg = recipe.dataset
    # a split left at its default reads a file whole; judged by value, not by whether the key was written, so that a
    # run's own recipe.yaml (every default filled in) reads the data as the first run did
    defaults = type(cfg).model_fields
    evald = None
    if cfg.mixture:
        train = _mixture(recipe, kind, base_dir, log, output_dir)
    elif cfg.path == "toy":
        toy = cfg.toy
        train = datasets.Dataset.from_list(toy_rows(kind, toy.size, toy.seed, "train", toy.bt_temperature, toy.task))
        if toy.eval_size:
            evald = datasets.Dataset.from_list(
                toy_rows(kind, toy.eval_size, toy.seed + 1, "eval", toy.bt_temperature, toy.task))
    else:
        train = _source(recipe, cfg, cfg.path, cfg.split, cfg.split != defaults["split"].default, kind,
                        f"dataset.path {shown_path(cfg.path, base_dir)}", "dataset.path", base_dir)
    if cfg.eval_path:
        evald = _source(recipe, cfg, cfg.eval_path, cfg.eval_split, cfg.eval_split != defaults["eval_split"].default,
                        kind, f"dataset.eval_path {shown_path(cfg.eval_path, base_dir)}", "dataset.eval_path",
                        base_dir)
    if cfg.max_samples is not None and len(train) > cfg.max_samples:
        train = train.select(range(cfg.max_samples))
    return train, evald


def _source(recipe, spec, path: str, split: str, split_given: bool, kind: str, where: str, key: str,
            base_dir: Path | None, streaming: bool = False):
    """One source (``dataset`` itself, or a mixture entry ``spec``) read, its columns renamed and its format
    converted to ``kind``'s columns."""
    name, files = spec.name, spec.data_files
    if key == "dataset.eval_path" and any(c.is_file() for c in local_candidates(path, base_dir)):
        name = files = None  # the training set's hub config and files say nothing about an eval file
    data = load_any(path, split, key, base_dir, split_given, name=name, data_files=files, streaming=streaming)
    data = apply_columns(data, spec.columns, where)
    return apply_format(data, spec.format, kind, where, recipe.algorithm, recipe.dataset.unpaired_from_pairs)


def _mixture(recipe, kind: str, base_dir: Path | None, log, output_dir: Path | None):
    """``dataset.mixture``: each source read, converted and checked on its own (a bad row is named in its source),
    then mixed (aligntool/data/mixture.py); the realised counts logged and written to output_dir."""
    from aligntool.data.mixture import mix

    cfg = recipe.dataset
    shape = "preference" if cfg.unpaired_from_pairs else kind
    parts, names = [], []
    for i, source in enumerate(cfg.mixture):
        where = f"dataset.mixture[{i}] {shown_path(source.path, base_dir)}"
        part = _source(recipe, source, source.path, source.split, source.split != "train", kind, where,
                       f"dataset.mixture[{i}].path", base_dir)
        part = check_rows(part, check_columns(part, shape, where), where, cfg.drop_invalid_rows, log)
        parts.append(implicit_prompts(part, where, log) if shape == "preference" else part)
        names.append(where)
    fits = [check_columns(p, shape, n) for p, n in zip(parts, names)]
    odd = next((i for i, f in enumerate(fits) if set(f) - {"prompt"} != set(fits[0]) - {"prompt"}), None)
    if odd is not None:
        raise UserError(f"{names[odd]}: gives the columns {'+'.join(fits[odd])}, {names[0]} gives "
                        f"{'+'.join(fits[0])}; map them to the same ones (dataset.mixture[{odd}].columns or .format)")
    mixed, records = mix(parts, names, cfg.mixture, cfg.mixture_size, cfg.toy.seed, log)
    if output_dir is not None:
        from aligntool.outputs import write_data_mixture

        write_data_mixture(Path(output_dir), {"seed": cfg.toy.seed, "rows": len(mixed), "sources": records})
    return mixed


def _streamed(recipe, kind: str, tokenizer, log, base_dir: Path | None):
    """``dataset.streaming``: the training set as datasets' ``IterableDataset``, its first STREAMING_CHECK_ROWS rows
    checked; language-modeling data only, with ``train.max_steps`` (the length is unknown)."""
    import datasets

    from aligntool.recipe.schema import STREAMING_CHECK_ROWS

    cfg = recipe.dataset
    if kind != "language_modeling":
        raise UserError(f"dataset.streaming: applies to language-modeling data (sft); {recipe.algorithm} trains on "
                        f"{kind} data")
    if cfg.path == "toy":
        raise UserError("dataset.streaming: applies to data files and hub datasets; the toy data is generated whole")
    auto = [k for k in ("learning_rate", "per_device_train_batch_size") if getattr(recipe.train, k) == "auto"]
    if auto:
        raise UserError(f"dataset.streaming: train.{auto[0]}: auto needs the training set's size (Step Law counts "
                        "its tokens); give a value")
    if recipe.train.max_steps is None:
        raise UserError("dataset.streaming: set train.max_steps (a streamed dataset's length is unknown, so epochs "
                        "cannot be counted)")
    where = f"dataset.path {shown_path(cfg.path, base_dir)}"
    train = _source(recipe, cfg, cfg.path, cfg.split, True, kind, where, "dataset.path", base_dir, streaming=True)
    if cfg.max_samples is not None:
        train = train.take(cfg.max_samples)
    head = datasets.Dataset.from_list(list(train.take(STREAMING_CHECK_ROWS)))
    columns = check_columns(head, kind, f"{where} (first {STREAMING_CHECK_ROWS} rows)")
    check_rows(head, columns, f"{where} (first {len(head)} rows, streamed)", cfg.drop_invalid_rows, log)
    if cfg.drop_invalid_rows:  # the rest is checked as it streams: rows without a string or conversation dropped
        train = train.filter(lambda row: all(cell_kind(row[c]) is not None for c in columns))
    train = train.select_columns(list(columns))
    if tokenizer is not None:
        check_template(head, columns, tokenizer, where)
    evald = None
    if cfg.eval_path:
        defaults = type(cfg).model_fields
        evald = _source(recipe, cfg, cfg.eval_path, cfg.eval_split, cfg.eval_split != defaults["eval_split"].default,
                        kind, f"dataset.eval_path {shown_path(cfg.eval_path, base_dir)}", "dataset.eval_path",
                        base_dir)
        evald = _checked_eval(cfg, kind, evald, where, False, base_dir, log)
    log(f"{where}: streamed (the first {len(head)} rows checked; train.max_steps {recipe.train.max_steps} sets the "
        "length of the run)")
    return train, evald


def _unpaired_from_pairs(cfg, train, evald, where: str, log):
    """``dataset.unpaired_from_pairs``: the training pairs as unpaired rows; an ``eval_fraction`` holds out whole pairs
    first (a pair's two rows stay on one side)."""
    if evald is None and cfg.eval_fraction:
        train, evald = _fraction_split(train, cfg.eval_fraction, cfg.toy.seed, log, "pairs")
        evald = unpair_dataset(evald, where, cfg.toy.seed, cfg.drop_invalid_rows, log)
    train = unpair_dataset(train, where, cfg.toy.seed, cfg.drop_invalid_rows, log)
    log(f"dataset.unpaired_from_pairs: {len(train) // 2} pairs -> {len(train)} unpaired rows")
    return train, evald


def _checked_eval(cfg, kind: str, evald, where: str, from_pairs: bool, base_dir: Path | None, log):
    """The eval set checked as the training set is (rows held out of the training pairs are described with them)."""
    where_eval = f"dataset.eval_path {shown_path(cfg.eval_path, base_dir) if cfg.eval_path else 'toy'}"
    if from_pairs and cfg.eval_path:
        evald = unpair_dataset(evald, where_eval, cfg.toy.seed, cfg.drop_invalid_rows, log)
    where_eval = where if from_pairs and cfg.eval_fraction and not cfg.eval_path else where_eval
    evald = check_rows(evald, check_columns(evald, kind, where_eval), where_eval, cfg.drop_invalid_rows, log)
    return labels_as_bool(evald)


def _with_prompts(cfg, train, evald, where: str, base_dir: Path | None, log):
    """Preference pairs without a prompt column get one (``implicit_prompts``); eval rows carved from the training
    file were described with the training rows."""
    train = implicit_prompts(train, where, log)
    if evald is not None:
        evald = implicit_prompts(evald, f"dataset.eval_path {shown_path(cfg.eval_path, base_dir)}", log) \
            if cfg.eval_path else implicit_prompts(evald, where, lambda message: None)
    return train, evald


def unpair_dataset(data, where: str, seed: int, drop: bool, log=print):
    """A paired dataset (prompt, chosen, rejected; an implicit prompt is taken from the common start as TRL does) as
    unpaired rows: ``dataset.unpaired_from_pairs``."""
    import datasets

    if not {"chosen", "rejected"} <= set(data.column_names):
        raise UserError(f"{where}: dataset.unpaired_from_pairs: expects paired data with columns chosen+rejected "
                        f"(and prompt); found: {', '.join(data.column_names)}")
    columns = check_columns(data, "preference", where)
    data = check_rows(data, columns, where, drop, log)
    if "prompt" not in data.column_names:
        if cell_kind(data[0]["chosen"]) == "text":
            data = implicit_prompts(data, where, log)
        else:
            from trl.data_utils import extract_prompt

            data = data.map(extract_prompt)
    pairs = data.select_columns(["prompt", "chosen", "rejected"]).to_list()
    return datasets.Dataset.from_list(unpair_rows(pairs, seed))


def _fraction_split(train, fraction: float, seed: int, log, what: str = "rows"):
    """``dataset.eval_fraction``: (train, held-out) split of the rows, seeded."""
    n_eval = max(1, round(fraction * len(train)))
    if n_eval >= len(train):
        raise UserError(f"dataset.eval_fraction: {fraction} of {len(train)} {what} leaves none to train on")
    split = train.train_test_split(test_size=n_eval, seed=seed, shuffle=True)
    log(f"dataset.eval_fraction: {n_eval} of {len(train)} {what} held out for evaluation")
    return split["train"], split["test"]
