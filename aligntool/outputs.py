"""Everything a run writes into its ``output_dir``, and the rules that keep it safe to stop, rerun and resume. This
module is the one writer of these files (the writers below; a method module calls them, never ``open``):

    recipe.yaml        the fully resolved recipe (``--resume`` compares the new one with it: aligntool/resume.py)
                       ``write_recipe``
    run.json           the number of processes the run uses and its ``auto`` keys (compared on ``--resume`` too)
                       ``write_run_file``
    metrics.jsonl      one JSON object per logging (and eval) step: ``start_metrics``, ``append_metrics``
    completions.jsonl  a sample of the completions the run drew, every ``train.completions_steps`` (methods that
                       sample): ``append_completions``
    data_mixture.json  the rows each source of ``dataset.mixture`` gave the run: ``write_data_mixture``
    summary.json       final metrics, wall time, peak memory; written last (``summary``, ``write_summary``)
    checkpoints/       checkpoint-<step>/ folders (the Trainer's, or the online engine's); a COMPLETE file marks one
                       that finished writing: ``mark_complete``
    iter-<t>/          a pipeline's iteration (SPPO, INPO): its own checkpoints/ and model, ``samples.jsonl``,
                       ``stages.json`` and ``iteration.done`` (``mark_iteration_done``) once trained
    <stage>.jsonl      a pipeline stage's rows (``write_jsonl``), and ``stages.json``, the settings hash of each
                       finished stage (``write_stage_index``); a rerun reuses a stage whose hash still matches
    merged_base/       a run started from a LoRA adapter: its base with the adapter merged, and ``merged_from.json``
                       (``write_merged_from``)
    soup/              the reference soup of ``ref_model.soup`` (models.make_soup, with its ``soup.json``)
    deepspeed.json, accelerate_config.yaml
                       the backend's configs, a record of the run (aligntool/launch/configs.py, through
                       ``write_atomic``)
    tensorboard/       TensorBoard logs (transformers', or the online engine's with the same ``train/`` tags)
    wandb/             an online method's W&B run folder (when train.report_to has wandb; WANDB_DIR wins)
    .aligntool.lock    held (flock) by the run writing here; a second run into the same folder is refused
    model files        the final model (safetensors + config + tokenizer), checked by ``check_model_saved``
    README.md          the model card `aligntool push` (and train.push_to_hub) generates: ``write_model_card``

Files are written atomically (temp file + rename). Before a resume every checkpoint is checked, newest first, and one
with a missing, truncated or unreadable file is skipped with a note; a full disk ends in one line naming the folder
and the space a checkpoint takes.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import sys
import zipfile
from pathlib import Path

from aligntool.errors import UserError

COMPLETE_MARKER = "COMPLETE"
LOCK_FILE = ".aligntool.lock"
CHECKPOINT_PREFIX = "checkpoint-"
RUN_FILE = "run.json"  # what recipe.yaml cannot hold: the number of processes the run started with
STAGE_INDEX = "stages.json"
ITERATION_DONE = "iteration.done"


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def log(msg: str) -> None:
    if is_main_process():
        print(msg, file=sys.stderr, flush=True)


@contextlib.contextmanager
def atomic_path(path: Path):
    """Write a file or a folder under a temporary sibling name, then rename it into place: a reader (or a resumed
    run) sees the old version or the new one, never half of one. A failure removes the temporary; an existing
    folder at ``path`` is replaced."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
        raise
    if tmp.is_dir() and path.is_dir():
        shutil.rmtree(path)
    os.replace(tmp, path)


def write_atomic(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def prepare_output_dir(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise UserError(f"output_dir: {path}: cannot write there ({exc.strerror or exc})") from None


# --------------------------------------------------------------------------------------------- metrics, summary
def append_metrics(path: Path, row: dict) -> None:
    """One JSON object per line of metrics.jsonl (main process only)."""
    if is_main_process():
        with path.open("a") as fh:
            fh.write(json.dumps(row) + "\n")


def peak_memory_mb() -> float:
    """This process's peak memory: the GPU allocator's high-water mark, or the resident set on a CPU."""
    import resource

    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def summary(algorithm: str, kind: str, global_step: int, train_time_s: float, samples: int | None, world_size: int,
            final_metrics: dict | None = None, resumed_from=None, **details) -> dict:
    """summary.json: the same keys for every kind of method (trl, pipeline, online), then the method's details
    (a pipeline's iterations, the pairs it made, ...)."""
    return {"algorithm": algorithm, "kind": kind, "global_step": global_step, "train_time_s": round(train_time_s, 2),
            "steps_per_second": round(global_step / train_time_s, 4) if train_time_s else None,
            "train_samples_per_second": round(samples / train_time_s, 3) if samples and train_time_s else None,
            "peak_memory_mb": round(peak_memory_mb(), 1), "world_size": world_size,
            "resumed_from": str(resumed_from) if resumed_from else None, "final_metrics": final_metrics or {},
            **details}


def write_recipe(out: Path, resolved: dict) -> None:
    """recipe.yaml: the fully resolved recipe of the run (what ``--resume`` compares a new recipe with)."""
    import yaml

    write_atomic(out / "recipe.yaml", yaml.safe_dump(resolved, sort_keys=False))


def write_run_file(out: Path, world_size: int, auto: list[str] = ()) -> None:
    """run.json: the number of processes and the keys the recipe left ``auto`` (Step Law filled them in)."""
    write_atomic(out / RUN_FILE, json.dumps({"world_size": world_size, "auto": list(auto)}) + "\n")


def start_metrics(out: Path) -> None:
    """An empty metrics.jsonl at the start of a run (a resumed run appends to its own)."""
    write_atomic(out / "metrics.jsonl", "")


def write_summary(out: Path, result: dict) -> None:
    """summary.json, written last: its presence means the run finished (``previous_run``, ``--resume``)."""
    write_atomic(out / "summary.json", json.dumps(result, indent=2) + "\n")


def write_jsonl(path: Path, rows: list[dict]) -> None:
    """A whole JSONL file at once (a pipeline stage's output), atomically."""
    write_atomic(path, "".join(json.dumps(row) + "\n" for row in rows))


def write_stage_index(folder: Path, done: dict) -> None:
    """stages.json of a pipeline folder: the settings hash of each finished stage."""
    write_atomic(folder / STAGE_INDEX, json.dumps(done, indent=2) + "\n")


def mark_iteration_done(folder: Path) -> None:
    """``iter-t/iteration.done``: the iteration's model is trained and saved (a rerun skips it)."""
    write_atomic(folder / ITERATION_DONE, "")


def write_merged_from(folder: Path, adapter: str) -> None:
    """merged_base/merged_from.json: the adapter whose base, merged with it, the run started from."""
    write_atomic(folder / "merged_from.json", json.dumps({"adapter": str(Path(adapter).resolve())}) + "\n")


# ------------------------------------------------------------------------------------------------ checkpoints
def checkpoint_step(path: Path) -> int | None:
    """N of a ``checkpoint-N`` folder, else None."""
    name = path.name
    return (int(name[len(CHECKPOINT_PREFIX):])
            if name.startswith(CHECKPOINT_PREFIX) and name[len(CHECKPOINT_PREFIX):].isdigit() else None)


def mark_complete(checkpoint: Path, step: int) -> None:
    """The COMPLETE marker, written last into a checkpoint folder: it means every file of it is written."""
    write_atomic(checkpoint / COMPLETE_MARKER, f"{step}\n")


def complete_checkpoints(folder: Path) -> list[Path]:
    """Checkpoints marked COMPLETE, newest first."""
    found = [p for p in folder.glob(f"{CHECKPOINT_PREFIX}*") if checkpoint_step(p) is not None
             and (p / COMPLETE_MARKER).is_file()]
    return sorted(found, key=checkpoint_step, reverse=True)


def checkpoint_problem(path: Path) -> str | None:
    """Why ``path`` cannot be resumed from (a missing marker, a truncated or unreadable file), or None. Structural
    checks that read little: safetensors headers and sizes, the zip directory of torch files, JSON parses."""
    if not (path / COMPLETE_MARKER).is_file():
        return "not marked COMPLETE (cut while writing)"
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        rel = file.relative_to(path)
        try:
            if file.suffix == ".safetensors":
                from safetensors import safe_open

                with safe_open(str(file), "pt") as fh:
                    fh.keys()
            elif file.suffix in (".pt", ".pth", ".bin"):
                with zipfile.ZipFile(file) as zf:
                    for info in zf.infolist():
                        if info.header_offset + info.compress_size > file.stat().st_size:
                            return f"{rel}: truncated"
            elif file.suffix == ".json":
                json.loads(file.read_text())
        except (zipfile.BadZipFile, ValueError, OSError) as exc:
            return f"{rel}: unreadable ({type(exc).__name__})"
        except Exception as exc:  # noqa: BLE001 - safetensors' own error type
            return f"{rel}: unreadable ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"
    return None


def latest_checkpoint(folder: Path, log=log) -> Path | None:
    """The newest checkpoint that finished writing and whose files read back; each one skipped is logged with its
    reason (a run killed mid-save leaves one without the marker; a disk fault can truncate a file)."""
    for ckpt in complete_checkpoints(folder):
        problem = checkpoint_problem(ckpt)
        if problem is None:
            return ckpt
        log(f"note: skipping {ckpt}: {problem}")
    return None


def checkpoint_bytes(folder: Path) -> int | None:
    """Size of the newest complete checkpoint under ``folder``, if any."""
    ckpts = complete_checkpoints(folder)
    if not ckpts:
        return None
    return sum(f.stat().st_size for f in ckpts[0].rglob("*") if f.is_file())


# ------------------------------------------------------------------------------------- reruns and concurrent runs
class RunLock:
    """An exclusive ``flock`` on ``output_dir/.aligntool.lock`` for the life of a run; the file names the holder
    (pid, host, command). The kernel drops the lock when the process dies, so a crash leaves no stale lock."""

    def __init__(self, out: Path):
        self.path, self.fh = out / LOCK_FILE, None

    def __enter__(self):
        import fcntl
        import socket

        self.fh = open(self.path, "a+")
        try:
            fcntl.flock(self.fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.fh.seek(0)
            holder = self.fh.read().strip() or "another process"
            self.fh.close()
            raise UserError(f"output_dir: {self.path.parent} is in use by another aligntool run ({holder}); wait "
                            "for it to end or choose another output_dir") from None
        self.fh.seek(0)
        self.fh.truncate()
        self.fh.write(f"pid {os.getpid()} on {socket.gethostname()}: {' '.join(sys.argv[:6])}")
        self.fh.flush()
        return self

    def __exit__(self, *exc):
        import fcntl

        self.path.unlink(missing_ok=True)  # a finished run leaves no lock file behind
        fcntl.flock(self.fh, fcntl.LOCK_UN)
        self.fh.close()


def previous_run(out: Path) -> str | None:
    """What in ``out`` a new run would replace: a finished run, or checkpoints / iterations of an unfinished one."""
    if (out / "summary.json").is_file():
        return "a finished run (summary.json)"
    ckpts = [p for p in (out / "checkpoints").glob(f"{CHECKPOINT_PREFIX}*") if checkpoint_step(p) is not None]
    if ckpts:
        return f"checkpoints of an unfinished run ({max(ckpts, key=checkpoint_step).name})"
    iters = sorted(p.name for p in out.glob("iter-*") if p.is_dir())
    if iters:
        return f"iterations of an unfinished run ({', '.join(iters)})"
    return None


def check_previous_run(out: Path, resume: bool, overwrite: bool) -> str | None:
    """What a new run in ``out`` would replace (None if nothing); an error unless ``resume`` or ``overwrite``. A
    training run's folder may hold other files (the ``aligntool slurm`` script, a soup): a previous run counts, and so
    does a model or a compress output (a LoRA run would put its adapter beside the old weights, and every loader
    would then read the old model)."""
    previous = previous_run(out) if out.is_dir() else None
    if previous is None and out.is_dir():
        other = existing_output(out)
        if other == "a model" or (other or "").startswith("a compress output"):
            previous = other
    check_output(out, resume or overwrite, key="output_dir", holds=previous or "",
                 how="--resume to continue it, --overwrite to replace it")
    return previous


def existing_output(out: Path) -> str | None:
    """What ``out`` already holds that writing a new result there would replace (None: absent or empty)."""
    if not out.exists():
        return None
    if not out.is_dir():
        return "a file"
    previous = previous_run(out)
    if previous:
        return previous
    entries = [p for p in out.iterdir() if p.name != LOCK_FILE]
    if not entries:
        return None
    if (out / "compression_report.json").is_file():
        return "a compress output (compression_report.json)"
    if (out / "config.json").is_file() or (out / "adapter_config.json").is_file():
        return "a model"
    return f"{len(entries)} file{'s' if len(entries) > 1 else ''} ({', '.join(sorted(p.name for p in entries)[:3])}" \
        f"{', ...' if len(entries) > 3 else ''})"


def check_output(out: Path, overwrite: bool, key: str = "--out", holds: str | None = None,
                 how: str = "--overwrite to replace it") -> str | None:
    """The one rule of every command that writes a folder (train, soup, merge-lora, unpack, compress): an output
    that already holds something is replaced only when asked (``overwrite``); a file is never replaced by a folder.
    ``holds``: what the caller found there ("" for nothing; default: ``existing_output``). Returns what will be
    replaced, or None. The write itself stays atomic (``atomic_path``): the old folder goes only once the new one
    is complete."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"{key}: {out} is a file; give a folder to write to")
    holds = existing_output(out) if holds is None else holds
    if holds and not overwrite:
        raise UserError(f"{key}: {out} already holds {holds}; pass {how}, or choose another folder")
    return holds


# the files of a saved model beside its weights (a new run's model must not be mixed with an old one's)
MODEL_FILES = ("config.json", "generation_config.json", "adapter_config.json")


def clear_previous_run(out: Path) -> None:
    """``--overwrite``: remove what a new run replaces -- the summary, metrics, checkpoints, iteration folders and the
    old model (weights, configs, a LoRA run's ``merged_base``) -- so that nothing of the old run can be resumed from or
    mistaken for the new one. Stage files of pipelines
    (``stages.json`` and the ``*.jsonl`` it lists) stay: each is reused only when its settings hash still matches."""
    for name in ("summary.json", "metrics.jsonl", COMPLETIONS_FILE, MIXTURE_FILE, "compression_report.json",
                 *MODEL_FILES):
        (out / name).unlink(missing_ok=True)
    for pattern in ("*.safetensors", "model.safetensors.index.json", "pytorch_model*.bin"):
        for file in out.glob(pattern):
            file.unlink(missing_ok=True)
    for folder in (out / "checkpoints", out / "merged_base", *out.glob("iter-*")):
        shutil.rmtree(folder, ignore_errors=True)


# ------------------------------------------------------------------------------------------------- disk faults
def _is_disk_full(exc: BaseException | None) -> bool:
    while exc is not None:
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(exc)
        if "No space left on device" in text or "Disk quota exceeded" in text:
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def disk_full_error(out: Path, exc: BaseException) -> UserError | None:
    """A one-line error for a write that failed on a full disk under ``out`` (None if ``exc`` is something else).
    torch and safetensors report ENOSPC in their own words, so the free space is checked too."""
    try:
        free = shutil.disk_usage(out).free
    except OSError:
        free = None
    ckpt = checkpoint_bytes(out / "checkpoints")
    if not _is_disk_full(exc) and not (free is not None and ckpt and free < ckpt
                                       and "write" in str(exc).lower()):
        return None
    last = latest_checkpoint(out / "checkpoints", log=lambda m: None)
    need = f"a checkpoint here takes {ckpt / 2**20:.1f} MB" if ckpt else "a checkpoint takes about 3x the model's size"
    have = f"{free / 2**20:.1f} MB free" if free is not None else "free space unknown"
    kept = f"the last complete checkpoint {last.name} is intact" if last else "no complete checkpoint yet"
    return UserError(f"output_dir: {out}: no space left on the device ({have}; {need}); {kept} -- free space, then "
                     "rerun with --resume")


# ---------------------------------------------------------------------------------------------- the final model
def _safetensors_problem(file: Path, folder: Path) -> tuple[str | None, set[str]]:
    """(why ``file`` is not a usable weights file or None, the tensor names it holds). Reads the header only; a
    tensor with no elements is what a ZeRO-3 model saved without gathering holds (each rank's partition is elsewhere),
    and a file shorter than its header says is a cut write."""
    import struct

    rel = file.relative_to(folder)
    try:
        size = file.stat().st_size
        with file.open("rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            if n > size - 8:
                return f"{rel}: truncated (header of {n} bytes in a {size}-byte file)", set()
            header = json.loads(fh.read(n))
    except (OSError, ValueError, struct.error) as exc:
        return f"{rel}: unreadable ({type(exc).__name__})", set()
    header.pop("__metadata__", None)
    if not header:
        return f"{rel}: holds no tensors", set()
    end = max(info["data_offsets"][1] for info in header.values())
    if 8 + n + end > size:
        return f"{rel}: truncated ({size} bytes; its header needs {8 + n + end})", set()
    empty = [name for name, info in header.items() if 0 in info.get("shape", [1])]
    if empty:
        return (f"{rel}: {len(empty)} of {len(header)} tensors are empty (e.g. {empty[0]}): the weights were not "
                "gathered when saved (a sharded run's partitions)"), set()
    return None, set(header)


def model_problem(folder: Path) -> str | None:
    """Why ``folder`` does not hold a model that loads (None if it does): a full model (config.json + safetensors
    weights, one file or the shards an index names, every indexed weight present) or a LoRA adapter
    (adapter_config.json + adapter weights). Structural and cheap for any size: JSON files parse, safetensors headers
    read and agree with the file sizes, no tensor is an empty placeholder; no weight is loaded."""
    folder = Path(folder)
    if not folder.is_dir():
        return f"{folder}: no such folder"
    adapter = (folder / "adapter_config.json").is_file()
    config = folder / ("adapter_config.json" if adapter else "config.json")
    if not config.is_file():
        return f"{folder}: no config.json (nor adapter_config.json): no model was saved"
    try:
        json.loads(config.read_text())
    except (OSError, ValueError) as exc:
        return f"{config.name}: unreadable ({type(exc).__name__})"
    stem = "adapter_model" if adapter else "model"
    single, index = folder / f"{stem}.safetensors", folder / f"{stem}.safetensors.index.json"
    if single.is_file():
        return _safetensors_problem(single, folder)[0]
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            return f"{index.name}: unreadable ({type(exc).__name__})"
        present: set[str] = set()
        for shard in sorted(set(weight_map.values())):
            if not (folder / shard).is_file():
                return f"{index.name}: names {shard}, which is missing"
            problem, names = _safetensors_problem(folder / shard, folder)
            if problem:
                return problem
            present |= names
        missing = sorted(set(weight_map) - present)
        if missing:
            return f"{index.name}: {len(missing)} weights it names are in no shard (e.g. {missing[0]})"
        return None
    others = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt") or p.name.startswith("global_step"))
    seen = f" (found only {', '.join(others[:3])})" if others else ""
    return f"{folder}: no {single.name} or {index.name}{seen}: no loadable model was saved"


def check_model_saved(folder: Path, how: str = "", key: str = "output_dir", what: str = "the run finished") -> None:
    """Raise a one-line error unless ``folder`` holds a model that loads (see model_problem): checked before a
    command reports success (train, merge-lora, unpack, soup, compress), so that "Done" always means a usable
    model."""
    problem = model_problem(folder)
    if problem is not None:
        raise UserError(f"{key}: {folder}: {what} but its model is not loadable{how}: {problem}")


def write_model_card(out: Path, text: str) -> None:
    """README.md: the model card of the final model in ``out`` (aligntool/publish.py makes it)."""
    write_atomic(out / "README.md", text)


COMPLETIONS_FILE = "completions.jsonl"
MIXTURE_FILE = "data_mixture.json"


def append_completions(out: Path, step: int, rows: list[dict], stage: str | None = None) -> None:
    """A sample of the completions a run drew at ``step``: one JSON object per completion (``step``, the pipeline
    ``stage`` if any, then the row's own fields: prompt, completion, reward, ... or for a pair prompt, chosen,
    rejected, ...) appended to ``out/completions.jsonl`` (main process only; a resumed run appends to its own)."""
    if not is_main_process() or not rows:
        return
    head = {"step": step, **({"stage": stage} if stage else {})}
    with (out / COMPLETIONS_FILE).open("a") as fh:
        for row in rows:
            fh.write(json.dumps({**head, **row}) + "\n")


def write_data_mixture(out: Path, record: dict) -> None:
    """data_mixture.json: the rows each source of ``dataset.mixture`` gave this run (main process only)."""
    if is_main_process():
        out.mkdir(parents=True, exist_ok=True)
        write_atomic(out / MIXTURE_FILE, json.dumps(record, indent=2) + "\n")
