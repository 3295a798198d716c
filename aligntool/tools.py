"""The recipe's tools and environment (its ``agent`` section, aligntool.recipe.agent): loaded, checked, called.

One contract for both rollout paths, TRL's (GRPOTrainer's ``tools=`` / ``environment_factory=``):

- a tool is a Python function whose JSON schema transformers builds from its signature and Google-style docstring
  (``transformers.utils.get_json_schema``, what ``apply_chat_template(tools=...)`` renders); a function it cannot
  describe is refused when the run starts, in one line;
- an environment is a class: one instance per episode, ``reset(**row)`` -> the first observation (str) or None, its
  public methods (not ``reset`` / ``get_reward``, not starting with ``_``) are the episode's tools, an optional
  ``get_reward()`` -> float scores the finished episode;
- a call runs with a time limit; an exception, a timeout or an unknown tool becomes the reply, as TRL writes it
  (``str({"error": message})``), never a crash: the episode goes on and the engine counts it.
"""

from __future__ import annotations

import inspect
import threading
from dataclasses import dataclass
from typing import Any, Callable

from aligntool.errors import UserError

RESERVED = ("reset", "get_reward")  # an environment's methods that are not tools (TRL's rule)


@dataclass(frozen=True)
class ToolReply:
    """What a tool call gave: the reply's text (the tool message's content) and the error, if it failed."""

    text: str
    error: str | None = None


def _search_dirs(agent) -> tuple[str, ...]:
    import os

    return tuple(d for d in (agent.base_dir, os.getcwd()) if d)


def schema(fn: Callable, key: str) -> dict:
    """The JSON schema transformers builds for ``fn`` (as ``apply_chat_template(tools=[fn])`` renders it); one line
    naming ``key`` when it cannot (no docstring, an argument without a type hint or a description, ...)."""
    from transformers.utils import get_json_schema

    try:
        return get_json_schema(fn)
    except Exception as exc:  # transformers' TypeError / DocstringParsingException
        from aligntool.errors import first_line

        name = getattr(fn, "__name__", repr(fn))
        raise UserError(f"{key}: {name}: no JSON schema for the chat template ({first_line(exc)}); give it type hints "
                        "and a Google-style docstring with an Args section") from None


def schemas(fns: list[Callable]) -> list[dict]:
    return [schema(fn, "agent.tools") for fn in fns]


def load_tools(agent) -> list[Callable]:
    """The functions ``agent.tools`` names, imported (the recipe's folder, the working directory, then the installed
    packages) and checked: callable, with a JSON schema, distinct names."""
    from aligntool.rewards import function_scorer

    fns, names = [], set()
    for i, spec in enumerate(agent.tools or []):
        key = f"agent.tools[{i}]"
        fn = function_scorer(spec, key=key, search_dirs=_search_dirs(agent))
        schema(fn, key)
        if fn.__name__ in names:
            raise UserError(f"{key}: {spec}: a second tool named {fn.__name__!r}; tool names must differ")
        names.add(fn.__name__)
        fns.append(fn)
    return fns


def load_environment(agent) -> type | None:
    """The class ``agent.environment`` names (None when unset), checked against TRL's contract: a class with a
    ``reset`` method, whose public methods each have a JSON schema."""
    if agent.environment is None:
        return None
    from aligntool.rewards import function_scorer

    cls = function_scorer(agent.environment, key="agent.environment", search_dirs=_search_dirs(agent))
    if not inspect.isclass(cls):
        raise UserError(f"agent.environment: {agent.environment!r} is not a class (expected 'module:Class' with "
                        "reset(**kwargs) and public methods as tools)")
    if not callable(getattr(cls, "reset", None)):
        raise UserError(f"agent.environment: {agent.environment}: has no reset method (TRL's environment contract: "
                        "reset(**kwargs) returns the first observation or None)")
    for name, fn in _public_functions(cls):
        schema(fn, f"agent.environment {agent.environment}.{name}")
    return cls


def _public_functions(cls) -> list[tuple[str, Callable]]:
    return [(name, fn) for name, fn in inspect.getmembers(cls, predicate=inspect.isfunction)
            if name not in RESERVED and not name.startswith("_")]


def environment_methods(instance) -> list[Callable]:
    """An environment instance's tools: its public methods but ``reset`` / ``get_reward``, bound (TRL's rule)."""
    return [getattr(instance, name) for name, _ in _public_functions(type(instance))]


def call(fn: Callable, arguments: Any, timeout: float) -> ToolReply:
    """Run one tool call with a time limit. The result becomes the reply's text (``str(result)``, a list kept as TRL
    keeps it); an exception, arguments that do not fit, or ``timeout`` seconds without a result become an error reply
    ``str({"error": message})`` -- the episode goes on. A call past its limit is left running in a daemon thread
    (Python cannot stop a thread): a tool that may hang should bound its own work."""
    name = getattr(fn, "__name__", "tool")
    if not isinstance(arguments, dict):
        return _error(f"{name}: arguments must be a JSON object, got {type(arguments).__name__}")
    box: dict[str, Any] = {}

    def target():
        try:
            box["result"] = fn(**arguments)
        except BaseException as exc:  # noqa: BLE001 - any failure of user code is the tool's reply
            box["error"] = f"{type(exc).__name__}: {exc}"

    thread = threading.Thread(target=target, name=f"tool-{name}", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        return _error(f"{name} did not return within {timeout:g} s")
    if "error" in box:
        return _error(box["error"])
    result = box.get("result")
    return ToolReply(result if isinstance(result, list) else str(result))


def _error(message: str) -> ToolReply:
    return ToolReply(str({"error": message}), message)
