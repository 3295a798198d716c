"""The bases every recipe section builds on, and the recipe facts the layers above share; nothing here imports
anything of aligntool's or anything heavy (pydantic only), so that every ``algo`` section can be checked without torch.

- ``Strict``: the base of every section (unknown keys are errors, numbers finite, the section -> TRL config contract);
- ``Sampling(...)``: the sampling settings of the methods that sample, with each method's defaults;
- ``online_config(...)``: the settings every online method shares (its ``algo`` section extends them);
- ``DEFAULT_ITERATIONS``: the online engine's number of iterations when ``train.max_steps`` is not set (Step Law
  reads it too);
- ``structural_pass()``: recipes are validated twice (keys, types and ranges first, then in full), so that a check
  of a value against a list only TRL or transformers knows (``in_structural_pass()``) runs in the second pass only.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import ClassVar

from pydantic import BaseModel, ConfigDict, Field

DEFAULT_ITERATIONS = 100  # online methods: iterations when train.max_steps is not set (logged)


class Strict(BaseModel):
    """Base of every recipe section: unknown keys are errors, numbers are finite.

    The contract between an ``algo`` section and the algorithm's TRL config is declared once, here: ``trl_fields``
    name the fields that go into the TRL config under the same name, ``trl_extra()`` adds what is renamed, converted or
    fixed; nothing else of the section reaches TRL (the rest is read by aligntool's own trainer code)."""

    model_config = ConfigDict(extra="forbid", validate_default=True, allow_inf_nan=False)
    trl_fields: ClassVar[tuple[str, ...]] = ()

    def trl_extra(self) -> dict:
        return {}

    def trl_kwargs(self) -> dict:
        """The keyword arguments this section gives the TRL config (None = TRL's own default)."""
        values = {f: getattr(self, f) for f in self.trl_fields if getattr(self, f) is not None}
        return {**values, **self.trl_extra()}


def Sampling(temperature: float = 1.0, top_p: float = 1.0, max_new_tokens: int = 48, top_k: int | None = None,
             seed: int | None = None) -> type[Strict]:
    """The sampling settings of the methods that sample (online RL, RSO, SPPO, INPO), declared once: a base class with
    the fields, their descriptions, and this method's defaults (``top_k`` and ``seed`` only where given)."""
    from pydantic import create_model

    fields = {
        "temperature": (float, Field(temperature, gt=0, description="Sampling temperature (1 = the policy's own "
                                     "distribution, on-policy).")),
        "top_p": (float, Field(top_p, gt=0, le=1, description="Nucleus sampling: keep the smallest set of tokens "
                               "holding this much probability (1 = off).")),
        "max_new_tokens": (int, Field(max_new_tokens, gt=0, description="Length limit of each sampled response, in "
                                      "tokens.")),
    }
    if top_k is not None:
        fields["top_k"] = (int, Field(top_k, ge=0, description="Keep only the k most likely tokens (0 = off)."))
    if seed is not None:
        fields["seed"] = (int, Field(seed, description="Seed of the sampling (and of the method's own draws)."))
    return create_model("Sampling", __base__=Strict, **fields)


def online_config(**sampling) -> type[Strict]:
    """The settings every online method shares (its ``algo`` section extends these), with the method's sampling
    defaults (temperature, top_p, max_new_tokens; see Sampling)."""

    class OnlineConfig(Sampling(**sampling)):
        missing_eos_penalty: float | None = Field(
            None, ge=0, description="Subtracted from the score of responses cut off before EOS (for the methods that "
            "label pairs, registry `preferences`: from the preference scores, as TRL).")
        disable_dropout: bool = Field(True, description="Dropout off in the policy (LoRA's included) and the "
                                      "reference, as TRL's trainers default: rollouts are scored in eval mode and "
                                      "updated in train mode, so with dropout the PPO/P3O ratio would not be 1 at the "
                                      "sampling policy.")

    return OnlineConfig


_STRUCTURAL = contextvars.ContextVar("aligntool_structural_pass", default=False)


@contextlib.contextmanager
def structural_pass():
    """The recipe loader's first pass (aligntool.recipe.loader): keys, types and ranges, with no TRL, transformers or
    torch imported, so that these errors come first and instantly, even where torch is absent (a login node). Checks
    of a value against a list only the installed library knows (``in_structural_pass()`` true) wait for the second,
    full pass."""
    token = _STRUCTURAL.set(True)
    try:
        yield
    finally:
        _STRUCTURAL.reset(token)


def in_structural_pass() -> bool:
    return _STRUCTURAL.get()
