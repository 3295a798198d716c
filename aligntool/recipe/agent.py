"""The recipe's ``agent`` section: multi-turn, tool-using episodes for the online methods (docs/AGENTS.md).

One contract for both rollout paths, TRL's: ``tools`` are Python functions (their JSON schema built from the signature
and the docstring, as transformers' ``apply_chat_template(tools=...)`` builds it), ``environment`` is a class in TRL's
environment contract (``reset(**kwargs)`` returns the first observation or None, its public methods are the tools,
an optional ``get_reward()`` scores the episode). GRPO hands them to TRL's GRPOTrainer (``tools=``,
``environment_factory=``); the engine methods (registry ``agent="engine"``) run the episodes in aligntool's engine.
The code is loaded by aligntool.tools; nothing here imports it.
"""

from __future__ import annotations

from pydantic import Field, PositiveInt, PrivateAttr, field_validator

from aligntool.recipe.base import Strict


def _dotted(spec: str, what: str) -> str:
    module, sep, name = spec.partition(":")
    if not sep or not module or not name or not name.isidentifier():
        raise ValueError(f"{spec!r}: expected '{what}'")
    return spec


class AgentConfig(Strict):
    """Multi-turn episodes with tools: the policy writes a turn, a tool call in it is run and its reply appended with
    the chat template's tool role, until an answer, a stop, ``max_turns`` or ``max_total_tokens``. Tokens the policy
    did not generate (tool replies, role markers) are masked out of the loss and the KL."""

    tools: list[str] | None = Field(
        None, description="Tools the policy may call: 'module:function' each (looked up in the recipe's folder, the "
        "working directory, then the installed packages). The function's signature and Google-style docstring give "
        "its JSON schema, as transformers' apply_chat_template(tools=...) builds it; through the Python API "
        "(aligntool.train) also Python callables.")
    environment: str | None = Field(
        None, description="'module:Class' in TRL's environment contract: one instance per episode, reset(**row) with "
        "the dataset row's columns returns the first observation (appended to the prompt) or None, its public "
        "methods are tools, and an optional get_reward() scores the episode (added to the reward functions).")
    max_turns: PositiveInt = Field(
        4, description="Assistant turns per episode at most (1 = a single turn; a tool call and its reply start the "
        "next turn). GRPO: TRL's max_tool_calling_iterations = max_turns - 1.")
    max_total_tokens: PositiveInt | None = Field(
        None, description="Tokens after the prompt over the whole episode, generated and inserted (tool replies, role "
        "markers); the episode ends when the next turn would pass it. Default: max_turns x the method's "
        "max_new_tokens.")
    tool_timeout: float = Field(
        10.0, gt=0, description="Seconds a tool call may run; a call that takes longer, or raises, becomes an error "
        "reply ('Error: ...') and the episode goes on (counted in the logs as tools/errors).")

    _base_dir: str | None = PrivateAttr(default=None)

    @property
    def base_dir(self) -> str | None:
        return self._base_dir

    @field_validator("tools")
    @classmethod
    def _tools(cls, v):
        if v is not None:
            if not v:
                raise ValueError("list at least one 'module:function', or leave tools out")
            for spec in v:
                if not str(spec).startswith("<callable "):  # a callable given to the Python API (aligntool.rewards)
                    _dotted(spec, "module:function")
            if len(set(v)) != len(v):
                raise ValueError("a tool is listed twice")
        return v

    @field_validator("environment")
    @classmethod
    def _environment(cls, v):
        if v is not None and not v.startswith("<callable "):
            _dotted(v, "module:Class")
        return v
