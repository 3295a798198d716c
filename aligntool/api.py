"""The Python API: aligntool.train, evaluate and compress, the commands as functions (docs/API.md).

    import aligntool
    result = aligntool.train("dpo", train={"max_steps": 20}, output_dir="runs/my_dpo")
    print(result.metrics, result.model_path)
    print(aligntool.evaluate(result, reference="tiny"))

A recipe is a file, a built-in name, a dict (a YAML recipe's content) or a loaded recipe (``LoadedRecipe`` of
``aligntool.recipe.loader.load_recipe``, or its ``Recipe``). Keyword arguments are recipe keys: a dict merges into
its section key by key (``train={"max_steps": 5}``), anything else replaces the key (``output_dir="runs/x"``);
``overrides=["train.max_steps=5"]`` are the command line's ``key=value``, applied last. Each function runs the command's
own code (the same checks, the same files), raises ``aligntool.errors.UserError`` where the command prints its one-line
error (nothing calls ``sys.exit``), and returns what the command wrote: success is only reported for a model that
loads.

Reward functions may be Python callables wherever a recipe takes ``module:function`` (``reward.function``, the entries
of ``reward.functions`` -- a callable alone there is ``{function: it}`` --, ``reward.source``, ``reward.judge``, and
``evaluate(reward_fn=...)``). recipe.yaml records such a callable as ``module:function`` when that imports back to the
same object, else as ``<callable module:qualname>``: that run can be resumed by passing a callable of the same name
again (a callable of another name is a changed recipe, as a changed ``module:function`` is), not from the command line.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aligntool.errors import UserError

# the keys of the reward section that name one score source: giving one as a keyword replaces the recipe's
_SCORE_SOURCES = {"source": "gold", "ensemble": None, "function": None, "functions": None}
_DICT_SOURCE = "recipe dict"


@dataclass
class TrainResult:
    """What ``aligntool.train`` made: the run's folder, its final model (a transformers model folder, or a LoRA
    adapter folder with a ``peft`` section: ``adapter`` is then True), the final metrics and summary.json."""

    output_dir: Path
    model_path: Path
    metrics: dict
    summary: dict
    adapter: bool = False

    def __fspath__(self) -> str:  # a result stands for its model: evaluate(result), model={"name_or_path": result}
        return str(self.model_path)


@dataclass
class CompressResult:
    """What ``aligntool.compress`` made: the compressed model folder (transformers loads it) and its report
    (compression_report.json: budget, bytes, held-out perplexity and KL, per-layer choices)."""

    output_dir: Path
    model_path: Path
    report: dict

    def __fspath__(self) -> str:
        return str(self.model_path)


def train(recipe: Any, *, overrides: list[str] | tuple = (), resume: bool = False, overwrite: bool = False,
          accept_changes: bool = False, nproc: int = 1, **fields) -> TrainResult:
    """Train as ``aligntool train --recipe RECIPE KEY=VALUE... [--resume|--overwrite] [--nproc N]`` does.

    ``recipe``: a recipe file, a built-in name ("dpo"), a dict or a loaded recipe; ``fields``: recipe keys (a dict
    merges into its section); ``overrides``: ``key=value`` strings. ``nproc`` > 1 trains under torchrun in other
    processes (a reward callable defined in ``__main__``, a notebook or a closure cannot reach them, and is refused).
    Returns a ``TrainResult`` once the run's folder holds a model that loads."""
    from aligntool.resume import check_flags

    check_flags(resume, overwrite)
    if accept_changes and not resume:
        raise UserError("accept_changes: only with resume=True (it accepts a changed recipe for the resumed run)")
    if not isinstance(nproc, int) or isinstance(nproc, bool) or nproc < 1:
        raise UserError(f"nproc: expected a number of processes >= 1, got {nproc!r}")
    fields = _copy(fields)
    loaded, data, tokens = _load_train_recipe(recipe, fields, overrides)
    out = Path(loaded.recipe.output_dir).expanduser()
    if nproc > 1:
        if tokens:
            key, token = tokens[0]
            raise UserError(f"{key}: the callable {token[len('<callable '):-1]} lives in this Python process and "
                            f"cannot reach the {nproc} processes nproc={nproc} starts; define it in a module they "
                            "can import (or name it as 'module:function'), or train with nproc=1")
        _train_launched(recipe, data, fields, overrides, resume, overwrite, accept_changes, nproc)
    else:
        from aligntool.entry import check_push, push_final, train_here

        if loaded.recipe.train.push_to_hub:
            check_push(loaded)
        with _process_state():
            train_here(loaded, out, resume, overwrite, debug=False, accept_changes=accept_changes)
        result = _train_result(out)
        if loaded.recipe.train.push_to_hub:  # as `aligntool train` does (after the model is checked)
            push_final(loaded, out)
        return result
    return _train_result(out)


def evaluate(model: Any, *, reference: str | None = None, task: str = "reviews", data: str | None = None,
             split: str | None = None, data_opt: list[str] | tuple = (), recipe: str | None = None,
             reward_model: str | None = None, reward_fn: Any = None, tasks: str | list[str] | None = None,
             include_path: list[str] | tuple = (), backend: str = "hf", limit: float | None = None,
             num_fewshot: int | None = None, num_prompts: int | None = None, samples: int = 8,
             pass_k: str | list[int] | None = None, max_new_tokens: int | None = None, temperature: float = 1.0,
             batch_size: int = 64, seed: int = 0, revise: int = 0, out: str | os.PathLike | None = None,
             overwrite: bool = False) -> dict:
    """Score a model as ``aligntool eval`` does (the same options, by the same names; docs/EVAL.md) and return the
    result ``--json`` prints: on the toy world (``task``), on the user's data (``data`` / ``recipe``, scored by
    ``reward_model`` or ``reward_fn``: a ``module:function`` or a Python callable), or on lm-eval ``tasks``.
    ``model`` (and ``reference``) may be a folder, 'tiny', a hub id or a ``TrainResult`` / ``CompressResult``.
    Error messages name the command line's options (``--data`` for ``data``)."""
    from aligntool.commands import eval_result

    if callable(reward_fn):
        from aligntool import rewards

        reward_fn = rewards.callable_spec(reward_fn)
    if isinstance(tasks, (list, tuple)):
        tasks = ",".join(tasks)
    if isinstance(pass_k, (list, tuple)):
        pass_k = ",".join(str(k) for k in pass_k)
    for name, value in (("samples", samples), ("batch_size", batch_size), ("revise", revise)):
        if not isinstance(value, int) or value < (0 if name == "revise" else 1):
            raise UserError(f"{name}: expected a whole number >= {0 if name == 'revise' else 1}, got {value!r}")
    user = dict(data=_path(data), split=split, data_opt=list(data_opt or []), recipe=_path(recipe),
                reward_model=_path(reward_model), reward_fn=reward_fn, tasks=tasks,
                include_path=[str(p) for p in include_path or []], backend=backend, limit=limit,
                num_fewshot=num_fewshot, out=Path(out) if out is not None else None, overwrite=overwrite)
    return eval_result(_path(model), _path(reference), task, num_prompts, samples, pass_k, max_new_tokens,
                       temperature, batch_size, seed, revise, user)


def compress(recipe: Any, *, overrides: list[str] | tuple = (), resume: bool = False, overwrite: bool = False,
             progress: bool = True, **fields) -> CompressResult:
    """Compress as ``aligntool compress --recipe RECIPE KEY=VALUE...`` does: ``recipe`` a compress recipe file, a
    built-in name ("compress_quant"), a dict or a ``CompressRecipe``; ``fields`` and ``overrides`` as for ``train``.
    Returns a ``CompressResult`` once the output folder holds a model that loads."""
    from aligntool.compress.recipe import load_compress_mapping
    from aligntool.compress.run import compress as run_compress
    from aligntool.outputs import check_model_saved

    data, source, lines, _ = _recipe_mapping(recipe, "compress")
    _merge_fields(data, fields, lines)
    _apply_overrides(data, overrides, lines)
    _no_callables(data, ())
    loaded = load_compress_mapping(data, source, lines)
    report = run_compress(loaded, resume=resume, progress=progress, overwrite=overwrite)
    out = Path(loaded.output_dir).expanduser()
    check_model_saved(out, key="output_dir", what="compressed")
    return CompressResult(out, out, report)


def _load_train_recipe(recipe: Any, fields: dict, overrides) -> tuple:
    """The validated training recipe (``LoadedRecipe``), its mapping, and (key, token) of the reward callables only
    this process can call. ``fields`` (a copy: it is changed) has its callables replaced by what the recipe records
    first: a recipe file's are passed on as overrides with nproc > 1."""
    from aligntool.recipe.loader import load_mapping

    taken: dict = {}
    tokens = _reward_callables(fields, taken)
    data, source, lines, base_dir = _recipe_mapping(recipe, "algorithm")
    _merge_fields(data, fields, lines)
    _apply_overrides(data, overrides, lines)
    tokens += _reward_callables(data, taken)
    return load_mapping(data, source, lines, base_dir), data, tokens


def _path(value):
    """A model or file argument as the commands take it: a string (a result stands for its model folder)."""
    return None if value is None else os.fspath(value) if isinstance(value, os.PathLike) else value


def _recipe_mapping(recipe: Any, kind: str) -> tuple[dict, str, dict, Path | None]:
    """The recipe's mapping (a copy: the caller's dict is left as it was), its name for messages, where each key came
    from, and the folder its relative files are looked for in first."""
    from aligntool.recipe.loader import LoadedRecipe, read_recipe, resolve_recipe_path

    if isinstance(recipe, (str, os.PathLike)):
        data, source, lines = read_recipe(os.fspath(recipe))
        return data, source, lines, resolve_recipe_path(os.fspath(recipe)).resolve().parent
    if isinstance(recipe, dict):
        return _copy(recipe), _DICT_SOURCE, {}, None
    if isinstance(recipe, LoadedRecipe):
        return recipe.resolved(), recipe.source, {}, recipe.base_dir
    dump = getattr(recipe, "model_dump", None)  # a Recipe or CompressRecipe (pydantic)
    if dump is not None:
        return dump(mode="json", exclude_none=True), f"{type(recipe).__name__} object", {}, None
    raise UserError(f"recipe: expected a recipe file, a built-in name, a dict or a loaded recipe, got "
                    f"{type(recipe).__name__} ({'a training' if kind == 'algorithm' else 'a compress'} recipe)")


def _copy(value):
    """Dicts and lists copied, paths (and results) as strings, everything else (a reward callable with its state) kept
    as the same object."""
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_copy(v) for v in value]
    return value


def _merge_fields(data: dict, fields: dict, lines: dict, prefix: tuple = ()) -> None:
    """Keyword arguments into the recipe: a dict merges into the section of that name key by key, any other value
    replaces the key. In ``reward``, a score source given (source, ensemble, function, functions) replaces the
    recipe's (they are alternatives)."""
    for key, value in fields.items():
        path = (*prefix, str(key))
        _mark(path, value, lines)
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            if path == ("reward",) and _SCORE_SOURCES.keys() & value.keys():
                data[key] = {k: v for k, v in data[key].items() if k not in _SCORE_SOURCES}
            _merge_fields(data[key], value, lines, path)
        else:
            data[key] = _copy(value)


def _mark(path: tuple, value, lines: dict) -> None:
    """Messages about a key given as a keyword name it so (``keyword train=``), as the command line names an
    override."""
    lines[path] = f"keyword {path[0]}="
    if isinstance(value, dict):
        for key, sub in value.items():
            _mark((*path, str(key)), sub, lines)


def _apply_overrides(data: dict, overrides, lines: dict) -> None:
    from aligntool.recipe.loader import apply_override, parse_override

    if isinstance(overrides, str):
        raise UserError(f"overrides: expected a list of KEY=VALUE strings, got the string {overrides!r}")
    for text in overrides or ():
        if not isinstance(text, str):
            raise UserError(f"overrides: expected KEY=VALUE strings, got {text!r}")
        parts, value = parse_override(text)
        apply_override(data, parts, value, text)
        lines[tuple(parts)] = f"override {text!r}"


def _reward_callables(data: dict, taken: dict) -> list[tuple[str, str]]:
    """Reward callables replaced by the strings the recipe records (``rewards.callable_spec``; ``taken``: the tokens
    given out for this recipe); returns (key, token) of those only this process can call. A callable anywhere else
    is a one-line error naming its key."""
    from aligntool import rewards

    reward, found = data.get("reward"), []
    if isinstance(reward, dict):
        for key in ("function", "source", "judge"):
            if callable(reward.get(key)):
                reward[key] = rewards.callable_spec(reward[key], taken)
                found.append((f"reward.{key}", reward[key]))
        for i, term in enumerate(reward.get("functions") or []):
            if callable(term):  # a callable alone is a term of weight 1
                term = reward["functions"][i] = {"function": term}
            if isinstance(term, dict) and callable(term.get("function")):
                term["function"] = rewards.callable_spec(term["function"], taken)
                found.append((f"reward.functions[{i}].function", term["function"]))
    _no_callables(data, ())
    return [(key, spec) for key, spec in found if rewards.is_callable_token(spec)]


def _no_callables(value, path: tuple) -> None:
    if callable(value):
        where = ".".join(path) or "recipe"
        raise UserError(f"{where}: a Python callable ({getattr(value, '__qualname__', type(value).__name__)}) is "
                        "taken only as a reward function (reward.function, reward.functions, reward.source, "
                        "reward.judge); this key takes plain data (YAML values)")
    if isinstance(value, dict):
        for key, sub in value.items():
            _no_callables(sub, (*path, str(key)))
    elif isinstance(value, list):
        for i, sub in enumerate(value):
            _no_callables(sub, (*path[:-1], f"{path[-1]}[{i}]") if path else (f"[{i}]",))


def _train_launched(recipe, data: dict, fields: dict, overrides, resume: bool, overwrite: bool,
                    accept_changes: bool, nproc: int) -> None:
    """``nproc`` > 1: torchrun starts the ranks as ``aligntool train`` would. A recipe file is passed as itself with
    the keywords as overrides (its relative files are still found beside it); any other recipe as a temporary YAML
    file of the whole mapping (its relative files: from the working directory)."""
    import tempfile

    import yaml

    from aligntool.entry import Launch, start

    with tempfile.TemporaryDirectory(prefix="aligntool-api-") as tmp:
        if isinstance(recipe, (str, os.PathLike)):
            args = os.fspath(recipe), [*_as_overrides(fields), *(overrides or ())]
        else:
            path = Path(tmp) / "recipe.yaml"
            path.write_text(yaml.safe_dump(data, sort_keys=False))
            args = str(path), []
        code = start(*args, resume, overwrite, Launch(nproc=nproc), debug=False, accept_changes=accept_changes)
    if code:
        raise UserError(f"nproc={nproc}: training failed in the processes torchrun started (exit code {code}); "
                        "their messages are above")


def _as_overrides(fields: dict, prefix: str = "") -> list[str]:
    """Keyword fields as the command line's KEY=VALUE (JSON is YAML). A score source of ``reward`` resets the
    others to their defaults, as ``_merge_fields`` drops them."""
    out = []
    for key, value in fields.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            if name == "reward" and _SCORE_SOURCES.keys() & value.keys():
                out += [f"reward.{k}={json.dumps(v)}" for k, v in _SCORE_SOURCES.items() if k not in value]
            out += _as_overrides(value, f"{name}.")
        else:
            out.append(f"{name}={json.dumps(value, default=str)}")
    return out


@contextlib.contextmanager
def _process_state():
    """Training in the caller's process: the signal handlers a run installs (SIGUSR1/SIGTERM: checkpoint and stop)
    are put back afterwards, and transformers' deprecation chatter the command line hides is hidden here too."""
    import signal
    import threading
    import warnings

    from aligntool.launch.preemption import SIGNALS

    main = threading.current_thread() is threading.main_thread()
    handlers = [(s, signal.getsignal(s)) for s in SIGNALS] if main else []
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*gradient_checkpointing.*deprecated", category=FutureWarning)
            yield
    finally:
        for sig, handler in handlers:
            signal.signal(sig, handler)


def _train_result(out: Path) -> TrainResult:
    """The finished run in ``out``: its summary.json, and a model that loads (else the one-line error `aligntool
    train` gives)."""
    from aligntool.outputs import check_model_saved

    check_model_saved(out)
    try:
        summary = json.loads((out / "summary.json").read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"output_dir: {out}: no readable summary.json ({type(exc).__name__}): the run did not "
                        "finish") from None
    adapter = (out / "adapter_config.json").is_file()
    return TrainResult(out, out, summary.get("final_metrics") or {}, summary, adapter)
