"""The contract between an online method and the rollout engine: ``OnlineMethod`` says, in one place, everything the
engine (aligntool.online.engine.Engine) reads of a method object; ``check_method`` holds a method object to it when
the engine is made for it; ``MethodBase`` gives the capabilities' defaults to a method class that declares only what
differs."""

from __future__ import annotations

import inspect
from typing import Literal, Protocol, get_args, get_origin, get_type_hints, runtime_checkable


@runtime_checkable
class OnlineMethod(Protocol):
    """What an online method is to the engine. A method module under ``aligntool/online/`` provides ``method(run)``
    (registry kind "online"), which returns an object with these members (``MethodBase`` holds the defaults):

    ``step(engine, prompts) -> dict[str, float]``
        One iteration on this process's slice of the global batch of prompts: roll out with the engine's steps
        (``sample``, ``sample_groups``, ``samples``, ``score``, ``policy_logprobs``, ``ref_logprobs``, ``rollout``),
        update with ``engine.optimizer_step(loss)`` exactly ``updates_per_iteration`` times, and return the
        statistics to log (numbers; the engine averages them over the processes).
    ``updates_per_iteration: int`` (>= 1, no default)
        Optimizer steps per iteration: the learning-rate schedule runs over iterations x this many steps.
    ``value_head: bool`` (default False)
        Put a scalar value head on the policy (PPO): ``policy_logprobs`` returns values, checkpoints hold the critic.
    ``critic: "shared" | "separate"`` (default "shared"; read only with ``value_head``)
        The value head reads the policy's own last hidden state, or that of a separate copy of the initial policy.
    ``samples_from_reference: bool`` (default False)
        The method generates from the frozen reference (XPO: ``sample(..., from_reference=True)``); refused under
        ZeRO-3 and FSDP, which keep the reference partitioned.
    ``uses_preferences: bool`` (default False)
        The method labels pairs with a preference source of its own (online DPO, XPO): the engine loads no reward
        scorer, so ``engine.score`` is not available.
    ``initial_kl_coef: float`` (default 0.0)
        ``engine.state["kl_coef"]`` at the first iteration: logged every iteration as ``kl_coef`` and checkpointed;
        a method with a KL controller (PPO) moves it.
    """

    updates_per_iteration: int
    value_head: bool
    critic: Literal["shared", "separate"]
    samples_from_reference: bool
    uses_preferences: bool
    initial_kl_coef: float

    def step(self, engine, prompts: list[str]) -> dict[str, float]: ...


class MethodBase:
    """The defaults of ``OnlineMethod``'s capabilities, for a method class to inherit; it declares what differs (and
    always ``updates_per_iteration`` and ``step``)."""

    value_head: bool = False
    critic: Literal["shared", "separate"] = "shared"
    samples_from_reference: bool = False
    uses_preferences: bool = False
    initial_kl_coef: float = 0.0


def _fits(value, hint) -> bool:
    if get_origin(hint) is Literal:
        return value in get_args(hint)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, hint)


def contract_problems(method) -> list[str]:
    """What ``method`` lacks or has of the wrong type against ``OnlineMethod``; empty when it meets the contract."""
    problems = []
    for member, hint in get_type_hints(OnlineMethod).items():
        if not hasattr(method, member):
            problems.append(f"{member} is missing")
            continue
        value = getattr(method, member)
        if not _fits(value, hint):
            problems.append(f"{member} = {value!r} is not {getattr(hint, '__name__', hint)}")
    if "updates_per_iteration" not in " ".join(problems) and method.updates_per_iteration < 1:
        problems.append(f"updates_per_iteration = {method.updates_per_iteration!r} is not >= 1")
    step = getattr(method, "step", None)
    if not callable(step):
        problems.append("step(engine, prompts) is missing")
    else:
        try:
            inspect.signature(step).bind(None, [])
        except TypeError:
            problems.append(f"step{inspect.signature(step)} does not take (engine, prompts)")
    return problems


def check_method(method, name: str):
    """``method`` if it meets ``OnlineMethod``, else a TypeError naming the method and each missing or ill-typed
    member (a programming error in the method module, not in the recipe)."""
    problems = contract_problems(method)
    if problems:
        raise TypeError(f"online method {name!r} ({type(method).__module__}.{type(method).__qualname__}) does not "
                        f"meet aligntool.online.contract.OnlineMethod: {'; '.join(problems)}")
    return method
