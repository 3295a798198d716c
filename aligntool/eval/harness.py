"""`aligntool eval --tasks`: standard benchmarks and the user's own task YAML through EleutherAI's
lm-evaluation-harness (``lm_eval.simple_evaluate``), its ``hf`` backend on the model folder, or ``vllm``.

Task names are checked against lm-eval's ``TaskManager`` first (the built-in tasks, groups and tags, and those under
``--include-path`` and beside each task YAML given as a path), so a misspelt name is one line with the close names
(difflib) instead of lm-eval's traceback. The metrics are lm-eval's own, as its CLI prints them.
"""

from __future__ import annotations

import difflib
import importlib.util
from pathlib import Path

from aligntool.errors import UserError

BACKENDS = ("hf", "vllm")
_MANAGERS: dict = {}


def split_tasks(tasks: str) -> list[str]:
    names = [t.strip() for t in tasks.split(",") if t.strip()]
    if not names:
        raise UserError(f"--tasks: expected task names or task YAML files, comma-separated, got {tasks!r}")
    return names


def task_manager(names: list[str], include_path: list[str]):
    """lm-eval's TaskManager over its own tasks, ``include_path`` and the folders of the YAML files in ``names``;
    every name checked (an unknown one: a one-line error with the close names)."""
    if importlib.util.find_spec("lm_eval") is None:
        raise UserError("--tasks: lm-eval is not installed; pip install 'aligntool[lm-eval]'")
    from lm_eval.tasks import TaskManager

    paths = []
    for p in include_path:
        if not Path(p).expanduser().is_dir():
            raise UserError(f"--include-path: {p}: no such folder")
        paths.append(str(Path(p).expanduser().resolve()))
    for name in names:
        if name.endswith((".yaml", ".yml")):
            if not Path(name).expanduser().is_file():
                raise UserError(f"--tasks: {name}: no such task file")
            folder = str(Path(name).expanduser().resolve().parent)  # its siblings (an `include:`d base, a group)
            paths += [folder] if folder not in paths else []
    def manager_of(defaults: bool):
        key = (tuple(paths), defaults)
        if key not in _MANAGERS:  # indexing lm-eval's ~15000 task files takes seconds: once per process and paths
            _MANAGERS[key] = TaskManager(include_path=paths or None, include_defaults=defaults)
        return _MANAGERS[key]

    wanted = {n for n in names if not n.endswith((".yaml", ".yml"))}
    # the user's own tasks alone index in a blink: lm-eval's own are indexed only for a name not among them
    manager = manager_of(False) if paths else None
    if manager is None or not wanted <= set(manager.all_tasks):
        manager = manager_of(True)
    known = set(manager.all_tasks)
    for name in names:
        if not name.endswith((".yaml", ".yml")) and name not in known:
            close = difflib.get_close_matches(name, manager.all_tasks, n=6, cutoff=0.6)
            hint = f"close names: {', '.join(close)}" if close else "`lm_eval ls tasks` lists them"
            where = f" (looked in lm-eval's tasks and {', '.join(include_path)})" if include_path else ""
            raise UserError(f"--tasks: no lm-eval task {name!r}{where}; {hint}")
    return manager


def run_tasks(model: str, tasks: str, include_path: list[str], backend: str = "hf", limit: float | None = None,
              num_fewshot: int | None = None, batch_size: int = 8, seed: int = 0, device: str | None = None) -> dict:
    """lm-eval's results on ``model`` (a folder, 'tiny', or a hub id): {"tasks": {task: {metric: value}}, ...}."""
    from aligntool import models

    if backend not in BACKENDS:
        raise UserError(f"--backend: expected one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "vllm" and importlib.util.find_spec("vllm") is None:
        raise UserError("--backend vllm: vllm is not installed (pip install vllm); the default backend hf needs "
                        "nothing more")
    names = split_tasks(tasks)
    manager = task_manager(names, include_path)
    path = models.resolve(model, key="--model", log=lambda m: None)
    from aligntool.rewards import is_reward_model

    if is_reward_model(path):
        raise UserError("--tasks: lm-eval evaluates causal language models; --model is a reward model (evaluate it "
                        "on preference pairs with --data)")
    import lm_eval

    specs = [str(Path(n).expanduser().resolve()) if n.endswith((".yaml", ".yml")) else n for n in names]
    if device is None and backend == "hf":  # lm-eval's Python API defaults to cuda; its CLI to what exists
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    out = lm_eval.simple_evaluate(model=backend, model_args={"pretrained": path}, tasks=specs, device=device,
                                  num_fewshot=num_fewshot,
                                  batch_size=batch_size, limit=limit, task_manager=manager, log_samples=False,
                                  random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                                  fewshot_random_seed=seed)
    if out is None:  # a process other than the first under torchrun
        return {}
    return summarise(out, path, backend, names, limit)


def summarise(out: dict, path: str, backend: str, names: list[str], limit) -> dict:
    """lm-eval's output as aligntool's result: per task its metrics (``acc,none`` -> ``acc``; ``acc_stderr``)."""
    tasks = {}
    for task, metrics in out["results"].items():
        row = {}
        for key, value in metrics.items():
            if key in ("alias", "name", "sample_len") or not isinstance(value, (int, float)):
                continue
            metric, _, filt = key.partition(",")
            row[metric if filt in ("", "none") else f"{metric} ({filt})"] = value
        tasks[task] = row
    counts = {t: n.get("effective", n.get("original")) for t, n in (out.get("n-samples") or {}).items()}
    rows = sum(counts.values()) if counts else None
    source = f"lm-eval task{'s' if len(names) > 1 else ''} {', '.join(names)}"
    return {"model": path, "kind": "lm_eval", "backend": backend,
            "data": {"source": source, "rows": rows, "rows_per_task": counts, "limit": limit},
            "num_fewshot": dict(out.get("n-shot") or {}),
            "tasks": tasks}
