"""The values of a TRL config field that only the installed TRL knows (the loss types of DPO, GRPO, KTO and CPO),
read from TRL itself, so that what TRL adds is accepted without a change here; and the one check of a recipe value
against them.

TRL is imported inside the functions only: method modules import this one, and the recipe loader's first, structural
pass (aligntool.recipe.base.structural_pass) checks keys, types and ranges without TRL; ``check`` waits for the
second pass."""

from __future__ import annotations

import functools
from collections.abc import Callable

from aligntool.recipe.base import in_structural_pass


def choices(config: str, field_name: str) -> tuple[str, ...]:
    """The values a field of a TRL config class ("module:Class") takes, from its ``choices`` metadata."""
    import dataclasses
    import importlib
    import warnings

    module, cls = config.split(":")
    with warnings.catch_warnings():  # trl.experimental says it is experimental on import; the module docstrings say so
        warnings.simplefilter("ignore")
        config_cls = getattr(importlib.import_module(module), cls)
    field = next(f for f in dataclasses.fields(config_cls) if f.name == field_name)
    found = tuple(field.metadata.get("choices") or ())
    if not found:
        raise RuntimeError(f"cannot read the {field_name} values of this TRL's {cls}")
    return found


def _help(config_cls, field_name: str) -> str:
    import dataclasses

    return next(f for f in dataclasses.fields(config_cls) if f.name == field_name).metadata.get("help", "")


@functools.lru_cache(maxsize=1)
def dpo_loss_types() -> tuple[str, ...]:
    """The DPO loss types of the installed TRL, read from its DPOConfig's help text (the parity test checks that
    aligntool's online restatement covers each one)."""
    import re

    from trl import DPOConfig

    types = tuple(re.findall(r"`'(\w+)'`", _help(DPOConfig, "loss_type")))
    if not types:
        raise RuntimeError("cannot read the DPO loss types from this TRL's DPOConfig")
    return types


@functools.lru_cache(maxsize=1)
def grpo_loss_types() -> tuple[str, ...]:
    """The GRPO loss types of the installed TRL, read from its GRPOConfig's help text ("Supported values are 'grpo',
    'dr_grpo', ... and 'vespo'." and the "'name': ..." paragraphs)."""
    import re

    from trl import GRPOConfig

    text = _help(GRPOConfig, "loss_type")
    listed = re.search(r"[Ss]upported values are (.*?)\.(?:\s|$)", text)
    types = re.findall(r"'(\w+)'", listed.group(1)) if listed else []
    types += re.findall(r"(?:^|\s)'(\w+)'(?: \(default\))?:", text)
    types = tuple(dict.fromkeys(types))
    if not types:
        raise RuntimeError("cannot read the GRPO loss types from this TRL's GRPOConfig")
    return types


@functools.lru_cache(maxsize=1)
def kto_loss_types() -> tuple[str, ...]:
    """The loss types of the installed TRL's KTOConfig."""
    return choices("trl:KTOConfig", "loss_type")


@functools.lru_cache(maxsize=1)
def cpo_loss_types() -> tuple[str, ...]:
    """The loss types of the installed TRL's CPOConfig."""
    return choices("trl.experimental.cpo:CPOConfig", "loss_type")


def check(value: str | list[str], known: Callable[[], tuple[str, ...]], named: str = "") -> str | list[str]:
    """A validator's body: each loss type in ``value`` must be one of ``known()`` (``named``: how the message names
    the list after "TRL's", e.g. " KTO loss types"). In the structural pass it returns ``value`` unchecked."""
    if in_structural_pass():
        return value
    for t in [value] if isinstance(value, str) else value:
        if t not in known():
            raise ValueError(f"loss_type {t!r} is not one of TRL's{named}: {', '.join(known())}")
    return value
