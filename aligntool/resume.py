"""What ``aligntool train --resume`` may continue: the run's recipe, compared with the one it started with.

A checkpoint is only the state of one run: the data it was drawn from, the model, the method, the learning-rate
schedule and the global batch (per-process batch x processes x accumulation) it was made under. Resuming it under
another recipe silently trains something neither recipe describes (a new learning rate keeps the old schedule,
which transformers restores from the checkpoint; a doubled world size doubles the global batch). So on ``--resume``
the new resolved recipe (and the number of processes) is compared with what the run started with -- its
``recipe.yaml`` and ``run.json``, written at the start and left alone until this comparison passed -- and:

* a change of a key that shapes the run is refused, in one line naming each changed key with both values, unless
  ``--accept-changes`` says it is deliberate (the run then continues from its checkpoint with the new recipe: a new
  learning rate becomes the schedule's peak, ``apply_learning_rate``; the keys whose new value the restored
  optimizer state overrides are named);
* a change of a harmless key (logging, checkpoint and evaluation frequency, loggers, names) is noted and used;
* a finished run (``summary.json``) is not trained again: it says so and exits 0, unless accepted changes (e.g. a
  larger ``train.max_steps``) ask it to train on.

The check is the same for every kind of method (TRL Trainer runs, pipelines with ``iter-*`` folders, online engine
runs): it reads only files at the top of ``output_dir``.
"""

from __future__ import annotations

import json
from pathlib import Path

from aligntool.errors import UserError
from aligntool.outputs import RUN_FILE

WORLD_KEY = "processes (world size)"

# keys that change what is logged, saved or evaluated, or how fast, but not the training itself
HARMLESS = {"description", "train.logging_steps", "train.logging_first_step", "train.logging_strategy",
            "train.save_steps", "train.save_strategy", "train.save_total_limit", "train.eval_steps",
            "train.eval_strategy", "train.eval_on_start", "train.per_device_eval_batch_size", "train.report_to",
            "train.run_name", "train.disable_tqdm", "train.dataloader_num_workers", "train.gradient_checkpointing",
            "train.completions_steps", "train.num_completions_to_log", "train.push_to_hub", "train.hub_model_id",
            "train.hub_private_repo", "train.hub_revision",
            "dataset.eval_path", "dataset.eval_split", "generation.gpu_memory_utilization",
            "generation.enforce_eager", "generation.server_base_url",
            # read by the dry run only (and hardware: by `aligntool slurm`'s defaults): they never change training
            "model.config", "hardware.gpus_per_node", "hardware.nodes", "hardware.gpu_memory", "hardware.gpu"}
# keys whose new value an accepted resume does not apply: the optimizer state restored from the checkpoint wins
# (a new learning rate, scheduler, warm-up or max_steps does apply: ``apply_learning_rate`` and the new schedule)
OPTIMIZER_STATE = ("train.weight_decay", "train.optim", "optimizer")
ACCEPT_FLAG = "--accept-changes"


def _flat(data, prefix: str = "") -> dict:
    """``{"train": {"max_steps": 4}}`` -> ``{"train.max_steps": 4}`` (lists and scalars are leaves)."""
    if not isinstance(data, dict):
        return {prefix: data}
    out = {}
    for key, value in data.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        out.update(_flat(value, name) if isinstance(value, dict) and value else {name: value})
    return out


def differences(old: dict, new: dict, old_auto: frozenset = frozenset()) -> list[tuple[str, object, object]]:
    """Every dotted key whose value differs, with (old, new); a key missing on one side is None (unset) there.
    A key the run started with as ``auto`` (``old_auto``: Step Law resolved it, and recipe.yaml holds the value) and
    that is still ``auto`` is not a change: the data, model and world size it is derived from are compared
    themselves. An explicit value switched to ``auto`` is a change."""
    a, b = _flat(old), _flat(new)
    for flat in (a, b):  # the folder itself: a run moved (or copied) elsewhere is the same run
        flat.pop("output_dir", None)
    changed = []
    for key in sorted(a.keys() | b.keys()):
        before, after = a.get(key), b.get(key)
        if after == "auto" and key in old_auto:
            continue
        if before != after:
            changed.append((key, before, after))
    return changed


def _harmless(key: str) -> bool:
    return key in HARMLESS


def _show(changes) -> str:
    return ", ".join(f"{key} {before!r} -> {after!r}" for key, before, after in changes)


def auto_keys(resolved: dict) -> list[str]:
    """The dotted keys of a recipe whose value is ``auto`` (before Step Law resolves them)."""
    return sorted(key for key, value in _flat(resolved).items() if value == "auto")


def started_with(out: Path) -> tuple[dict | None, int | None, frozenset]:
    """The resolved recipe, the number of processes and the ``auto`` keys the run in ``out`` started with (None /
    empty where unknown: a folder from before these files, or one whose start failed before writing them)."""
    import yaml

    recipe = world = None
    auto: frozenset = frozenset()
    try:
        recipe = yaml.safe_load((out / "recipe.yaml").read_text())
    except (OSError, yaml.YAMLError):
        pass
    try:
        info = json.loads((out / RUN_FILE).read_text())
        world = int(info["world_size"])
        auto = frozenset(info.get("auto") or ())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass
    return (recipe if isinstance(recipe, dict) else None), world, auto


def check_resume(out: Path, resolved: dict, world_size: int, accept_changes: bool, log) -> bool:
    """The decision of ``--resume`` in ``out`` with the new ``resolved`` recipe on ``world_size`` processes: raises
    a ``UserError`` for changes that are not accepted; returns True when the run is already finished and nothing is
    to be trained (said in one line by ``log``), False when training goes on."""
    old, old_world, old_auto = started_with(out)
    changes = differences(old, resolved, old_auto) if old is not None else []
    if old_world is not None and old_world != world_size:
        changes.append((WORLD_KEY, old_world, world_size))
    serious = [c for c in changes if not _harmless(c[0])]
    harmless = [c for c in changes if _harmless(c[0])]
    finished = (out / "summary.json").is_file()
    if serious and not accept_changes:
        raise UserError(f"--resume: the recipe differs from the one the run in {out} started with: {_show(serious)}; "
                        f"restore those values, pass {ACCEPT_FLAG} to continue the checkpoint under the new ones, "
                        "or use --overwrite or another output_dir to start over")
    # a finished run trains on only when the accepted changes give it more to train
    extends = any(key in ("train.max_steps", "train.num_train_epochs") for key, _, _ in serious)
    if finished and not extends:
        step = _finished_step(out)
        log(f"{out} holds a finished run ({'step ' + str(step) + ', ' if step is not None else ''}summary.json): "
            f"nothing to resume (to train further, raise train.max_steps and pass {ACCEPT_FLAG})")
        return True
    if harmless:
        log(f"note: --resume with changed settings that do not change the training: {_show(harmless)}")
    if serious:
        log(f"note: {ACCEPT_FLAG}: continuing the checkpoint under changed settings: {_show(serious)}")
        kept = [key for key, _, _ in serious if key.startswith(OPTIMIZER_STATE)]
        if kept:
            log(f"note: {', '.join(kept)}: the optimizer and its state are restored from the checkpoint, so the "
                "run goes on with the checkpoint's (start over to apply the new value)")
    return False


def apply_learning_rate(optimizer, scheduler, learning_rate: float, log) -> None:
    """After a checkpoint's optimizer and scheduler state were loaded: make an accepted new ``learning_rate`` the
    peak of the schedule. The restored state holds the old peak (``base_lrs``, each group's ``initial_lr`` and
    ``lr``); the schedule's shape (scheduler type, warm-up, max_steps) is the new recipe's already, since
    transformers' schedules are functions that a checkpoint does not store. Groups keep their ratios to the first
    one (e.g. aligntool's optimizers give some groups their own rate). Nothing changes when the peak is unchanged."""
    scheduler = getattr(scheduler, "scheduler", scheduler)  # accelerate's wrapper, if any
    base = getattr(scheduler, "base_lrs", None)
    lambdas = getattr(scheduler, "lr_lambdas", None)
    if not base or not lambdas or not learning_rate or base[0] == learning_rate:
        return
    ratio = learning_rate / base[0]
    scheduler.base_lrs = [b * ratio for b in base]
    for group, peak, fn in zip(optimizer.param_groups, scheduler.base_lrs, lambdas):
        if "initial_lr" in group:
            group["initial_lr"] = peak
        group["lr"] = peak * fn(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
    log(f"note: learning rate: the schedule's peak is now {learning_rate:g} (the checkpoint's: {base[0]:g}); "
        f"next step at {scheduler._last_lr[0]:g}")


def _finished_step(out: Path) -> int | None:
    try:
        return int(json.loads((out / "summary.json").read_text())["global_step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def check_flags(resume: bool, overwrite: bool) -> None:
    if resume and overwrite:
        raise UserError("--resume and --overwrite: choose one (--resume continues the run in output_dir, --overwrite "
                        "replaces it)")
