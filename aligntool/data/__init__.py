"""Datasets: the built-in toy data, local files, saved folders and hub ids, checked against what an algorithm needs.

Formats are TRL's own, so a dataset that works with a TRL trainer works here:

=================  ==============================================================================================
data kind          accepted columns (standard = plain strings, conversational = lists of {role, content})
=================  ==============================================================================================
language_modeling  ``text`` | ``messages`` | ``prompt`` + ``completion``
preference         ``chosen`` + ``rejected``, with an explicit ``prompt`` or with the prompt implicit in both
prompt             ``prompt`` (other columns are ignored), for methods that sample their own completions
=================  ==============================================================================================
"""

from __future__ import annotations

import json
from pathlib import Path

from aligntool.errors import UserError

DATA_KINDS: dict[str, list[tuple[str, ...]]] = {
    "language_modeling": [("text",), ("messages",), ("prompt", "completion")],
    "preference": [("chosen", "rejected")],
    "prompt": [("prompt",)],  # methods that sample their own completions (RSO, SPPO)
}
FILE_LOADERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


def toy_rows(kind: str, size: int, seed: int, split: str, bt_temperature: float) -> list[dict]:
    from aligntool.toy import world

    if kind == "language_modeling":
        return world.sft_rows(size, seed=seed, split=split)
    if kind == "preference":
        return world.preference_pairs(size, seed=seed, split=split, bt_temperature=bt_temperature)
    if kind == "prompt":
        return [{"prompt": p} for p in world.prompts(split, size, seed=seed)]
    raise ValueError(f"no toy data for data kind {kind!r}")


def _check_jsonl(path: Path) -> None:
    """datasets' own error for a bad line is a long traceback without the line number: find the line first."""
    with path.open("rb") as fh:
        for number, line in enumerate(fh, 1):
            if line.strip():
                try:
                    json.loads(line)
                except ValueError as exc:
                    raise UserError(f"{path}:{number}: malformed JSON line ({exc.msg})") from None


def _looks_like_hub_id(path: str) -> bool:
    parts = path.split("/")
    return len(parts) in (1, 2) and not path.startswith((".", "~")) and all(parts) and Path(path).suffix == ""


def load_any(path: str, split: str, key: str):
    """A ``datasets.Dataset`` from a file, a saved folder or a hub id. ``key`` names the recipe key, for messages."""
    import datasets

    local = Path(path).expanduser()
    if local.is_file():
        loader = FILE_LOADERS.get(local.suffix.lower())
        if loader is None:
            raise UserError(f"{key}: {path}: unsupported file type {local.suffix!r}; expected one of {', '.join(FILE_LOADERS)}")
        if local.suffix.lower() == ".jsonl":
            _check_jsonl(local)
        try:
            return datasets.load_dataset(loader, data_files=str(local), split="train")
        except Exception as exc:  # noqa: BLE001 - datasets raises many types for a bad file
            raise UserError(f"{key}: {path}: could not read as {loader}: {str(exc).splitlines()[0]}") from None
    if local.is_dir():
        try:
            data = datasets.load_from_disk(str(local))
        except FileNotFoundError:
            raise UserError(f"{key}: {path}: folder is not a dataset saved with `save_to_disk`") from None
        if isinstance(data, datasets.DatasetDict):
            if split not in data:
                raise UserError(f"{key}: {path}: no split {split!r}; splits found: {', '.join(data)}")
            data = data[split]
        return data
    if not _looks_like_hub_id(path):
        raise UserError(f"{key}: {path}: dataset file not found")
    try:
        return datasets.load_dataset(path, split=split)
    except Exception as exc:  # noqa: BLE001
        raise UserError(f"{key}: could not load hub dataset {path!r} (split {split!r}): {str(exc).splitlines()[0]}") from None


def check_columns(data, kind: str, where: str) -> None:
    if len(data) == 0:
        raise UserError(f"{where}: dataset is empty")
    options = DATA_KINDS[kind]
    if not any(all(c in data.column_names for c in cols) for cols in options):
        wanted = " or ".join("+".join(cols) for cols in options)
        raise UserError(f"{where}: missing column(s) for {kind} data: expected {wanted}; found: {', '.join(data.column_names)}")


def load_for_recipe(recipe, kind: str):
    """(train, eval or None) datasets for a validated recipe and a data kind."""
    import datasets

    cfg = recipe.dataset
    if cfg.path == "toy":
        train = datasets.Dataset.from_list(toy_rows(kind, cfg.toy.size, cfg.toy.seed, "train", cfg.toy.bt_temperature))
        evald = None
        if cfg.toy.eval_size:
            evald = datasets.Dataset.from_list(
                toy_rows(kind, cfg.toy.eval_size, cfg.toy.seed + 1, "eval", cfg.toy.bt_temperature)
            )
    else:
        train = load_any(cfg.path, cfg.split, "dataset.path")
        evald = None
    if cfg.eval_path:
        evald = load_any(cfg.eval_path, cfg.eval_split, "dataset.eval_path")
    if cfg.max_samples is not None and len(train) > cfg.max_samples:
        train = train.select(range(cfg.max_samples))
    check_columns(train, kind, f"dataset.path {cfg.path}")
    if evald is not None:
        check_columns(evald, kind, f"dataset.eval_path {cfg.eval_path or 'toy'}")
    return train, evald
