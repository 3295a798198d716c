"""Stage files of multi-stage methods (sample -> score -> select -> train): JSONL written atomically, each tagged with
a hash of the settings that produced it, so a rerun reuses a finished stage and redoes a stage whose settings changed.
Only the main process computes a stage; the other ranks then read its file."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path


def settings_hash(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with tmp.open("w") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")
    os.replace(tmp, path)


def cached_stage(folder: Path, name: str, settings: dict, compute: Callable[[], list[dict]], force: bool = False,
                 log=print) -> list[dict]:
    """Rows of stage ``name``: read from ``folder/name.jsonl`` when its settings hash matches, else computed and saved.

    The hash lives in ``folder/stages.json``; a stage is reused only if every stage before it was too (callers pass
    the upstream hash inside ``settings``)."""
    import torch
    from accelerate import PartialState

    path, index = folder / f"{name}.jsonl", folder / "stages.json"
    digest = settings_hash(settings)
    state = PartialState(cpu=not torch.cuda.is_available())  # cpu=True: gloo process group on CPU machines
    with state.main_process_first():
        done = json.loads(index.read_text()) if index.is_file() else {}
        if not force and done.get(name) == digest and path.is_file():
            log(f"stage {name}: reusing {path}")
            return read_jsonl(path)
        if not state.is_main_process:  # the main process has just written it
            return read_jsonl(path)
        log(f"stage {name}: computing -> {path}")
        rows = compute()
        write_jsonl(path, rows)
        done[name] = digest
        tmp = index.with_name(f".stages.json.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(done, indent=2) + "\n")
        os.replace(tmp, index)
        return rows
