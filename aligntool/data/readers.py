"""Readers: a ``datasets.Dataset`` from a file, a glob of files, a folder of data files, a ``save_to_disk`` folder or a
hub id, with datasets' split syntax applied to every source. A relative path is looked for in the recipe's folder,
then the working directory; a bad file is named in one line (the JSONL line, the empty file, the unknown split)."""

from __future__ import annotations

import json
from pathlib import Path

from aligntool.errors import UserError, first_line

FILE_LOADERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
GLOB_CHARS = "*?["


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
    candidates = local_candidates(path, base_dir)
    local = next((c for c in candidates if _exists(c)), candidates[0])
    if local.is_file() or (not local.exists() and _exists(local)):  # a file, or a glob of files of one type
        return _read_files(local, split, key, split_given)
    if local.is_dir():
        return _read_folder(local, split, key, split_given)
    return _read_hub(path, split, key, candidates)


def _read_files(local: Path, split: str, key: str, split_given: bool):
    """A data file, or a glob of files of one type: one split, ``train``."""
    import datasets

    shown = str(local)
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
    return apply_split({"train": data}, split if split_given else "train", shown, _split_key(key))


def _read_folder(local: Path, split: str, key: str, split_given: bool):
    """A folder saved with ``save_to_disk`` (a Dataset or a DatasetDict), or a folder of data files."""
    import datasets

    shown, split_key = str(local), _split_key(key)
    if _is_saved_dataset(local):
        try:
            data = datasets.load_from_disk(str(local))
        except FileNotFoundError:
            raise UserError(f"{key}: {shown}: folder is not a dataset saved with `save_to_disk`") from None
        if isinstance(data, datasets.DatasetDict):
            return apply_split(dict(data), split, shown, split_key)
        return apply_split({"train": data}, split if split_given else "train", shown, split_key)
    if not _data_files(local):
        raise UserError(f"{key}: {shown}: folder is neither a dataset saved with `save_to_disk` nor a folder of "
                        f"data files ({', '.join(FILE_LOADERS)})")
    try:  # datasets names the splits after the files (train-*.parquet, test.jsonl, ...), 'train' otherwise
        data = datasets.load_dataset(str(local))
    except Exception as exc:  # noqa: BLE001
        raise UserError(f"{key}: {shown}: could not read its data files: {first_line(exc)}") from None
    if list(data) == ["train"] and not split_given:
        split = "train"
    return apply_split(dict(data), split, shown, split_key)


def _read_hub(path: str, split: str, key: str, candidates: list[Path]):
    """A hub dataset id (no local file or folder of that name)."""
    import datasets

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
