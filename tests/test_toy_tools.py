"""The toy tool task (aligntool/toy/tools.py) and the tiny-tools build (aligntool/toy/tiny_tools.py): the calculator
(values, refusals, its JSON schema as transformers builds it), the held-out split on unordered pairs, the 0/1 reward
on message and string completions (hand-computed cases), Qwen2.5's template as TRL ships it (rendered by jinja2
directly, compared with the tiny-tools tokenizer), TRL's parser reading a tool call, and a built model's round trip
through AutoTokenizer / AutoModelForCausalLM."""

from __future__ import annotations

import json

import pytest

from aligntool.toy import tools

CALL = '<tool_call>\n{"name": "calculator", "arguments": {"expression": "347 + 589"}}\n</tool_call>'


def test_calculator_values():
    assert tools.calculator("347 + 589") == "936"
    assert tools.calculator(" 12*3 - 4 ") == "32"
    assert tools.calculator("-5 + 2") == "-3"
    assert tools.calculator("2 - 3 * (4 + 1)") == "-13"


@pytest.mark.parametrize("expression", ["2 ** 10", "7 / 2", "1.5 + 1", "x + 1", "__import__('os')", "True + 1",
                                        "347 +", "[1] * 3", "9 * " * 60 + "9"])
def test_calculator_refuses_anything_but_integers_and_plus_minus_times(expression):
    with pytest.raises(ValueError, match="calculator"):
        tools.calculator(expression)


def test_calculator_schema_as_transformers_builds_it():
    from transformers.utils import get_json_schema

    assert get_json_schema(tools.calculator) == {
        "type": "function",
        "function": {
            "name": "calculator",
            "description": "Evaluate an arithmetic expression of integers with +, - and *.",
            "parameters": {"type": "object",
                           "properties": {"expression": {"type": "string",
                                                         "description": 'The expression, e.g. "347 + 589".'}},
                           "required": ["expression"]},
            "return": {"type": "string"},
        },
    }


def test_split_is_on_the_unordered_pair():
    """No unordered pair is on both sides; a held-out question's commuted twin is held out; about 1/8 held out."""
    train, held = tools.pairs("train", 3000), tools.pairs("eval", 600)
    unordered = lambda ps: {(min(a, b), max(a, b)) for a, b in ps}  # noqa: E731
    assert len(unordered(train)) == 3000 and len(unordered(held)) == 600  # distinct pairs
    assert not unordered(train) & unordered(held)
    assert all(tools.is_held_out(b, a) for a, b in held) and not any(tools.is_held_out(b, a) for a, b in train)
    assert any(a > b for a, b in train) and any(a < b for a, b in train)  # both orders asked
    share = sum(tools.is_held_out(a, b) for a in range(100, 1000, 7) for b in range(a, 1000, 3)) / sum(
        1 for a in range(100, 1000, 7) for b in range(a, 1000, 3))
    assert 0.11 < share < 0.14
    assert tools.pairs("train", 50, seed=1) == tools.pairs("train", 50, seed=1) != tools.pairs("train", 50, seed=2)


def test_rows_are_conversational_prompts_with_the_answer():
    row = tools.rows(3, seed=0, split="eval")[0]
    a, b = tools.operands(row["prompt"][0]["content"])
    assert row["prompt"] == [{"role": "user", "content": f"What is {a} + {b}?"}] and row["answer"] == str(a + b)
    assert 100 <= a <= 999 and 100 <= b <= 999


def _episode(final: str | None, reply: str = "936") -> list[dict]:
    call = {"type": "function", "function": {"name": "calculator", "arguments": {"expression": "347 + 589"}}}
    messages = [{"role": "assistant", "content": "", "tool_calls": [call]},
                {"role": "tool", "name": "calculator", "content": reply}]
    return messages + ([{"role": "assistant", "content": final}] if final is not None else [])


def test_reward_on_message_completions():
    completions = [
        _episode("The answer is 936."),                    # right
        _episode("The answer is 935."),                    # wrong
        _episode(None),                                    # ended on the tool call: the tool's 936 is no answer
        _episode("936, or rather 937"),                    # the final number counts
        [{"role": "assistant", "content": "347 + 589 = 936"}],  # in its head, right
        [{"role": "assistant", "content": "I do not know."}],   # no number
        [{"role": "assistant", "content": "Maybe 936."}] + _episode("I cannot tell."),  # only the last message counts
    ]
    assert tools.reward(None, completions, ["936"] * 7) == [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0]


def test_reward_on_string_completions():
    reply = "<|im_end|>\n<|im_start|>user\n<tool_response>\n936\n</tool_response><|im_end|>\n<|im_start|>assistant\n"
    completions = [
        CALL + reply + "The answer is 936.<|im_end|>",      # right, after the tool reply
        CALL + reply + "The answer is 963.<|im_end|>",      # wrong
        CALL + reply,                                       # nothing after the reply: the reply is no answer
        '<tool_call>\n{"name": "calculator", "arguments": {"expression": "589 + 936"}}\n</tool_call><|im_end|>',
        "The answer is 936.<|im_end|>",                     # in its head
        '<tool_call>\n{"name": "calculator", "arguments": {"expression": "1 + 936',  # cut-off tool call
    ]
    assert tools.reward(None, completions, [936] * 6) == [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]


def test_toy_dataset_task_tools():
    from aligntool.data import toy_rows
    from aligntool.errors import UserError

    assert toy_rows("prompt", 4, 0, "train", 0.5, "tools") == tools.rows(4, seed=0, split="train")
    with pytest.raises(UserError, match="'tools' has prompts"):
        toy_rows("preference", 4, 0, "train", 0.5, "tools")


@pytest.fixture(scope="module")
def quick_build(tmp_path_factory, tiny_path):
    """tiny-tools' build with 2 SFT steps: the tokenizer, template, resized embeddings and files of the real one."""
    from aligntool.toy import tiny_tools

    out = tmp_path_factory.mktemp("tiny-tools")
    tiny_tools.build_tiny_tools_model(out, tiny_path, cfg=dict(tiny_tools.TOOLS_SFT, steps=2, batch_size=4))
    return out


def test_template_renders_a_tool_call_and_reply_as_trl_qwen2_5(quick_build):
    """The saved tokenizer's template is TRL's qwen2_5.jinja; rendered by jinja2 itself (as transformers sets it up:
    trim_blocks, lstrip_blocks, tojson = json.dumps) it gives the tokenizer's text, tool call and reply included."""
    from pathlib import Path

    import jinja2
    import trl
    from transformers import AutoTokenizer
    from transformers.utils import get_json_schema

    from aligntool.toy.tiny_tools import demonstration

    source = (Path(trl.__file__).parent / "chat_templates" / "qwen2_5.jinja").read_text()
    tokenizer = AutoTokenizer.from_pretrained(quick_build)
    assert tokenizer.chat_template == source
    messages = demonstration(347, 589, use_tool=True)
    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
    env.filters["tojson"] = lambda x: json.dumps(x, ensure_ascii=False)
    expected = env.from_string(source).render(messages=messages, tools=[get_json_schema(tools.calculator)],
                                              add_generation_prompt=False)
    text = tokenizer.apply_chat_template(messages, tools=[tools.calculator], tokenize=False)
    assert text == expected
    assert ("<|im_start|>user\nWhat is 347 + 589?<|im_end|>\n<|im_start|>assistant\n" + CALL + "<|im_end|>\n"
            "<|im_start|>user\n<tool_response>\n936\n</tool_response><|im_end|>\n"
            "<|im_start|>assistant\nThe answer is 936.<|im_end|>\n") in text
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text  # tokens round-trip


def test_trl_parses_a_tool_call_of_the_template(quick_build):
    from transformers import AutoTokenizer
    from trl.chat_template_utils import add_response_schema, parse_response

    tokenizer = add_response_schema(AutoTokenizer.from_pretrained(quick_build))  # recognises Qwen2.5's template
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is 347 + 589?"}],
                                           tools=[tools.calculator], add_generation_prompt=True, return_dict=False)
    ids = tokenizer(CALL + "<|im_end|>", add_special_tokens=False)["input_ids"]
    parsed = parse_response(tokenizer, ids, prefix=list(prompt), tools=[tools.calculator])
    assert parsed["tool_calls"] == [{"type": "function", "function": {"name": "calculator",
                                                                      "arguments": {"expression": "347 + 589"}}}]


def test_built_model_round_trips(quick_build):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(quick_build)
    model = AutoModelForCausalLM.from_pretrained(quick_build)
    assert tokenizer.eos_token == "<|im_end|>" and model.generation_config.eos_token_id == tokenizer.eos_token_id
    assert model.get_input_embeddings().weight.shape[0] == len(tokenizer)
    for tag in ("<|im_start|>", "<|im_end|>", "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"):
        assert tokenizer.convert_ids_to_tokens(tokenizer(tag, add_special_tokens=False)["input_ids"]) == [tag]
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is 347 + 589?"}],
                                           tools=[tools.calculator], add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)
    assert prompt["input_ids"].shape[1] < 60  # the fixed system text is a few whole tokens
    out = model.generate(**prompt, max_new_tokens=3, do_sample=False)
    assert out.shape[1] <= prompt["input_ids"].shape[1] + 3 and torch.isfinite(model(**prompt).logits).all()


@pytest.mark.system
def test_reproduce_tool_rl_quick_prints_its_table_from_both_paths(tmp_path):
    """scripts/reproduce_tool_rl.py --quick end to end: GRPO with tools (TRL) and REINFORCE++ with tools (the engine)
    train through aligntool.train, log tool calls, and the table's figures are those of the per-question scores it
    saves (recomputed here). And the built tiny-tools itself (2-4 minutes to build on 2 cores, then cached), greedy
    on 32 held-out questions: it calls the calculator on some questions and not on others (the headroom RL has), and
    is right far more often after a call than without one."""
    import json
    import math
    import subprocess
    import sys

    from conftest import REPO

    out = tmp_path / "tool_rl"
    run = subprocess.run([sys.executable, str(REPO / "scripts" / "reproduce_tool_rl.py"), "--quick", "--questions",
                          "32", "--out", str(out)], capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    saved = json.loads((out / "tool_rl.json").read_text())["results"]
    lines = run.stdout.splitlines()
    header = max(i for i, line in enumerate(lines) if line.startswith("model "))  # after TRL's own printed logs
    rows = [line.split() for line in lines[header + 1:] if line.strip()]
    assert {(r[0], r[1]) for r in rows} == {(m, mode) for m in ("sft", "grpo+tools", "reinforce_pp+tools",
                                                                "grpo-no-tools", "reinforce_pp-no-tools")
                                            for mode in ("greedy", "T=1")}
    for r in rows:
        acc = saved[r[0]][r[1]]["accuracy"]
        assert len(acc) == 32 and math.isclose(float(r[2]), sum(acc) / 32, abs_tol=5.1e-4)
    sft = saved["sft"]["greedy"]
    called = [a for a, t in zip(sft["accuracy"], sft["tool_call"]) if t]
    direct = [a for a, t in zip(sft["accuracy"], sft["tool_call"]) if not t]
    assert 0.3 < len(called) / 32 < 0.95
    assert sum(called) / len(called) > 0.6 > 0.2 > sum(direct) / len(direct)
    for name, calls in (("grpo+tools", "tools/call_frequency"), ("reinforce_pp+tools", "tools/call_frequency")):
        logged = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()]
        assert any(row.get(calls, 0) > 0 for row in logged), (name, logged[-1])
    for name in ("grpo-no-tools", "reinforce_pp-no-tools"):
        logged = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()]
        assert not any(row.get("tools/call_frequency") for row in logged)
