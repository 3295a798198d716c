"""Calibration and held-out text as token windows: ``[num_windows, seq_len]`` LongTensors, no padding."""

from __future__ import annotations

import random
from pathlib import Path

import torch

from aligntool.errors import UserError, first_line


def _toy_texts(n_docs: int, split: str, seed: int) -> list[str]:
    from aligntool.toy import world

    rng = random.Random(seed)
    pool = world.prompts(split, seed=seed)
    return [p + world.completion(p, rng) for p in (rng.choice(pool) for _ in range(n_docs))]


def _file_texts(cal) -> list[str]:
    path = cal.path
    local = Path(path).expanduser()
    if local.suffix == ".txt":
        if not local.is_file():
            raise UserError(f"calibration.path: {path}: file not found")
        return [line for line in local.read_text().splitlines() if line.strip()]
    import datasets

    try:
        if local.is_dir():
            ds = datasets.load_from_disk(str(local))
        elif local.suffix in (".jsonl", ".json", ".parquet", ".csv"):
            if not local.is_file():
                raise UserError(f"calibration.path: {path}: file not found")
            kind = {".jsonl": "json"}.get(local.suffix, local.suffix[1:])
            ds = datasets.load_dataset(kind, data_files=str(local), split="train")
        else:
            ds = datasets.load_dataset(path, split=cal.split)
    except (OSError, ValueError, FileNotFoundError) as exc:
        raise UserError(f"calibration.path: could not load {path!r}: {first_line(exc)}") from None
    if isinstance(ds, datasets.DatasetDict):
        if cal.split not in ds:
            raise UserError(f"calibration.split: {path} has no split {cal.split!r} (has {', '.join(ds)})")
        ds = ds[cal.split]
    if cal.text_column not in ds.column_names:
        raise UserError(f"calibration.text_column: {path} has no column {cal.text_column!r} "
                        f"(columns: {', '.join(ds.column_names)})")
    return [t for t in ds[cal.text_column] if isinstance(t, str) and t.strip()]


def _windows(texts: list[str], tokenizer, seq_len: int) -> torch.Tensor:
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        stream.extend(ids + ([eos] if eos is not None else []))
    n = len(stream) // seq_len
    return torch.tensor(stream[: n * seq_len], dtype=torch.long).view(n, seq_len)


def load_windows(cal, tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """(calibration windows, held-out windows), exactly ``num_sequences`` and ``heldout_sequences`` of them."""
    need, held = cal.num_sequences, cal.heldout_sequences
    if cal.path == "toy":
        # documents from disjoint prompt splits (train / held-out), generated until they fill the windows asked for
        def toy(split: str, n_windows: int, seed: int) -> torch.Tensor:
            docs = max(16, n_windows * cal.seq_len // 20)  # ~26 tokens a document
            while len(windows := _windows(_toy_texts(docs, split, seed), tokenizer, cal.seq_len)) < n_windows:
                docs *= 2
            return windows[:n_windows]

        return toy("train", need, cal.seed), toy("eval", held, cal.seed + 1)
    windows = _windows(_file_texts(cal), tokenizer, cal.seq_len)
    if len(windows) < need + held:
        raise UserError(f"calibration.path: {cal.path} gives {len(windows)} windows of {cal.seq_len} tokens; "
                        f"need calibration.num_sequences + heldout_sequences = {need + held}")
    order = torch.randperm(len(windows) - held, generator=torch.Generator().manual_seed(cal.seed))
    return windows[order[:need]], windows[len(windows) - held:]  # held-out: the end of the text, never sampled
