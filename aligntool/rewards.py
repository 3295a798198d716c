"""Reward sources: what scores a (prompt, completion) when a method samples its own data (RSO, SPPO, eval).

A recipe names one in its ``reward`` section:

    reward:
      source: gold            # the toy world's gold reward (default)
      source: runs/reward     # a reward-model folder (a one-output sequence classifier, e.g. from `algorithm: reward`)
      source: mypkg.mod:fn    # a Python function fn(prompts: list[str], completions: list[str]) -> list[float]
      ensemble: [runs/rm0, runs/rm1]   # several reward models, combined by `aggregate` (mean)
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable
from pathlib import Path

from aligntool.errors import UserError
from aligntool.recipe.schema import RewardConfig

Scorer = Callable[[list[str], list[str]], list[float]]


def gold(prompts: list[str], completions: list[str]) -> list[float]:
    from aligntool.toy import world

    return [world.gold_reward(c) for c in completions]


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
                        dtype: str = "auto") -> Scorer:
    """Scores from a reward-model folder (a one-output sequence classifier), in eval mode, on ``device`` (default: this
    process's GPU, else the CPU) in ``dtype``, ``batch_size`` texts per forward. The model is ``scorer.model``."""
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

    def score(prompts: list[str], completions: list[str]) -> list[float]:
        texts = [p + c for p, c in zip(prompts, completions)]
        out: list[float] = []
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(texts[start : start + batch_size], return_tensors="pt", padding=True).to(device)
            with torch.no_grad():
                out.extend(model(**batch).logits[:, 0].float().tolist())
        return out

    score.model = model
    return score


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


def function_scorer(spec: str, key: str = "reward.source", search_dirs: tuple[str, ...] = ()) -> Scorer:
    """``module:function`` imported as Python code -- by design: a recipe naming a function runs that code, as a
    script would. The module is looked up in ``search_dirs`` (the recipe's folder, then the working directory) before
    the installed packages."""
    import sys

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


def load(config: RewardConfig, device=None) -> Scorer:
    """The scorer a recipe's ``reward`` section names; each call checks it returns one finite float per completion.
    Reward models run on ``device`` (default: this process's GPU, else the CPU) in ``reward.dtype``."""
    if config.judge:
        raise UserError("reward.judge: a pairwise judge compares two completions and gives no score; this method needs "
                        "reward.source or reward.ensemble")
    if config.ensemble:
        check_same_tokenizer(config.ensemble)
        members = [reward_model_scorer(p, config.batch_size, "reward.ensemble", device, config.dtype)
                   for p in config.ensemble]

        def inner(prompts, completions):
            import torch

            from aligntool.losses.online import aggregate_ensemble

            scores = torch.tensor([m(prompts, completions) for m in members], dtype=torch.float64)
            return aggregate_ensemble(scores, config.aggregate, config.uwo_lambda, config.uwo_ddof).tolist()
    elif config.source == "gold":
        inner = gold
    elif ":" in config.source and not Path(config.source).exists():
        inner = function_scorer(config.source, "reward.source", search_dirs(config))
    else:
        inner = reward_model_scorer(config.source, config.batch_size, "reward.source", device, config.dtype)

    def checked(prompts: list[str], completions: list[str]) -> list[float]:
        import math

        scores = list(inner(prompts, completions))
        if len(scores) != len(completions) or not all(isinstance(s, (int, float)) and math.isfinite(s) for s in scores):
            raise UserError(f"reward: the source returned {len(scores)} values for {len(completions)} completions, "
                            "expected one finite number each")
        return [float(s) for s in scores]

    return checked
