"""GRPO on TRL's conversational path: conversations reach GRPOTrainer as messages (chat_template_kwargs apply, reward
functions receive messages), and the recipe's agent section becomes TRL's tools= / environment_factory= (tool replies
in the episode, masked out of the loss by TRL's tool_mask), with aligntool's time limit and one-line refusals.

The model is the tiny model with the special tokens of TRL's Qwen templates added (<|im_start|>, <|im_end|> as its
EOS, <tool_call>, ...) and room for their long tool prompts (max_position_embeddings 4096: rotary positions). A random
tiny model does not write a tool call: the tests make it write one with a transformers generation option passed
through TRL's own generation_kwargs (``sequence_bias``: a large bias on each next token of the wanted reply, keyed on
the tokens before it), so TRL's trainer, generation, parsing and tool loop all run as they do in training."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from aligntool.cli import main

TRL_TEMPLATES = Path(__import__("trl").__file__).parent / "chat_templates"
QWEN25, QWEN3 = TRL_TEMPLATES / "qwen2_5.jinja", TRL_TEMPLATES / "qwen3.jinja"
ADDED = ["<|im_start|>", "<|im_end|>", "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>",
         "<think>", "</think>"]
QUESTION = [{"role": "user", "content": "What is 2+3?"}]
CALL = '<tool_call>\n{"name": "%s", "arguments": {"expression": "2+3"}}\n</tool_call>'
ANSWER = "The answer is 5."
BIAS = 100.0

USER_PY = '''
import json
import time


def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression.

    Args:
        expression: The expression, e.g. 2+3.
    """
    a, b = expression.split("+")
    return str(int(a) + int(b))


def boom(expression: str) -> str:
    """A tool that fails.

    Args:
        expression: Ignored.
    """
    raise RuntimeError("the tool broke")


def sleepy(expression: str) -> str:
    """A tool that hangs.

    Args:
        expression: Ignored.
    """
    time.sleep(30)
    return "too late"


class Calc:
    def reset(self, **row):
        self.calls = 0
        return " Use the calculator."

    def calculator(self, expression: str) -> str:
        """Evaluate an arithmetic expression.

        Args:
            expression: The expression, e.g. 2+3.
        """
        self.calls += 1
        a, b = expression.split("+")
        return str(int(a) + int(b))

    def get_reward(self) -> float:
        return 10.0 * self.calls


def record(prompts, completions, completion_ids, **kwargs):
    with open("seen.jsonl", "a") as fh:
        for p, c, ids in zip(prompts, completions, completion_ids):
            fh.write(json.dumps({"prompt": p, "completion": c, "n_ids": len(ids)}) + "\\n")
    return [0.0] * len(completions)
'''


@pytest.fixture(scope="session")
def qwen_tiny(tmp_path_factory, tiny_path) -> Path:
    """The tiny model with Qwen's special tokens (EOS <|im_end|>) and 4096 rotary positions."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("qwen_tiny")
    tok = AutoTokenizer.from_pretrained(tiny_path)
    tok.add_tokens(ADDED, special_tokens=True)
    tok.eos_token, tok.model_max_length = "<|im_end|>", 4096
    model = AutoModelForCausalLM.from_pretrained(tiny_path)
    model.resize_token_embeddings(len(tok), mean_resizing=False)
    model.config.max_position_embeddings = 4096
    model.config.eos_token_id = model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture
def user_dir(tmp_path, monkeypatch):
    (tmp_path / "user_tools.py").write_text(USER_PY)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    rows = [{"prompt": QUESTION, "answer": "5"}] * 4
    (tmp_path / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path


def _tokenizer(model: Path, template: Path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    tok.chat_template = template.read_text()
    return tok


def forcing(tok, tool_name: str | None, tools: list) -> list:
    """sequence_bias entries that make the model write ``CALL % tool_name`` + EOS after the prompt (when tool_name),
    and ANSWER + EOS after a tool reply: each next token biased, keyed on the context before it (the prompt's tail as
    TRL renders it with the tools, or the tool reply's closing tokens)."""
    prompt = tok.apply_chat_template(QUESTION, tools=tools, add_generation_prompt=True, tokenize=True,
                                     return_dict=False)
    after_tool = tok.encode("</tool_response><|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)
    out = []
    for context, text in ((prompt[-12:], CALL % tool_name if tool_name else None), (after_tool, ANSWER)):
        if text is None:
            continue
        target = tok.encode(text, add_special_tokens=False) + [tok.eos_token_id]
        out += [[context + target[: i + 1], BIAS] for i in range(len(target))]
    return out


def grpo_recipe(user_dir: Path, model: Path, template: Path, agent: str, bias: list, *extra: str) -> Path:
    recipe = user_dir / "recipe.yaml"
    recipe.write_text(textwrap.dedent(f"""\
        algorithm: grpo
        model: {{name_or_path: {model}, chat_template: {template}}}
        dataset: {{path: qa.jsonl}}
        reward: {{function: 'user_tools:record'}}
        {agent}
        train: {{max_steps: 1, per_device_train_batch_size: 4, logging_steps: 1, save_steps: 100, seed: 0}}
        algo: {{num_generations: 4, max_completion_length: 200, generation_kwargs: {{sequence_bias: {json.dumps(bias)}}}}}
        """) + "".join(f"{e}\n" for e in extra))
    return recipe


def train(recipe: Path, out: Path, capsys) -> tuple[int, str]:
    code = main(["train", "--recipe", str(recipe), f"output_dir={out}"])
    return code, capsys.readouterr().err


def metrics(out: Path) -> dict:
    return next(r for r in (json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r)


def seen(user_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (user_dir / "seen.jsonl").read_text().splitlines()]


def tool_suffix(tok, name: str, reply: str) -> list[int]:
    """The tokens TRL inserts after the assistant's tool call (its EOS): the tool message and the next assistant
    header, as the template renders them (computed here from the template, as TRL's _get_tool_suffix_ids does)."""
    call = [{"type": "function", "function": {"name": name, "arguments": {}}}]
    head = [{"role": "user", "content": "dummy"}, {"role": "assistant", "content": "", "tool_calls": call}]
    prefix = tok.apply_chat_template(head, tokenize=True, return_dict=False)
    full = tok.apply_chat_template(head + [{"role": "tool", "name": name, "content": reply}], tokenize=True,
                                   add_generation_prompt=True, return_dict=False)
    prefix = prefix[: len(prefix) - prefix[::-1].index(tok.eos_token_id)]
    assert full[: len(prefix)] == prefix
    return full[len(prefix):]


@pytest.mark.system
def test_a_tool_call_runs_and_its_reply_reaches_the_reward_masked_out_of_the_loss(capsys, user_dir, qwen_tiny):
    from aligntool.tools import load_tools
    from aligntool.recipe.agent import AgentConfig

    tok = _tokenizer(qwen_tiny, QWEN25)
    calculator = load_tools(AgentConfig(tools=["user_tools:calculator"]))[0]
    recipe = grpo_recipe(user_dir, qwen_tiny, QWEN25, "agent: {tools: ['user_tools:calculator'], max_turns: 2}",
                         forcing(tok, "calculator", [calculator]))
    code, err = train(recipe, user_dir / "run", capsys)
    assert code == 0, err[-3000:]
    rows = seen(user_dir)
    assert len(rows) == 4
    turn1 = len(tok.encode(CALL % "calculator", add_special_tokens=False)) + 1
    turn2 = len(tok.encode(ANSWER, add_special_tokens=False)) + 1
    suffix = tool_suffix(tok, "calculator", "5")
    for row in rows:
        assert row["prompt"] == QUESTION
        call, reply, answer = row["completion"]  # messages, as TRL passes them
        assert call["tool_calls"][0]["function"] == {"name": "calculator", "arguments": {"expression": "2+3"}}
        assert reply == {"role": "tool", "name": "calculator", "content": "5"}  # the tool's real output
        assert answer["content"] == ANSWER
        assert row["n_ids"] == turn1 + len(suffix) + turn2  # the completion ids hold the inserted reply ...
    m = metrics(user_dir / "run")
    # ... and TRL's tool_mask leaves it out: the logged lengths count the policy's own tokens only
    assert m["completions/mean_length"] == turn1 + turn2
    assert m["tools/call_frequency"] == 1.0 and m["tools/failure_frequency"] == 0.0
    assert (m["tools/errors"], m["tools/timeouts"]) == (0, 0)
