"""Datasets: the built-in toy data, local files, saved folders and hub ids, checked against what an algorithm needs.

Formats are TRL's own, so a dataset that works with a TRL trainer works here:

=================  ==============================================================================================
data kind          accepted columns (standard = plain strings, conversational = lists of {role, content})
=================  ==============================================================================================
language_modeling  ``text`` | ``messages`` | ``prompt`` + ``completion``
preference         ``chosen`` + ``rejected``, with an explicit ``prompt`` or with the prompt implicit in both
                   (plain texts: their common start, or in HH-RLHF dialogues up to the last
                   ``"\\n\\nAssistant:"``, see ``split_implicit_prompt``; conversations: TRL splits them)
prompt             ``prompt`` (other columns are ignored), for methods that sample their own completions
unpaired           ``prompt`` + ``completion`` + ``label`` (true: desirable, false: undesirable), TRL's unpaired
                   preference format, for KTO; ``dataset.unpaired_from_pairs`` reads paired data instead
=================  ==============================================================================================

Unpaired labels must be booleans. Integer 0/1 (what pandas, CSV exports and many JSON dumps write) are accepted and
turned into false/true; anything else (strings such as "yes" or "true", other numbers, null) is an error naming the
row, or a dropped row with ``dataset.drop_invalid_rows``. A paired dataset becomes unpaired data with two rows per pair
(chosen -> true, rejected -> false), shuffled with ``dataset.toy.seed``: TRL's KTOTrainer reads the rows in order and
estimates its KL term from each batch's completions rotated by one row, so a pair's two rows must not sit side by
side (nor all desirable rows first).
"""

from __future__ import annotations

import json
from pathlib import Path

from aligntool.errors import UserError, first_line
from aligntool.quiet import without_progress_bars

DATA_KINDS: dict[str, list[tuple[str, ...]]] = {
    "language_modeling": [("text",), ("messages",), ("prompt", "completion")],
    "preference": [("chosen", "rejected")],
    "prompt": [("prompt",)],  # methods that sample their own completions (RSO, SPPO)
    "unpaired": [("prompt", "completion", "label")],  # KTO: TRL's unpaired preference format
}
FILE_LOADERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


def toy_rows(kind: str, size: int, seed: int, split: str, bt_temperature: float, task: str = "reviews") -> list[dict]:
    from aligntool.toy import world

    if task == "arithmetic":
        from aligntool.toy import arith

        if kind == "language_modeling":
            return arith.sft_rows(size, seed=seed, split=split)
        if kind == "prompt":
            return [{"prompt": p} for p in arith.prompts(split, size, seed=seed)]
        raise UserError(f"dataset.toy.task: 'arithmetic' has demonstrations and prompts, no {kind} data; "
                        "use task 'reviews' or an algorithm that trains on demonstrations (sft) or samples its own")
    if kind == "language_modeling":
        return world.sft_rows(size, seed=seed, split=split)
    if kind == "preference":
        return world.preference_pairs(size, seed=seed, split=split, bt_temperature=bt_temperature)
    if kind == "prompt":
        return [{"prompt": p} for p in world.prompts(split, size, seed=seed)]
    if kind == "unpaired":  # `size` rows from the toy world's preference pairs: chosen -> true, rejected -> false
        pairs = world.preference_pairs((size + 1) // 2, seed=seed, split=split, bt_temperature=bt_temperature)
        return unpair_rows(pairs, seed)[:size]
    raise ValueError(f"no toy data for data kind {kind!r}")


def unpair_rows(pairs: list[dict], seed: int) -> list[dict]:
    """Two unpaired rows per preference pair, (prompt, chosen, true) and (prompt, rejected, false), in a seeded random
    order (see the module docstring for why not side by side)."""
    import random

    rows = [{"prompt": p["prompt"], "completion": p[col], "label": col == "chosen"}
            for p in pairs for col in ("chosen", "rejected")]
    random.Random(seed).shuffle(rows)
    return rows


ASSISTANT_TURN = "\n\nAssistant:"  # HH-RLHF's dialogue format: "\n\nHuman: ...\n\nAssistant: ..." turns


def split_implicit_prompt(row: dict) -> dict:
    r"""(prompt, chosen, rejected) of a pair whose ``chosen`` and ``rejected`` texts each hold the whole exchange.

    The prompt is their common start (TRL's ``extract_prompt``), except in dialogue-formatted texts (HH-RLHF's
    ``\n\nHuman: ... \n\nAssistant: ...``): two replies often begin with the same letters ("D" of "DuckDuckGo" and
    of "Duckduckgo"), and the common start then runs into the replies and cuts a word in two. There the prompt ends at
    the last ``\n\nAssistant:`` of the common start, as TRL's own HH conversion script
    (examples/datasets/hh-rlhf-helpful-base.py) splits it, and each completion is the rest of its text (from the
    space after the colon)."""
    from trl.data_utils import extract_prompt

    split = extract_prompt(row)
    common = split["prompt"]
    if not common.endswith(ASSISTANT_TURN) and ASSISTANT_TURN in common:
        end = common.rfind(ASSISTANT_TURN) + len(ASSISTANT_TURN)
        return {"prompt": row["chosen"][:end], "chosen": row["chosen"][end:], "rejected": row["rejected"][end:]}
    return split


def implicit_prompts(data, where: str, log=print):
    """Pairs of plain texts without a ``prompt`` column get one (``split_implicit_prompt``); conversational pairs and
    pairs with a prompt are left to TRL, which splits conversations at the first differing message."""
    if "prompt" in data.column_names or _cell_kind(data[0]["chosen"]) != "text":
        return data
    dialogue = sum(ASSISTANT_TURN in c for c in data["chosen"])
    data = data.map(split_implicit_prompt)
    if dialogue:
        log(f"note: {where}: no prompt column: each pair's prompt is its dialogue up to the last "
            f"'\\n\\nAssistant:' turn the two texts share ({dialogue} of {len(data)} rows are dialogues; other "
            "rows: their common start)")
    return data


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
        if _cell_kind(data[0]["chosen"]) == "text":
            data = implicit_prompts(data, where, log)
        else:
            from trl.data_utils import extract_prompt

            data = data.map(extract_prompt)
    pairs = data.select_columns(["prompt", "chosen", "rejected"]).to_list()
    return datasets.Dataset.from_list(unpair_rows(pairs, seed))


def _check_jsonl(path: Path) -> None:
    """datasets' own error for a bad line is a long traceback without the line number: find the line first."""
    with path.open("rb") as fh:
        for number, raw in enumerate(fh, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise UserError(f"{path}:{number}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at column "
                                f"{exc.start + 1}); save the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(f"{path}:{number}: malformed JSON line ({exc.msg})") from None
            if not isinstance(row, dict):
                raise UserError(f"{path}:{number}: expected one JSON object per line, got a {type(row).__name__}")


def _looks_like_hub_id(path: str) -> bool:
    parts = path.split("/")
    return len(parts) in (1, 2) and not path.startswith((".", "~")) and all(parts) and Path(path).suffix == ""


GLOB_CHARS = "*?["


def local_candidates(path: str, base_dir: Path | None) -> list[Path]:
    """Where a relative data path of a recipe is looked for: the recipe file's folder first (as reward sources and
    chat template files are), then the working directory; an absolute path is itself."""
    given = Path(path).expanduser()
    if given.is_absolute() or base_dir is None:
        return [given.absolute()]
    return [(Path(base_dir) / given).absolute(), given.absolute()]


def shown_path(path: str | None, base_dir: Path | None) -> str | None:
    """A data path as messages show it: the local file or folder it resolved to (``local_candidates``), else as
    given (toy, a hub id)."""
    if path is None or path == "toy":
        return path
    return next((str(c) for c in local_candidates(path, base_dir) if _exists(c)), path)


def _exists(path: Path) -> bool:
    import glob

    return path.exists() or (any(c in str(path) for c in GLOB_CHARS) and bool(glob.glob(str(path), recursive=True)))


def _split_key(key: str) -> str:
    return key.replace("path", "split")  # dataset.path -> dataset.split, dataset.eval_path -> dataset.eval_split


def apply_split(splits: dict, spec: str, where: str, key: str):
    """``spec`` in datasets' split syntax (``train``, ``train[:10%]``, ``train[10:20]+test``) applied to the splits a
    local source has (a file or a glob has one, ``train``). An unknown split or a malformed spec names what exists."""
    import datasets
    from datasets import ReadInstruction

    try:
        parts = ReadInstruction.from_spec(spec).to_absolute({name: len(d) for name, d in splits.items()})
    except (ValueError, AssertionError) as exc:
        names = ", ".join(map(repr, splits))
        why = first_line(exc) if "Unknown split" not in str(exc) else "no such split"
        raise UserError(f"{key}: {spec!r}: {why}; {where} has the split(s) {names} (datasets' split syntax: e.g. "
                        f"{next(iter(splits))}[:10%], {next(iter(splits))}[100:200])") from None
    chosen = [splits[p.splitname].select(range(p.from_, p.to)) for p in parts]
    return chosen[0] if len(chosen) == 1 else datasets.concatenate_datasets(chosen)


def _is_saved_dataset(folder: Path) -> bool:
    """A folder written by ``save_to_disk`` (a Dataset or a DatasetDict)."""
    return (folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file()


def _data_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in FILE_LOADERS
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def load_any(path: str, split: str, key: str, base_dir: Path | None = None, split_given: bool = True):
    """A ``datasets.Dataset`` from a file, a glob of files, a folder of data files (parquet shards, jsonl, ...), a
    saved folder or a hub id. ``key`` names the recipe key, for messages. A relative path is looked for in the
    recipe's folder (``base_dir``), then the working directory. ``split`` (datasets' split syntax, slices included)
    applies to every source; a file has one split, ``train``, and ``split_given`` False (the key left at its default,
    e.g. eval_split ``test`` for an eval file) takes it whole."""
    import datasets

    candidates = local_candidates(path, base_dir)
    local = next((c for c in candidates if _exists(c)), candidates[0])
    split_key = _split_key(key)
    shown = str(local)
    if local.is_file() or (not local.exists() and _exists(local)):  # a file, or a glob of files of one type
        suffixes = {Path(f).suffix.lower() for f in _glob(local)} if not local.is_file() else {local.suffix.lower()}
        loader = FILE_LOADERS.get(next(iter(suffixes))) if len(suffixes) == 1 else None
        if loader is None:
            raise UserError(f"{key}: {shown}: unsupported file type {', '.join(sorted(suffixes))}; "
                            f"expected one of {', '.join(FILE_LOADERS)} (one type per glob)")
        files = [local] if local.is_file() else [Path(f) for f in _glob(local)]
        for file in files:
            if file.suffix.lower() == ".jsonl":
                _check_jsonl(file)
            if file.stat().st_size == 0 or (loader in ("json", "csv") and not file.read_bytes().strip()):
                raise UserError(f"{key}: {file}: the file is empty")
        try:
            data = datasets.load_dataset(loader, data_files=[str(f) for f in files], split="train")
        except Exception as exc:  # noqa: BLE001 - datasets raises many types for a bad file
            raise UserError(f"{key}: {shown}: could not read as {loader}: {first_line(exc)}") from None
        return apply_split({"train": data}, split if split_given else "train", shown, split_key)
    if local.is_dir():
        if _is_saved_dataset(local):
            try:
                data = datasets.load_from_disk(str(local))
            except FileNotFoundError:
                raise UserError(f"{key}: {shown}: folder is not a dataset saved with `save_to_disk`") from None
            if isinstance(data, datasets.DatasetDict):
                return apply_split(dict(data), split, shown, split_key)
            return apply_split({"train": data}, split if split_given else "train", shown, split_key)
        files = _data_files(local)
        if not files:
            raise UserError(f"{key}: {shown}: folder is neither a dataset saved with `save_to_disk` nor a folder of "
                            f"data files ({', '.join(FILE_LOADERS)})")
        try:  # datasets names the splits after the files (train-*.parquet, test.jsonl, ...), 'train' otherwise
            data = datasets.load_dataset(str(local))
        except Exception as exc:  # noqa: BLE001
            raise UserError(f"{key}: {shown}: could not read its data files: {first_line(exc)}") from None
        if list(data) == ["train"] and not split_given:
            split = "train"
        return apply_split(dict(data), split, shown, split_key)
    tried = " or ".join(str(c) for c in candidates)
    if not _looks_like_hub_id(path):
        raise UserError(f"{key}: {path}: dataset file not found (looked for {tried})")
    try:
        return datasets.load_dataset(path, split=split)
    except Exception as exc:  # noqa: BLE001
        raise UserError(f"{key}: could not load hub dataset {path!r} (split {split!r}; no local file or folder "
                        f"{tried}): {first_line(exc)}") from None


def _glob(pattern: Path) -> list[str]:
    import glob

    return sorted(f for f in glob.glob(str(pattern), recursive=True) if Path(f).is_file())


def check_columns(data, kind: str, where: str) -> tuple[str, ...]:
    """The columns of ``kind`` that ``data`` has (the first option that fits); an error names what is missing."""
    if len(data) == 0:
        raise UserError(f"{where}: dataset is empty")
    options = DATA_KINDS[kind]
    for cols in options:
        if all(c in data.column_names for c in cols):
            return (*cols, *(["prompt"] if kind == "preference" and "prompt" in data.column_names else []))
    wanted = " or ".join("+".join(cols) for cols in options)
    missing = [c for c in options[0] if c not in data.column_names] if kind == "unpaired" else []
    hint = ""
    if kind == "unpaired" and {"chosen", "rejected"} <= set(data.column_names):
        hint = "; this is paired data: set dataset.unpaired_from_pairs: true to train on it (two rows per pair)"
    raise UserError(f"{where}: missing column(s) {', '.join(map(repr, missing)) + ' ' if missing else ''}for {kind} "
                    f"data: expected {wanted}; found: {', '.join(data.column_names)}{hint}")


def _cell_kind(value) -> str | None:
    """'text', 'conversation' (a list of {role, content} messages) or None for anything else."""
    if isinstance(value, str):
        return "text"
    if isinstance(value, list) and value and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in value):
        return "conversation"
    return None


def _describe(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, list):
        return "an empty list" if not value else "a list that is not {role, content} messages"
    name = type(value).__name__
    return f"{'an' if name[0] in 'aeiou' else 'a'} {name} ({value!r:.40})"


def _label_ok(value) -> bool:
    """An unpaired ``label``: a boolean, or the integer 0 or 1."""
    return isinstance(value, bool) or (isinstance(value, int) and value in (0, 1))


def invalid_rows(data, columns: tuple[str, ...]) -> list[tuple[int, str, str]]:
    """(row index, column, what is wrong) for every bad cell: null, not a string nor a conversation, or a format that
    differs from the column's first valid cell (a conversation among strings, or the reverse). The ``label`` column of
    unpaired data holds booleans (or 0/1) instead."""
    bad = []
    for col in columns:
        values = data[col]
        if col == "label":
            bad += [(i, col, f"is {_describe(v)}; expected a boolean, true (desirable) or false (undesirable), or the "
                     "integer 1 or 0") for i, v in enumerate(values) if not _label_ok(v)]
            continue
        first = next((k for k in map(_cell_kind, values) if k is not None), None)
        for i, value in enumerate(values):
            kind = _cell_kind(value)
            if kind is None:
                bad.append((i, col, f"is {_describe(value)}; expected a string or a list of "
                            "{role, content} messages"))
            elif kind != first:
                bad.append((i, col, f"is a {kind} but earlier rows hold "
                            f"{'strings' if first == 'text' else 'conversations'}"))
    return sorted(bad)


def check_rows(data, columns: tuple[str, ...], where: str, drop: bool, log=print):
    """Every cell of ``columns`` must be a string or a conversation, one format per column. A bad cell is an error
    naming the row (1-based) and the column, or with ``dataset.drop_invalid_rows`` the row is dropped and counted."""
    bad = invalid_rows(data, columns)
    if not bad:
        return data
    i, col, what = bad[0]
    rows = sorted({b[0] for b in bad})
    if not drop:
        more = f" ({len(rows)} bad rows in all)" if len(rows) > 1 else ""
        raise UserError(f"{where}: row {i + 1}: column {col!r} {what}{more}; fix the data or set "
                        "dataset.drop_invalid_rows: true to skip such rows")
    kept = data.select(sorted(set(range(len(data))) - set(rows)))
    log(f"{where}: dropped {len(rows)} of {len(data)} rows with invalid cells (first: row {i + 1}, column {col!r} "
        f"{what})")
    if len(kept) == 0:
        raise UserError(f"{where}: every row has an invalid cell (first: row {i + 1}, column {col!r} {what})")
    return kept


def labels_as_bool(data):
    """Unpaired labels given as 0/1 become the booleans TRL's KTOTrainer expects (checked by ``check_rows`` first)."""
    import datasets

    if "label" not in data.column_names or data.features["label"] == datasets.Value("bool"):
        return data
    return data.cast_column("label", datasets.Value("bool"))


def prompts_as_text(data, tokenizer, where: str):
    """Conversational prompts (lists of messages) become text through the tokenizer's chat template with the
    generation prompt, as TRL does for the offline methods; the sampling methods then work on strings."""
    if "prompt" not in data.column_names or _cell_kind(data[0]["prompt"]) != "conversation":
        return data
    return data.map(lambda row: {"prompt": tokenizer.apply_chat_template(row["prompt"], tokenize=False,
                                                                          add_generation_prompt=True)})


def check_template(data, columns: tuple[str, ...], tokenizer, where: str) -> None:
    """Conversational rows (lists of {role, content}) go through the tokenizer's chat template; a model without one
    (base checkpoints: GPT-2, Pythia, most pretrained-only models) is named before TRL fails deep inside."""
    conversational = [c for c in columns if _cell_kind(data[0][c]) == "conversation"]
    if conversational and not getattr(tokenizer, "chat_template", None):
        from aligntool.tokens import TEMPLATES

        raise UserError(f"{where}: column {conversational[0]!r} holds conversations but the model's tokenizer has no "
                        f"chat template; set model.chat_template: <a Jinja file, or one of {', '.join(TEMPLATES)}>, "
                        "or give plain-text rows")


def _fraction_split(train, fraction: float, seed: int, log, what: str = "rows"):
    """``dataset.eval_fraction``: (train, held-out) split of the rows, seeded."""
    n_eval = max(1, round(fraction * len(train)))
    if n_eval >= len(train):
        raise UserError(f"dataset.eval_fraction: {fraction} of {len(train)} {what} leaves none to train on")
    split = train.train_test_split(test_size=n_eval, seed=seed, shuffle=True)
    log(f"dataset.eval_fraction: {n_eval} of {len(train)} {what} held out for evaluation")
    return split["train"], split["test"]


@without_progress_bars  # our checks answer in one line; datasets' bars for each file and map would come first
def load_for_recipe(recipe, kind: str, tokenizer=None, log=print, base_dir: Path | None = None):
    """(train, eval or None) datasets for a validated recipe and a data kind, checked row by row. ``eval_fraction``
    carves a held-out split off the training rows when there is no eval set; with a tokenizer, conversational
    prompts of the sampling methods become text. Relative data paths are looked for in ``base_dir`` (the recipe's
    folder) first, then the working directory."""
    import datasets

    cfg = recipe.dataset
    # a split left at its default reads a file whole; judged by value, not by whether the key was written, so that a
    # run's own recipe.yaml (every default filled in) reads the data as the first run did
    defaults = type(cfg).model_fields
    from_pairs = getattr(cfg, "unpaired_from_pairs", False)
    if from_pairs and kind != "unpaired":
        raise UserError(f"dataset.unpaired_from_pairs: applies to algorithms that train on unpaired data (kto); this "
                        f"one trains on {kind} data")
    if cfg.path == "toy":  # unpaired toy rows are made from the toy pairs already
        train = datasets.Dataset.from_list(toy_rows(kind, cfg.toy.size, cfg.toy.seed, "train", cfg.toy.bt_temperature,
                                                    cfg.toy.task))
        evald = None
        if cfg.toy.eval_size:
            evald = datasets.Dataset.from_list(
                toy_rows(kind, cfg.toy.eval_size, cfg.toy.seed + 1, "eval", cfg.toy.bt_temperature, cfg.toy.task)
            )
    else:
        train = load_any(cfg.path, cfg.split, "dataset.path", base_dir, cfg.split != defaults["split"].default)
        evald = None
    if cfg.eval_path:
        evald = load_any(cfg.eval_path, cfg.eval_split, "dataset.eval_path", base_dir,
                         cfg.eval_split != defaults["eval_split"].default)
    if cfg.max_samples is not None and len(train) > cfg.max_samples:
        train = train.select(range(cfg.max_samples))
    where = f"dataset.path {shown_path(cfg.path, base_dir)}"
    if from_pairs and cfg.path != "toy":
        if evald is None and cfg.eval_fraction:  # hold out whole pairs: a pair's two rows stay on one side
            train, evald = _fraction_split(train, cfg.eval_fraction, cfg.toy.seed, log, "pairs")
            evald = unpair_dataset(evald, where, cfg.toy.seed, cfg.drop_invalid_rows, log)
        train = unpair_dataset(train, where, cfg.toy.seed, cfg.drop_invalid_rows, log)
        log(f"dataset.unpaired_from_pairs: {len(train) // 2} pairs -> {len(train)} unpaired rows")
    columns = check_columns(train, kind, where)
    train = labels_as_bool(check_rows(train, columns, where, cfg.drop_invalid_rows, log))
    if kind == "unpaired" and not from_pairs and cfg.path != "toy":
        # TRL's KTOTrainer reads rows in order and estimates its KL reference point from each batch's rows shifted by
        # one: a file sorted by label or with a pair's rows side by side would bias it; shuffled with toy.seed
        train = train.shuffle(seed=cfg.toy.seed).flatten_indices()
    if evald is not None:
        where_eval = f"dataset.eval_path {shown_path(cfg.eval_path, base_dir) if cfg.eval_path else 'toy'}"
        if from_pairs and cfg.eval_path:
            evald = unpair_dataset(evald, where_eval, cfg.toy.seed, cfg.drop_invalid_rows, log)
        where_eval = where if from_pairs and cfg.eval_fraction and not cfg.eval_path else where_eval
        evald = check_rows(evald, check_columns(evald, kind, where_eval), where_eval, cfg.drop_invalid_rows, log)
        evald = labels_as_bool(evald)
    elif cfg.eval_fraction:
        train, evald = _fraction_split(train, cfg.eval_fraction, cfg.toy.seed, log)
    if kind == "preference":
        train = implicit_prompts(train, where, log)
        if evald is not None:  # eval rows carved from the training file were described with the training rows
            evald = implicit_prompts(evald, f"dataset.eval_path {shown_path(cfg.eval_path, base_dir)}", log) \
                if cfg.eval_path else implicit_prompts(evald, where, lambda message: None)
    if tokenizer is not None:
        check_template(train, columns, tokenizer, where)
    if tokenizer is not None and kind == "prompt":
        train = prompts_as_text(train, tokenizer, where)
        evald = prompts_as_text(evald, tokenizer, where) if evald is not None else None
    return train, evald
