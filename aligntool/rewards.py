"""Reward sources: what scores a (prompt, completion) when a method samples its own data (RSO, SPPO, eval).

A recipe names one in its ``reward`` section:

    reward:
      source: gold            # the toy world's gold reward (default)
      source: runs/reward     # a reward-model folder (a one-output sequence classifier, e.g. from `algorithm: reward`)
      source: mypkg.mod:fn    # a Python function fn(prompts: list[str], completions: list[str]) -> list[float]
      function: mypkg.mod:fn  # the same, TRL's convention: fn(prompts, completions, **columns) -> list[float]
      functions: [{function: mypkg.mod:fn, weight: 1.0}, {source: runs/reward, weight: 0.5}]   # a weighted sum
      ensemble: [runs/rm0, runs/rm1]   # several reward models, combined by `aggregate` (mean)

Conversational data on TRL's path (GRPO / RLOO): TRL passes ``prompts`` and ``completions`` as lists of messages (a
completion of a tool episode holds the assistant's tool calls, the tool replies and the final answer). The built-in
scorers read them as TRL does: the gold reward scores the last assistant message's text (``completion_text``), a
reward model scores the whole conversation rendered by its own chat template (TRL's ``apply_chat_template`` on
prompt + completion); a user function receives them as TRL passes them.

Through the Python API (aligntool/api.py) a function may be given as a Python callable wherever a ``module:function``
is taken; the recipe records it as ``module:function`` when that imports back to it, else as a token
``<callable module:qualname>`` that this process resolves (``callable_spec``).
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable
from pathlib import Path

from aligntool.errors import UserError, first_line
from aligntool.recipe.schema import RewardConfig

Scorer = Callable[[list[str], list[str]], list[float]]


def is_conversation(value) -> bool:
    """A list of messages (TRL's conversational prompt or completion), not a string."""
    return isinstance(value, list) and all(isinstance(m, dict) and "role" in m for m in value)


def _content(message: dict) -> str:
    content = message.get("content") or ""
    if isinstance(content, list):  # content parts: their text
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return str(content)


def completion_text(completion) -> str:
    """A completion as the text a scorer reads: a string as is; a conversation's last assistant message (a tool
    episode's final answer; "" when the assistant never wrote one)."""
    if not is_conversation(completion):
        return completion
    return next((_content(m) for m in reversed(completion) if m.get("role") == "assistant"), "")


def shown(prompt) -> str:
    """A prompt as messages show it: a string as is, a conversation as its last message's text."""
    return _content(prompt[-1]) if is_conversation(prompt) and prompt else str(prompt)


def gold(prompts: list, completions: list) -> list[float]:
    from aligntool.toy import world

    return [world.gold_reward(completion_text(c)) for c in completions]


def is_reward_model(path: str) -> bool:
    """A sequence-classifier folder, or a LoRA adapter folder of one (task_type SEQ_CLS)."""
    adapter, config = Path(path) / "adapter_config.json", Path(path) / "config.json"
    if adapter.is_file() and not config.is_file():
        return json.loads(adapter.read_text()).get("task_type") == "SEQ_CLS"
    if not config.is_file():
        return False
    archs = json.loads(config.read_text()).get("architectures") or []
    return any(a.endswith("ForSequenceClassification") for a in archs)


def reward_model_scorer(path: str, batch_size: int = 64, key: str = "reward.source", device=None,
                        dtype: str = "auto", chat_template_kwargs: dict | None = None) -> Scorer:
    """Scores from a reward-model folder (a one-output sequence classifier), in eval mode, on ``device`` (default: this
    process's GPU, else the CPU) in ``dtype``, ``batch_size`` texts per forward. The model is ``scorer.model``.
    Conversational prompts and completions are scored as TRL's GRPO / RLOO score them with a reward model: prompt +
    completion messages rendered by the reward model's own chat template (with ``chat_template_kwargs``), tokenized
    without special tokens (the template writes them)."""
    import torch

    from aligntool import models

    config = Path(path) / "config.json"
    if not config.is_file() and not (Path(path) / "adapter_config.json").is_file():
        raise UserError(f"{key}: {path}: not a reward-model folder (no config.json)")
    if not is_reward_model(path):
        what = (f"architectures {json.loads(config.read_text()).get('architectures')}" if config.is_file()
                else "a LoRA adapter of a causal LM")
        raise UserError(f"{key}: {path}: not a reward model ({what}; expected a *ForSequenceClassification with one "
                        "output, e.g. from `algorithm: reward`)")
    tokenizer = models.load_tokenizer(path, key=key)
    tokenizer.padding_side = "right"
    device = torch.device(device) if device is not None else models.run_device()
    model = models.load_model(path, dtype, head="reward", pad_token_id=tokenizer.pad_token_id, key=key)
    model = model.to(device).eval().requires_grad_(False)

    def score(prompts: list, completions: list) -> list[float]:
        texts, special = _texts(prompts, completions, tokenizer, path, key, chat_template_kwargs or {})
        out: list[float] = []
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(texts[start : start + batch_size], return_tensors="pt", padding=True,
                              add_special_tokens=special).to(device)
            with torch.no_grad():
                out.extend(model(**batch).logits[:, 0].float().tolist())
        return out

    score.model = model
    return score


def _texts(prompts: list, completions: list, tokenizer, path: str, key: str, kwargs: dict) -> tuple[list[str], bool]:
    """The texts a reward model reads, and whether the tokenizer adds its special tokens: prompt + completion strings
    as they are; conversations rendered with the model's chat template by TRL's ``apply_chat_template``."""
    if not (prompts and is_conversation(prompts[0])):
        return [p + c for p, c in zip(prompts, completions)], True
    if not getattr(tokenizer, "chat_template", None):
        raise UserError(f"{key}: {path}: the prompts are conversations, but this reward model's tokenizer has no chat "
                        "template to render them")
    from trl.data_utils import apply_chat_template

    return [apply_chat_template({"messages": p + (c if is_conversation(c) else [{"role": "assistant", "content": c}])},
                                tokenizer, **kwargs)["text"] for p, c in zip(prompts, completions)], False


def check_same_tokenizer(paths: list[str], key: str = "reward.ensemble") -> None:
    """Ensemble members must read text the same way: compare their tokenizer files (after checking that each is a
    whole model folder: a half-written one is named as such, not as a tokenizer mismatch)."""
    from aligntool import models

    for p in paths:
        if not (Path(p) / "config.json").is_file() and not (Path(p) / "adapter_config.json").is_file():
            raise UserError(f"{key}: {p}: no model here (no config.json)")
        models.check_weights(p, key)
    first = None
    for p in paths:
        tok = Path(p) / "tokenizer.json"
        vocab = json.loads(tok.read_text()).get("model", {}).get("vocab") if tok.is_file() else None
        if first is None:
            first = (p, vocab)
        elif vocab != first[1]:
            raise UserError(f"{key}: {p} has a different tokenizer than {first[0]}; ensemble members must share one")


# callables given to the Python API (aligntool.train(..., reward={"function": fn})) that no other process can import:
# the recipe holds "<callable module:qualname>" for them, and this process looks them up here
_CALLABLES: dict[str, Callable] = {}
CALLABLE_PREFIX = "<callable "


def is_callable_token(spec: object) -> bool:
    return isinstance(spec, str) and spec.startswith(CALLABLE_PREFIX) and spec.endswith(">")


def callable_spec(fn: Callable, taken: dict[str, Callable] | None = None) -> str:
    """How a recipe records a Python callable: ``module:function`` where that imports back to ``fn`` itself (a
    top-level function of an importable module: any process finds it, as if the recipe had named it), else a token
    ``<callable module:qualname>`` that only this process resolves (a function of ``__main__`` or a notebook, a
    lambda, a closure, a bound method, a callable object). ``taken``: the tokens given out for one recipe, so that two
    different callables of the same name get distinct tokens (``#2``)."""
    module = getattr(fn, "__module__", None) or "?"
    qualname = getattr(fn, "__qualname__", None) or type(fn).__qualname__
    if module != "__main__" and "." not in qualname and "<" not in qualname:
        try:
            if getattr(importlib.import_module(module), qualname, None) is fn:
                return f"{module}:{qualname}"
        except ImportError:
            pass
    token, n = f"{CALLABLE_PREFIX}{module}:{qualname}>", 1
    taken = {} if taken is None else taken
    while token in taken and taken[token] is not fn:
        n += 1
        token = f"{CALLABLE_PREFIX}{module}:{qualname}#{n}>"
    taken[token] = _CALLABLES[token] = fn
    return token


def function_scorer(spec: str, key: str = "reward.source", search_dirs: tuple[str, ...] = ()) -> Scorer:
    """``module:function`` imported as Python code -- by design: a recipe naming a function runs that code, as a
    script would. The module is looked up in ``search_dirs`` (the recipe's folder, then the working directory) before
    the installed packages. A ``<callable ...>`` token (``callable_spec``) is the callable this process was given."""
    import sys

    if is_callable_token(spec):
        if spec not in _CALLABLES:
            raise UserError(f"{key}: {spec} was a Python callable given to aligntool.train in another process; it "
                            "cannot be imported: pass it again through the Python API (the same name resumes the "
                            "run), or name a 'module:function' instead")
        return _CALLABLES[spec]
    module, _, name = spec.partition(":")
    added = [d for d in dict.fromkeys(search_dirs) if d and d not in sys.path]
    sys.path[:0] = added
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        where = f" (looked in {', '.join(added)} and the installed packages)" if added else ""
        raise UserError(f"{key}: cannot import {spec!r}{where}: {exc}") from None
    finally:
        for d in added:
            sys.path.remove(d)
    if not callable(fn):
        raise UserError(f"{key}: {spec!r} is not callable")
    return fn


def search_dirs(config: RewardConfig) -> tuple[str, ...]:
    """Where ``module:function`` sources of a recipe are looked up first: its own folder, then the working directory."""
    import os

    return tuple(d for d in (config.base_dir, os.getcwd()) if d)


def _accepting(fn, name: str = "reward"):
    """``fn`` as a call ``(prompts, completions, **columns)``. A function with parameters named ``prompts`` /
    ``completions`` or with ``**kwargs`` is called by keyword, as TRL calls reward functions (so TRL's
    ``def reward_len(completions, **kwargs)`` works), with only the columns it takes (all of them with ``**kwargs``);
    any other function is called positionally ``fn(prompts, completions)``. A signature that cannot take the call is a
    UserError now, before any model loads."""
    import inspect

    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):  # a builtin or C function: positional, no keywords
        return lambda prompts, completions, **columns: fn(prompts, completions)
    names = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    var_kw = any(p.kind is p.VAR_KEYWORD for p in params)
    if var_kw or "completions" in names:
        base = {k for k in ("prompts", "completions") if k in names or var_kw}

        def call(prompts, completions, **columns):
            given = {"prompts": prompts, "completions": completions}
            return fn(**{k: given[k] for k in base}, **{k: v for k, v in columns.items()
                                                         if (var_kw or k in names) and k not in given})

        probe = {k: [] for k in base}
    else:
        def call(prompts, completions, **columns):
            return fn(prompts, completions, **{k: v for k, v in columns.items() if k in names})

        probe = None
    try:
        if probe is None:
            inspect.signature(fn).bind([], [])
        else:
            inspect.signature(fn).bind_partial(**probe)
    except TypeError as exc:
        raise UserError(f"reward {name}: its signature cannot take (prompts, completions, **columns): {exc}; "
                        "expected e.g. fn(prompts, completions, **kwargs)") from None
    return call


def checked(name: str, fn, allow_none: bool = False) -> Scorer:
    """``fn`` with its output checked on every call: one finite number per completion, else a one-line UserError that
    names the function and the first bad completion (an exception inside it likewise, with the batch's first prompt).
    ``allow_none``: None passes through (TRL's GRPO / RLOO read it as "this function does not apply to the row")."""
    import math

    call = _accepting(fn, name)

    def score(prompts: list[str], completions: list[str], **columns) -> list[float]:
        try:
            values = call(prompts, completions, **columns)
        except UserError:
            raise
        except Exception as exc:  # noqa: BLE001 - user code: any failure becomes one line naming it
            first = repr(shown(prompts[0])[:60]) if prompts else "none"
            raise UserError(f"reward {name}: raised {type(exc).__name__}: {first_line(exc)} (a batch of "
                            f"{len(completions)} completions; first prompt {first})") from None
        try:
            values = list(values)
        except TypeError:
            raise UserError(f"reward {name}: returned {type(values).__name__}, expected a list of "
                            f"{len(completions)} numbers") from None
        if len(values) != len(completions):
            raise UserError(f"reward {name}: returned {len(values)} values for {len(completions)} completions, "
                            "expected one number each")
        out = []
        for i, v in enumerate(values):
            if v is None and allow_none:
                out.append(None)
                continue
            try:
                number = float(v) if isinstance(v, (int, float)) or _is_scalar(v) else math.nan
            except (OverflowError, TypeError, ValueError):
                number = math.nan
            if not math.isfinite(number):
                raise UserError(f"reward {name}: completion {i} of {len(values)} in the batch (prompt "
                                f"{shown(prompts[i])[:60]!r}): {v!r} is not a finite number")
            out.append(number)
        return out

    score.__name__ = name
    return score


def _is_scalar(v) -> bool:
    """A NumPy / torch scalar (0-d) counts as a number."""
    return hasattr(v, "item") and getattr(v, "ndim", 1) == 0 and isinstance(v.item(), (int, float))


def terms(config: RewardConfig, device=None, allow_none: bool = False,
          chat_template_kwargs: dict | None = None) -> list[tuple[str, Scorer, float]]:
    """The recipe's reward as weighted terms (name, checked scorer(prompts, completions, **columns), weight): one term
    for ``source`` / ``ensemble`` / ``function``, one per entry of ``functions``. TRL's GRPO / RLOO trainers take them
    as ``reward_funcs`` + ``reward_weights`` (``allow_none``: a function may return None for a completion it does not
    apply to, which TRL skips); aligntool's own methods use their weighted sum (``load``), numbers only.
    ``chat_template_kwargs``: how reward models render conversations (TRL's ``train.chat_template_kwargs``)."""
    if config.judge:
        from aligntool.registry import listing

        raise UserError("reward.judge: a pairwise judge compares two completions and gives no score; this method needs "
                        f"reward.source, reward.function(s) or reward.ensemble (a judge applies to "
                        f"{listing(preferences=True)})")
    dirs = search_dirs(config)
    if config.functions:
        out = []
        for i, term in enumerate(config.functions):
            key = f"reward.functions[{i}]"
            if term.function is not None:
                out.append((_name(term.function), checked(_name(term.function), function_scorer(
                    term.function, key, dirs), allow_none), term.weight))
            else:
                out.append((_name(term.source), checked(_name(term.source), _source_scorer(
                    term.source, config, device, key, chat_template_kwargs)), term.weight))
        return out
    if config.function:
        fn = function_scorer(config.function, "reward.function", dirs)
        return [(_name(config.function), checked(_name(config.function), fn, allow_none), 1.0)]
    if config.ensemble:
        check_same_tokenizer(config.ensemble)
        members = [reward_model_scorer(p, config.batch_size, "reward.ensemble", device, config.dtype,
                                       chat_template_kwargs) for p in config.ensemble]

        def ensemble(prompts, completions):
            import torch

            from aligntool.losses.online import aggregate_ensemble

            scores = torch.tensor([m(prompts, completions) for m in members], dtype=torch.float64)
            return aggregate_ensemble(scores, config.aggregate, config.uwo_lambda, config.uwo_ddof).tolist()

        return [(f"ensemble_{config.aggregate}", checked(f"ensemble_{config.aggregate}", ensemble), 1.0)]
    scorer = _source_scorer(config.source, config, device, "reward.source", chat_template_kwargs)
    return [(_name(config.source), checked(_name(config.source), scorer), 1.0)]


def _name(spec: str) -> str:
    """A term's name in messages and logged metrics: the spec, a callable token as its ``module:qualname``."""
    return spec[len(CALLABLE_PREFIX):-1] if is_callable_token(spec) else spec


def check_functions(config: RewardConfig | None) -> None:
    """Import every ``module:function`` the section names, before any model is loaded: a typo fails in a second."""
    if config is None:
        return
    specs = [("reward.function", config.function)] + [
        (f"reward.functions[{i}]", t.function) for i, t in enumerate(config.functions or [])]
    if config.source != "gold" and ":" in config.source and not Path(config.source).exists():
        specs.append(("reward.source", config.source))
    for key, spec in specs:
        if spec:
            _accepting(function_scorer(spec, key, search_dirs(config)), _name(spec))  # its signature, too


def _source_scorer(source: str, config: RewardConfig, device, key: str,
                   chat_template_kwargs: dict | None = None) -> Scorer:
    if source == "gold":
        return gold
    if ":" in source and not Path(source).exists():
        return function_scorer(source, key, search_dirs(config))
    return reward_model_scorer(source, config.batch_size, key, device, config.dtype, chat_template_kwargs)


def load(config: RewardConfig, device=None) -> Scorer:
    """The scorer a recipe's ``reward`` section names: the weighted sum of its terms, each checked to return one finite
    float per completion (``scorer(prompts, completions, **columns)``; columns are the dataset's other columns, lists
    aligned with the rows, passed to functions that take them). Reward models run on ``device`` (default: this
    process's GPU, else the CPU) in ``reward.dtype``."""
    parts = terms(config, device)
    if len(parts) == 1 and parts[0][2] == 1.0:
        return parts[0][1]

    def weighted(prompts: list[str], completions: list[str], **columns) -> list[float]:
        total = [0.0] * len(completions)
        for _, fn, w in parts:
            total = [t + w * v for t, v in zip(total, fn(prompts, completions, **columns))]
        return total

    return weighted
