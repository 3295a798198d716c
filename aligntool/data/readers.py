"""Readers: a ``datasets.Dataset`` from a file (compressed too: ``.jsonl.gz``, ``.json.zst``, ``.csv.bz2``, ...), a
glob of files, a folder of data files, a ``save_to_disk`` folder, a hub id (with its config ``name`` and
``data_files``) or a builder name with ``data_files``, with datasets' split syntax applied to every source. A relative
path is looked for in the recipe's folder, then the working directory; a bad file is named in one line (the JSONL
line, the empty file, the unknown split). ``streaming`` gives datasets' ``IterableDataset`` instead (no slices)."""

from __future__ import annotations

import json
from pathlib import Path

from aligntool.errors import UserError, first_line

FILE_LOADERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
# compressed files datasets reads itself (fsspec infers the codec from the suffix); the loader is the suffix before
COMPRESSIONS = {".gz": "gzip", ".zst": "zstd", ".bz2": "bz2", ".xz": "xz"}
BUILDERS = ("json", "csv", "parquet", "text", "arrow")  # datasets' builders a `path` may name, with `data_files`
GLOB_CHARS = "*?["


def data_suffix(path: Path | str) -> str:
    """The data suffix of a file, under its compression suffix: ``a.jsonl.gz`` -> ``.jsonl``, ``a.csv`` -> ``.csv``."""
    path = Path(path)
    suffix = path.suffix.lower()
    return Path(path.stem).suffix.lower() if suffix in COMPRESSIONS else suffix


def _open_decompressed(path: Path):
    """The file's bytes, decompressed as its suffix says (gzip, zstd, bz2, xz) or as they are."""
    codec = COMPRESSIONS.get(path.suffix.lower())
    if codec == "gzip":
        import gzip

        return gzip.open(path, "rb")
    if codec == "zstd":
        import io

        import zstandard

        return io.BufferedReader(zstandard.open(path, "rb"))  # its reader has no readline: buffered for lines
    if codec == "bz2":
        import bz2

        return bz2.open(path, "rb")
    if codec == "xz":
        import lzma

        return lzma.open(path, "rb")
    return path.open("rb")


def _check_jsonl(path: Path) -> int:
    """datasets' own error for a bad line is a long traceback without the line number: find the line first (through
    the decompression of a compressed file). Returns the number of rows."""
    try:
        return _check_jsonl_lines(path)
    except (OSError, EOFError) as exc:  # gzip.BadGzipFile, zstd errors, truncated archives
        raise UserError(f"{path}: cannot decompress ({first_line(exc)})") from None


def _check_jsonl_lines(path: Path) -> int:
    rows = 0
    with _open_decompressed(path) as fh:
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
            rows += 1
    return rows


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
    lengths = {name: len(d) for name, d in splits.items()}
    for rel in ReadInstruction.from_spec(spec)._relative_instructions:  # datasets clamps; a bound past the end is
        bounds = [b for b in (rel.from_, rel.to) if b is not None]     # a mistake, said here
        if rel.unit == "abs" and any(abs(b) > lengths[rel.splitname] for b in bounds):
            raise UserError(f"{key}: {spec!r}: outside the data: the split {rel.splitname!r} of {where} has "
                            f"{lengths[rel.splitname]} rows")
    if not any(p.to > p.from_ for p in parts):
        raise UserError(f"{key}: {spec!r}: selects no rows of {where}")
    chosen = [splits[p.splitname].select(range(p.from_, p.to)) for p in parts]
    return chosen[0] if len(chosen) == 1 else datasets.concatenate_datasets(chosen)


def _is_saved_dataset(folder: Path) -> bool:
    """A folder written by ``save_to_disk`` (a Dataset or a DatasetDict)."""
    return (folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file()


def _data_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and data_suffix(p) in FILE_LOADERS
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def load_any(path: str, split: str, key: str, base_dir: Path | None = None, split_given: bool = True, *,
             name: str | None = None, data_files=None, streaming: bool = False):
    """A ``datasets.Dataset`` from a file, a glob of files, a folder of data files (parquet shards, jsonl, ...), a
    saved folder, a hub id or a builder name (``json``, ``csv``, ``parquet``, ...) with ``data_files``. ``key`` names
    the recipe key, for messages. A relative path is looked for in the recipe's folder (``base_dir``), then the
    working directory. ``split`` (datasets' split syntax, slices included) applies to every source; a file has one
    split, ``train``, and ``split_given`` False (the key left at its default, e.g. eval_split ``test`` for an eval
    file) takes it whole. ``name`` is a hub dataset's config (subset); ``data_files`` is passed to
    ``datasets.load_dataset`` as it takes it (a file, a list, or a dict of splits), relative to a folder or hub id.
    ``streaming``: an ``IterableDataset`` read as it is iterated (a plain split name, no slices)."""
    if streaming and any(c in split for c in "[]+"):
        raise UserError(f"{_split_key(key)}: {split!r}: slices are not available with dataset.streaming (the length "
                        "is unknown); name a plain split and use dataset.max_samples for the first N rows")
    candidates = local_candidates(path, base_dir)
    local = next((c for c in candidates if _exists(c)), candidates[0])
    if local.is_file() or (not local.exists() and _exists(local)):  # a file, or a glob of files of one type
        if data_files is not None or name is not None:
            raise UserError(f"{key}: {local} is a data file: dataset.name and dataset.data_files apply to a hub id, "
                            "a folder or a builder (json, csv, parquet, ...)")
        return _read_files(local, split, key, split_given, streaming)
    if local.is_dir():
        return _read_folder(local, split, key, split_given, data_files, streaming)
    if path in BUILDERS and data_files is not None:
        return _read_builder(path, split, key, split_given, _local_data_files(data_files, base_dir), streaming)
    return _read_hub(path, split, key, candidates, name, data_files, streaming)


def _local_data_files(data_files, base_dir: Path | None):
    """``data_files`` of a builder, each relative file looked for as ``path`` is (the recipe's folder first)."""
    def one(f: str) -> str:
        return str(next((c for c in local_candidates(f, base_dir) if _exists(c)), Path(f).expanduser().absolute()))

    if isinstance(data_files, dict):
        return {k: [one(f) for f in ([v] if isinstance(v, str) else v)] for k, v in data_files.items()}
    return [one(f) for f in ([data_files] if isinstance(data_files, str) else data_files)]


def _read_files(local: Path, split: str, key: str, split_given: bool, streaming: bool = False):
    """A data file, or a glob of files of one type: one split, ``train``."""
    import datasets

    shown = str(local)
    files = [local] if local.is_file() else [Path(f) for f in _glob(local)]
    suffixes = {data_suffix(f) for f in files}
    loader = FILE_LOADERS.get(next(iter(suffixes))) if len(suffixes) == 1 else None
    if loader is None:
        raise UserError(f"{key}: {shown}: unsupported file type {', '.join(sorted(suffixes))}; expected one of "
                        f"{', '.join(FILE_LOADERS)}, or one of them compressed ({', '.join(COMPRESSIONS)}; one type "
                        "per glob)")
    for file in files:
        if data_suffix(file) == ".jsonl" and not _check_jsonl(file):
            raise UserError(f"{key}: {file}: the file is empty")
        if file.stat().st_size == 0 or (loader in ("json", "csv") and file.suffix.lower() not in COMPRESSIONS
                                        and not file.read_bytes().strip()):
            raise UserError(f"{key}: {file}: the file is empty")
    try:
        data = datasets.load_dataset(loader, data_files=[str(f) for f in files], split="train", streaming=streaming)
    except Exception as exc:  # noqa: BLE001 - datasets raises many types for a bad file
        raise UserError(f"{key}: {shown}: could not read as {loader}: {first_line(exc)}") from None
    if streaming:
        if split_given and split != "train":  # as when not streamed: a file or a glob has one split, 'train'
            raise UserError(f"{_split_key(key)}: {split!r}: no such split; {shown} has the split(s) 'train' "
                            "(a file or a glob has one split)")
        return data
    if len(data) == 0:
        raise UserError(f"{key}: {shown}: the file holds no rows")
    return apply_split({"train": data}, split if split_given else "train", shown, _split_key(key))


def _read_folder(local: Path, split: str, key: str, split_given: bool, data_files=None, streaming: bool = False):
    """A folder saved with ``save_to_disk`` (a Dataset or a DatasetDict), or a folder of data files (``data_files``
    relative to it picks some)."""
    import datasets

    shown, split_key = str(local), _split_key(key)
    if _is_saved_dataset(local):
        if data_files is not None or streaming:
            raise UserError(f"{key}: {shown} is a dataset saved with `save_to_disk`: dataset.data_files and "
                            "dataset.streaming apply to data files")
        try:
            data = datasets.load_from_disk(str(local))
        except FileNotFoundError:
            raise UserError(f"{key}: {shown}: folder is not a dataset saved with `save_to_disk`") from None
        if isinstance(data, datasets.DatasetDict):
            return apply_split(dict(data), split, shown, split_key)
        return apply_split({"train": data}, split if split_given else "train", shown, split_key)
    if data_files is None and not _data_files(local):
        raise UserError(f"{key}: {shown}: folder is neither a dataset saved with `save_to_disk` nor a folder of "
                        f"data files ({', '.join(FILE_LOADERS)}, compressed too)")
    try:  # datasets names the splits after the files (train-*.parquet, test.jsonl, ...), 'train' otherwise
        data = datasets.load_dataset(str(local), data_files=data_files, streaming=streaming)
    except Exception as exc:  # noqa: BLE001
        raise UserError(f"{key}: {shown}: could not read its data files: {first_line(exc)}") from None
    return _pick_split(data, split, split_given, shown, split_key, streaming)


def _read_builder(builder: str, split: str, key: str, split_given: bool, data_files, streaming: bool):
    """A datasets builder (``json``, ``csv``, ...) over ``data_files``: the splits are the dict's keys, or ``train``."""
    import datasets

    try:
        data = datasets.load_dataset(builder, data_files=data_files, streaming=streaming)
    except Exception as exc:  # noqa: BLE001
        raise UserError(f"{key}: {builder} with dataset.data_files {data_files}: could not read: "
                        f"{first_line(exc)}") from None
    return _pick_split(data, split, split_given, f"{builder} over dataset.data_files", _split_key(key), streaming)


def _pick_split(data, split: str, split_given: bool, shown: str, split_key: str, streaming: bool):
    if list(data) == ["train"] and not split_given:
        split = "train"
    if streaming:
        if split not in data:
            raise UserError(f"{split_key}: {split!r}: no such split; {shown} has the split(s) "
                            f"{', '.join(map(repr, data))}")
        return data[split]
    return apply_split(dict(data), split, shown, split_key)


def _read_hub(path: str, split: str, key: str, candidates: list[Path], name: str | None = None, data_files=None,
              streaming: bool = False):
    """A hub dataset id (no local file or folder of that name), with its config ``name`` and ``data_files``."""
    import datasets

    tried = " or ".join(str(c) for c in candidates)
    if not _looks_like_hub_id(path):
        raise UserError(f"{key}: {path}: dataset file not found (looked for {tried})")
    # a slice is applied here, as for local data: datasets would clamp one past the end of the split in silence
    # (the whole split is downloaded either way); a streamed dataset takes no slices (refused before)
    names = list(dict.fromkeys(part.split("[")[0].strip() for part in split.split("+"))) \
        if "[" in split and not streaming else [split]
    loaded = {}
    for one in names:
        try:
            loaded[one] = datasets.load_dataset(path, name=name, data_files=data_files, split=one, streaming=streaming)
        except Exception as exc:  # noqa: BLE001
            config = f", config {name!r}" if name else ""
            raise UserError(f"{key}: could not load hub dataset {path!r} (split {one!r}{config}; no local file or "
                            f"folder {tried}): {first_line(exc)}") from None
    return loaded[split] if names == [split] else apply_split(loaded, split, path, _split_key(key))


def _glob(pattern: Path) -> list[str]:
    import glob

    return sorted(f for f in glob.glob(str(pattern), recursive=True) if Path(f).is_file())
