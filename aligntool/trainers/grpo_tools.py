"""GRPO with tools and environments: the recipe's ``agent`` section handed to TRL's GRPOTrainer (docs/AGENTS.md).

TRL runs the episodes (``GRPOTrainer._tool_call_loop``): it renders the conversational prompt with the tools' JSON
schemas, generates, parses tool calls from the response with the response template it knows for the chat template
(``trl.chat_template_utils.add_response_schema``), calls the tools, appends their replies with the template's tool
role, and generates again until no call is left, ``max_tool_calling_iterations`` or ``max_completion_length``; the
reply tokens get ``tool_mask`` 0 (out of the loss; the logged completion lengths count the policy's tokens only).

What aligntool adds (the mapping of the recipe's keys):

    agent.tools             -> tools=            the functions, each wrapped to run through aligntool.tools.call
    agent.environment       -> environment_factory=   the class (its public methods wrapped the same way); with a
                                                 get_reward() TRL adds it as a reward source (weight 1), and the
                                                 recipe may then leave ``reward`` out
    agent.max_turns         -> max_tool_calling_iterations = max_turns - 1
    agent.max_total_tokens  -> max_completion_length (TRL's budget covers the whole episode, tool replies included);
                               refused beside a different algo.max_completion_length
    agent.tool_timeout      -> each call's time limit: TRL runs sync tools without one. A call that raises or times out
                               raises ToolFailed, which TRL turns into the reply ``{'error': message}`` (the text
                               aligntool.tools.call writes) and counts in tools/failure_frequency; aligntool logs the
                               run's totals as tools/errors and tools/timeouts.

Refused in one line before the model loads: prompts that are not conversations (TRL's tool loop reads messages), a
chat template without tool-call syntax (TRL's ``supports_tool_calling``), one TRL cannot parse responses of
(``add_response_schema``), or one it cannot make prefix-preserving (``get_training_chat_template``).
"""

from __future__ import annotations

import functools

from aligntool.errors import UserError

TIMEOUT_WORDS = " did not return within "  # aligntool.tools.call's message for a call past its time limit


class ToolFailed(Exception):
    """A tool call that raised or ran past agent.tool_timeout; TRL makes its message the tool's error reply."""


class ToolCounts:
    """Failed and timed-out tool calls of the run (this process), logged as tools/errors and tools/timeouts."""

    def __init__(self):
        self.errors = 0
        self.timeouts = 0

    def run(self, fn, arguments: dict, timeout: float):
        from aligntool import tools

        reply = tools.call(fn, arguments, timeout)
        if reply.error is None:
            return reply.text
        self.errors += 1
        self.timeouts += TIMEOUT_WORDS in reply.error
        raise ToolFailed(reply.error)


def timed_tool(fn, timeout: float, counts: ToolCounts):
    """``fn`` called through aligntool.tools.call with ``timeout``; functools.wraps keeps the name, the signature and
    the docstring TRL builds the tool's JSON schema from (transformers' get_json_schema follows ``__wrapped__``)."""

    @functools.wraps(fn)
    def tool(**kwargs):
        return counts.run(fn, kwargs, timeout)

    return tool


def timed_environment(cls: type, timeout: float, counts: ToolCounts) -> type:
    """A subclass of the environment class of the same name whose public methods (TRL's tools) run through
    aligntool.tools.call; reset and get_reward are the class's own."""
    from aligntool import tools

    def timed_method(fn):
        @functools.wraps(fn)
        def method(self, **kwargs):
            return counts.run(fn.__get__(self), kwargs, timeout)

        return method

    namespace = {name: timed_method(fn) for name, fn in tools._public_functions(cls)}
    namespace.update(__module__=cls.__module__, __qualname__=cls.__qualname__, __doc__=cls.__doc__)
    return type(cls.__name__, (cls,), namespace)


def environment_reward(run) -> bool:
    """Whether the recipe's environment scores episodes itself (a get_reward method, TRL's reward source)."""
    from aligntool import tools

    agent = run.recipe.agent
    cls = tools.load_environment(agent) if agent is not None else None
    return cls is not None and callable(getattr(cls, "get_reward", None))


def check_prompts(run) -> None:
    data = run.train_dataset
    if data is not None and len(data) and not isinstance(data[0]["prompt"], list):
        raise UserError(f"{run.loaded.source}: dataset: agent: TRL's tool episodes need conversational prompts (each "
                        "prompt a list of messages, e.g. [{role: user, content: ...}]); these prompts are strings")


def check_template(run) -> None:
    """TRL's own checks of the chat template, before the model loads: one line naming the template."""
    from trl.chat_template_utils import (
        add_response_schema,
        get_training_chat_template,
        is_chat_template_prefix_preserving,
        supports_tool_calling,
    )

    tok, m = run.tokenizer, run.recipe.model
    what = (f"model.chat_template: {m.chat_template}" if m.chat_template
            else f"model.name_or_path: {m.name_or_path} (its chat template)")
    where = f"{run.loaded.source}: {what}"
    if not supports_tool_calling(tok):
        raise UserError(f"{where}: has no tool-call syntax (TRL's supports_tool_calling: a tool call or its reply does "
                        "not render); agent needs a template that defines tool calls, e.g. TRL's "
                        "trl/chat_templates/qwen2_5.jinja or qwen3.jinja")
    if getattr(tok, "response_template", None) is None and getattr(tok, "response_schema", None) is None:
        try:
            add_response_schema(tok)  # what GRPOTrainer does; it skips a tokenizer that has one already
        except ValueError:
            raise UserError(f"{where}: TRL cannot parse tool calls from this template's responses (it knows the "
                            "templates it ships in trl/chat_templates/: Qwen2.5, Qwen3, Qwen3.5, Llama 3.1/3.2, "
                            "GPT-OSS, GLM-4 MoE, Gemma 4, LFM2, Nemotron 3, DeepSeek-R1 distill; or give the tokenizer "
                            "a response_template)") from None
    if not is_chat_template_prefix_preserving(tok):
        try:
            get_training_chat_template(tok)
        except ValueError:
            raise UserError(f"{where}: renders earlier turns differently once later turns follow (not "
                            "prefix-preserving), and TRL has no training copy of it for multi-turn episodes") from None


def apply_budget(run, config) -> None:
    """agent.max_turns and agent.max_total_tokens onto the GRPOConfig (TRL's names)."""
    agent, source = run.recipe.agent, run.loaded.source
    if "max_tool_calling_iterations" in (run.recipe.train.model_extra or {}):
        raise UserError(f"{source}: train.max_tool_calling_iterations: set agent.max_turns instead (TRL's "
                        "max_tool_calling_iterations = max_turns - 1)")
    config.max_tool_calling_iterations = agent.max_turns - 1
    if agent.max_total_tokens is not None:
        default = type(run.algo).model_fields["max_completion_length"].default
        if config.max_completion_length not in (default, agent.max_total_tokens):
            raise UserError(f"{source}: agent.max_total_tokens: {agent.max_total_tokens}, but algo."
                            f"max_completion_length is {config.max_completion_length}: in TRL's GRPO both are the "
                            "budget of the whole episode (tool replies included); set one of them")
        config.max_completion_length = agent.max_total_tokens


def trainer_kwargs(run, config) -> tuple[dict, ToolCounts]:
    """GRPOTrainer's tools= / environment_factory= for the recipe's agent section, checked; ``config`` (the run's
    GRPOConfig) gets the turn and token budgets."""
    from aligntool import tools

    agent = run.recipe.agent
    check_prompts(run)
    check_template(run)
    apply_budget(run, config)
    counts = ToolCounts()
    kwargs: dict = {}
    fns = tools.load_tools(agent)
    if fns:
        kwargs["tools"] = [timed_tool(fn, agent.tool_timeout, counts) for fn in fns]
    cls = tools.load_environment(agent)
    if cls is not None:
        kwargs["environment_factory"] = timed_environment(cls, agent.tool_timeout, counts)
    return kwargs, counts


def counts_callback(counts: ToolCounts):
    """Adds the run's failed and timed-out tool calls so far to every logged row (tools/errors, tools/timeouts)."""
    from transformers import TrainerCallback

    class ToolLogs(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs is not None and "loss" in logs:
                logs["tools/errors"] = counts.errors
                logs["tools/timeouts"] = counts.timeouts

    return ToolLogs()
