"""The recipe's agent section and aligntool.tools: loading tools and environments by name, their JSON schemas, and a
tool call's time limit and errors (the reply, never a crash), in TRL's reply format."""

from __future__ import annotations

import textwrap
import threading

import pytest

from aligntool import tools
from aligntool.errors import UserError
from aligntool.recipe.agent import AgentConfig

TOOLS_PY = '''
import time


def add(a: int, b: int) -> int:
    """Add two integers.

    Args:
        a: The first integer.
        b: The second integer.
    """
    return a + b


def sleepy(seconds: float) -> str:
    """Sleep, then answer.

    Args:
        seconds: How long to sleep.
    """
    time.sleep(seconds)
    return "awake"


def undocumented(x):
    return x


class Counter:
    def reset(self, start: int = 0, **kwargs):
        self.n = start
        return f"count from {start}"

    def increment(self, by: int) -> int:
        """Increment the counter.

        Args:
            by: How much to add.
        """
        self.n += by
        return self.n

    def get_reward(self) -> float:
        return float(self.n)

    def _private(self):
        return None


class NoReset:
    def step(self, x: int) -> int:
        """Step.

        Args:
            x: A number.
        """
        return x
'''


@pytest.fixture
def agent_dir(tmp_path):
    (tmp_path / "agent_tools_mod.py").write_text(textwrap.dedent(TOOLS_PY))
    return tmp_path


def _agent(agent_dir, **fields) -> AgentConfig:
    agent = AgentConfig(**fields)
    agent._base_dir = str(agent_dir)
    return agent


def test_tools_load_with_the_schema_transformers_builds(agent_dir):
    from transformers.utils import get_json_schema

    fns = tools.load_tools(_agent(agent_dir, tools=["agent_tools_mod:add"]))
    assert [f.__name__ for f in fns] == ["add"]
    schema = tools.schemas(fns)[0]
    assert schema == get_json_schema(fns[0])
    assert schema["function"]["parameters"]["properties"]["a"] == {"type": "integer",
                                                                   "description": "The first integer."}


@pytest.mark.parametrize("spec, needle", [
    ("agent_tools_mod:undocumented", "no JSON schema"),
    ("agent_tools_mod:missing", "cannot import"),
    ("no_such_module_xyz:f", "cannot import"),
])
def test_a_tool_that_cannot_be_used_is_one_line(agent_dir, spec, needle):
    with pytest.raises(UserError) as err:
        tools.load_tools(_agent(agent_dir, tools=[spec]))
    assert needle in str(err.value) and "agent.tools[0]" in str(err.value) and "\n" not in str(err.value)


def test_environment_contract_as_trl(agent_dir):
    cls = tools.load_environment(_agent(agent_dir, environment="agent_tools_mod:Counter"))
    env = cls()
    assert env.reset(start=3) == "count from 3"
    methods = tools.environment_methods(env)
    assert [m.__name__ for m in methods] == ["increment"]  # not reset, get_reward or _private
    assert tools.call(methods[0], {"by": 2}, timeout=5).text == "5"
    assert env.get_reward() == 5.0
    with pytest.raises(UserError, match="has no reset method"):
        tools.load_environment(_agent(agent_dir, environment="agent_tools_mod:NoReset"))
    with pytest.raises(UserError, match="is not a class"):
        tools.load_environment(_agent(agent_dir, environment="agent_tools_mod:add"))


def test_a_call_that_raises_hangs_or_misfits_becomes_the_reply(agent_dir):
    add, sleepy = tools.load_tools(_agent(agent_dir, tools=["agent_tools_mod:add", "agent_tools_mod:sleepy"]))
    assert tools.call(add, {"a": 2, "b": 3}, timeout=5) == tools.ToolReply("5")
    reply = tools.call(add, {"a": 2}, timeout=5)  # a missing argument: TypeError, as TRL's {"error": str(e)}
    assert reply.error and reply.text == str({"error": reply.error}) and "TypeError" in reply.text
    assert tools.call(add, ["not", "a", "dict"], timeout=5).error
    reply = tools.call(sleepy, {"seconds": 30}, timeout=0.3)
    assert "did not return within 0.3 s" in reply.error
    # the call came back while the tool still runs (a daemon thread), not after it
    assert any(t.name == "tool-sleepy" and t.is_alive() for t in threading.enumerate())


@pytest.mark.parametrize("fields, needle", [
    ({"tools": []}, "at least one"),
    ({"tools": ["nomodule"]}, "module:function"),
    ({"tools": ["m:f", "m:f"]}, "twice"),
    ({"environment": "m.Env"}, "module:Class"),
    ({"tools": ["m:f"], "max_turns": 0}, "greater than 0"),
    ({"tools": ["m:f"], "tool_timeout": 0}, "greater than 0"),
])
def test_agent_section_checks(fields, needle):
    with pytest.raises(ValueError, match=needle):
        AgentConfig(**fields)


def test_agent_refused_where_no_path_runs_it(tmp_path, capsys):
    from tests.conftest import cli_error

    for algorithm, needles in (("rloo", ("use grpo, or reinforce_pp",)), ("dpo", ("not with 'dpo'",)),
                               ("reinforce_pp", ("name the tools",))):
        recipe = tmp_path / f"{algorithm}.yaml"
        agent = "{max_turns: 2}" if algorithm == "reinforce_pp" else "{tools: ['m:f']}"
        recipe.write_text(f"algorithm: {algorithm}\nagent: {agent}\n")
        cli_error(capsys, ["train", "--recipe", str(recipe)], "agent:", *needles)
