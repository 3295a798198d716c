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
CALL0 = '<tool_call>\n{"name": "%s", "arguments": {}}\n</tool_call>'  # a tool without arguments
ANSWER = "5"
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


def boom() -> str:
    """A tool that fails."""
    raise RuntimeError("the tool broke")


def sleepy() -> str:
    """A tool that hangs."""
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


def forcing(tok, call: str, tools: list, question=QUESTION) -> list:
    """sequence_bias entries that make the model write ``call`` + EOS after the prompt and ANSWER + EOS after a tool
    reply: each next token biased, keyed on the context before it (the prompt's tail as TRL renders it with the
    tools, or the tool reply's closing tokens)."""
    prompt = tok.apply_chat_template(question, tools=tools, add_generation_prompt=True, tokenize=True,
                                     return_dict=False)
    after_tool = tok.encode("</tool_response><|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)
    return bias(tok, prompt[-12:], call) + bias(tok, after_tool, ANSWER)


def bias(tok, context: list[int], text: str) -> list:
    """sequence_bias entries forcing ``text`` + EOS after ``context``."""
    out = []
    if text:
        target = tok.encode(text, add_special_tokens=False) + [tok.eos_token_id]
        out += [[context + target[: i + 1], BIAS] for i in range(len(target))]
    return out


def grpo_recipe(user_dir: Path, model: Path, template: Path, agent: str, forced: list,
                reward: str = "{function: 'user_tools:record'}", train_extra: str = "", length: int = 400,
                algorithm: str = "grpo") -> Path:
    recipe = user_dir / "recipe.yaml"
    recipe.write_text(textwrap.dedent(f"""\
        algorithm: {algorithm}
        model: {{name_or_path: {model}, chat_template: {template}}}
        dataset: {{path: qa.jsonl}}
        reward: {reward}
        {agent}
        train: {{max_steps: 1, per_device_train_batch_size: 4, logging_steps: 1, save_steps: 100, seed: 0{train_extra}}}
        algo: {{num_generations: 4, max_completion_length: {length}, generation_kwargs: GENERATION}}
        """).replace("GENERATION", json.dumps({"use_cache": True, "sequence_bias": forced})))
    return recipe


def train(recipe: Path, out: Path, capsys) -> tuple[int, str]:
    code = main(["train", "--recipe", str(recipe), f"output_dir={out}"])
    return code, capsys.readouterr().err


def metrics(out: Path) -> dict:
    return next(r for r in (json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r)


def seen(user_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (user_dir / "seen.jsonl").read_text().splitlines()]


def tool_suffix(tok, replies: list[tuple[str, str]]) -> list[int]:
    """The tokens TRL inserts after the assistant's tool calls (after its EOS): the tool messages and the next
    assistant header, as the template renders them (from the template here, as TRL's _get_tool_suffix_ids does)."""
    call = [{"type": "function", "function": {"name": replies[0][0], "arguments": {}}}]
    head = [{"role": "user", "content": "dummy"}, {"role": "assistant", "content": "", "tool_calls": call}]
    prefix = tok.apply_chat_template(head, tokenize=True, return_dict=False)
    tool = [{"role": "tool", "name": name, "content": reply} for name, reply in replies]
    full = tok.apply_chat_template(head + tool, tokenize=True, add_generation_prompt=True, return_dict=False)
    prefix = prefix[: len(prefix) - prefix[::-1].index(tok.eos_token_id)]
    assert full[: len(prefix)] == prefix
    return full[len(prefix):]


@pytest.mark.system
def test_tool_calls_run_their_replies_reach_the_reward_and_are_masked_out_of_the_loss(capsys, user_dir, qwen_tiny):
    """One turn calls three tools: the calculator (its real output is the reply), one that raises and one that hangs
    past agent.tool_timeout (their replies are the errors, as TRL writes them; the episode goes on to the answer)."""
    from aligntool.recipe.agent import AgentConfig
    from aligntool.tools import load_tools

    tok = _tokenizer(qwen_tiny, QWEN25)
    names = ["calculator", "boom", "sleepy"]
    fns = load_tools(AgentConfig(tools=[f"user_tools:{n}" for n in names]))
    turn = "\n".join([CALL % "calculator", CALL0 % "boom", CALL0 % "sleepy"])
    agent = f"agent: {{tools: {[f'user_tools:{n}' for n in names]}, max_turns: 2, tool_timeout: 0.5}}"
    code, err = train(grpo_recipe(user_dir, qwen_tiny, QWEN25, agent, forcing(tok, turn, fns)), user_dir / "run",
                      capsys)
    assert code == 0, err[-3000:]
    replies = [("calculator", "5"), ("boom", str({"error": "RuntimeError: the tool broke"})),
               ("sleepy", str({"error": "sleepy did not return within 0.5 s"}))]
    rows = seen(user_dir)
    assert len(rows) == 4
    for row in rows:
        assert row["prompt"] == QUESTION
        call, *tool_messages, answer = row["completion"]  # messages, as TRL passes them
        assert [c["function"] for c in call["tool_calls"]] == [
            {"name": "calculator", "arguments": {"expression": "2+3"}}, {"name": "boom", "arguments": {}},
            {"name": "sleepy", "arguments": {}}]
        assert tool_messages == [{"role": "tool", "name": n, "content": r} for n, r in replies]  # the real output
        assert answer == {"role": "assistant", "content": ANSWER}  # the episode went on after the errors
    turn1 = len(tok.encode(turn, add_special_tokens=False)) + 1
    turn2 = len(tok.encode(ANSWER, add_special_tokens=False)) + 1
    suffix = tool_suffix(tok, replies)
    assert all(row["n_ids"] == turn1 + len(suffix) + turn2 for row in rows)  # the ids hold the inserted replies ...
    m = metrics(user_dir / "run")
    # ... and TRL's tool_mask leaves them out: the logged lengths count the policy's own tokens only
    assert m["completions/mean_length"] == turn1 + turn2
    assert m["tools/call_frequency"] == 3.0 and m["tools/failure_frequency"] == pytest.approx(2 / 3)  # TRL's counts
    assert (m["tools/errors"], m["tools/timeouts"]) == (8, 4)  # aligntool's: 4 completions x (raise, timeout)
    import torch

    args = torch.load(user_dir / "run" / "training_args.bin", weights_only=False)  # TRL's config of the run
    assert (args.max_tool_calling_iterations, args.max_completion_length) == (1, 400)  # max_turns 2 - 1


@pytest.mark.system
def test_an_environment_resets_into_the_prompt_serves_a_tool_and_gives_the_reward(capsys, user_dir, qwen_tiny):
    from aligntool.recipe.agent import AgentConfig
    from aligntool.tools import environment_methods, load_environment

    tok = _tokenizer(qwen_tiny, QWEN25)
    env = load_environment(AgentConfig(environment="user_tools:Calc"))()
    observed = [{"role": "user", "content": QUESTION[0]["content"] + env.reset()}]  # TRL appends it to the prompt
    forced = forcing(tok, CALL % "calculator", environment_methods(env), observed)
    recipe = grpo_recipe(user_dir, qwen_tiny, QWEN25, "agent: {environment: 'user_tools:Calc', max_turns: 2}",
                         forced, reward="null")
    code, err = train(recipe, user_dir / "run", capsys)
    assert code == 0, err[-3000:]
    assert not (user_dir / "seen.jsonl").exists()  # no reward function: the environment's get_reward is the reward
    m = metrics(user_dir / "run")
    assert m["rewards/Calc/mean"] == 10.0 and m["reward"] == 10.0  # one calculator call per episode
    assert [k for k in m if k.startswith("rewards/") and k.endswith("/mean")] == ["rewards/Calc/mean"]  # no gold
    sampled = [json.loads(line) for line in (user_dir / "run" / "completions.jsonl").read_text().splitlines()]
    assert len(sampled) == 4 and all(r["prompt"] == observed for r in sampled)  # the first observation, in the prompt
    assert all(r["completion"][1] == {"role": "tool", "name": "calculator", "content": "5"} for r in sampled)
    assert all(r["reward"] == 10.0 for r in sampled)


def qwen3_prompt_ids(tok, thinking: bool) -> list[int]:
    """The generation prompt as Qwen3's template renders it (jinja2 through the tokenizer, independently of TRL)."""
    return tok.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=True, return_dict=False,
                                   enable_thinking=thinking)


@pytest.mark.system
def test_chat_template_kwargs_reach_trls_rendering_of_conversational_prompts(capsys, user_dir, qwen_tiny):
    """train.chat_template_kwargs {enable_thinking: ...}: the prompt ids GRPO (and RLOO) generate from are Qwen3's
    rendering with that value, exactly: the model is made to answer "no" only after the whole enable_thinking=false
    prompt and "yes" only after the whole enable_thinking=true prompt (the empty <think></think> block is the
    difference)."""
    tok = _tokenizer(qwen_tiny, QWEN3)
    off, on = qwen3_prompt_ids(tok, False), qwen3_prompt_ids(tok, True)
    assert len(off) > len(on) and tok.decode(off[len(on):]) == "<think>\n\n</think>\n\n"
    forced = bias(tok, off, "no") + bias(tok, on, "yes")
    for algorithm, thinking, word in (("grpo", False, "no"), ("grpo", True, "yes"), ("rloo", False, "no")):
        (user_dir / "seen.jsonl").unlink(missing_ok=True)
        recipe = grpo_recipe(user_dir, qwen_tiny, QWEN3, "", forced, length=4, algorithm=algorithm,
                             train_extra=f", chat_template_kwargs: {{enable_thinking: {str(thinking).lower()}}}")
        out = user_dir / f"{algorithm}{thinking}"
        code, err = train(recipe, out, capsys)
        assert code == 0, err[-3000:]
        rows = seen(user_dir)
        assert all(r["prompt"] == QUESTION for r in rows)  # messages, not text
        assert all(r["completion"] == [{"role": "assistant", "content": word}] for r in rows), rows
        # TRL's count of the tokens it saw: 4 x (the prompt as rendered here + the word + EOS)
        words = len(tok.encode(word, add_special_tokens=False)) + 1
        assert metrics(out)["num_tokens"] == 4 * (len(on if thinking else off) + words)


# ---- the default suite: wrappers, refusals and the reward scorers on conversations (no training) ----

def test_the_time_limited_tools_keep_their_schema_and_fail_as_trl_replies(user_dir):
    from transformers.utils import get_json_schema

    from aligntool import tools
    from aligntool.recipe.agent import AgentConfig
    from aligntool.trainers import grpo_tools

    calculator, boom, sleepy = tools.load_tools(AgentConfig(tools=["user_tools:calculator", "user_tools:boom",
                                                                   "user_tools:sleepy"]))
    counts = grpo_tools.ToolCounts()
    timed = [grpo_tools.timed_tool(fn, 0.2, counts) for fn in (calculator, boom, sleepy)]
    assert [get_json_schema(t) for t in timed] == [get_json_schema(f) for f in (calculator, boom, sleepy)]
    assert timed[0](expression="2+3") == "5"
    for tool, message in ((timed[1], "RuntimeError: the tool broke"), (timed[2], "sleepy did not return within 0.2 s")):
        with pytest.raises(Exception) as err:  # TRL catches it and replies str({"error": str(exc)})
            tool()
        assert str(err.value) == message
    assert (counts.errors, counts.timeouts) == (2, 1)
    env_cls = tools.load_environment(AgentConfig(environment="user_tools:Calc"))
    timed_cls = grpo_tools.timed_environment(env_cls, 0.2, counts)
    env, plain = timed_cls(), env_cls()
    assert timed_cls.__name__ == "Calc" and env.reset() == plain.reset()
    assert [get_json_schema(m) for m in tools.environment_methods(env)] == \
        [get_json_schema(m) for m in tools.environment_methods(plain)]
    assert env.calculator(expression="2+3") == "5" and env.get_reward() == 10.0
    with pytest.raises(Exception, match="ValueError: invalid literal"):  # the method runs through tools.call too
        env.calculator(expression="x+1")
    assert (counts.errors, counts.timeouts) == (3, 1)


def _refused(capsys, user_dir, template: str | None, *needles, agent="{tools: ['user_tools:calculator']}",
             data="qa.jsonl", algorithm="grpo", extra=""):
    from conftest import cli_error

    model = f"{{name_or_path: tiny, chat_template: {template}}}" if template else "{name_or_path: tiny}"
    recipe = user_dir / "refused.yaml"
    recipe.write_text(f"algorithm: {algorithm}\nmodel: {model}\ndataset: {{path: {data}}}\nagent: {agent}\n{extra}")
    cli_error(capsys, ["train", "--recipe", str(recipe), f"output_dir={user_dir / 'out'}"], *needles)


def test_templates_trl_cannot_run_tools_with_are_refused_in_one_line(capsys, user_dir, tiny_path):
    _refused(capsys, user_dir, None, "model.name_or_path: tiny (its chat template): has no tool-call syntax")
    odd = user_dir / "odd_qwen.jinja"  # Qwen2.5's tool syntax, but not a template TRL knows how to parse
    odd.write_text("{#- a local edit -#}\n" + QWEN25.read_text())
    _refused(capsys, user_dir, odd, f"model.chat_template: {odd}: TRL cannot parse tool calls")


def test_agent_settings_grpo_cannot_take_are_refused_in_one_line(capsys, user_dir, tiny_path):
    _refused(capsys, user_dir, QWEN25, "agent: TRL's tool episodes need conversational prompts", data="toy")
    _refused(capsys, user_dir, QWEN25, "agent.max_total_tokens: 300, but algo.max_completion_length is 100",
             agent="{tools: ['user_tools:calculator'], max_total_tokens: 300}",
             extra="algo: {max_completion_length: 100}")
    _refused(capsys, user_dir, QWEN25, "rloo", "use grpo, or reinforce_pp", algorithm="rloo")


def test_rewards_read_conversations_as_trl_passes_them(tmp_path, tiny_path):
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    from aligntool import rewards
    from aligntool.errors import UserError
    from aligntool.toy import world

    prompts = [QUESTION, QUESTION]
    episode = [{"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {
        "name": "calculator", "arguments": {"expression": "2+3"}}}]}, {"role": "tool", "name": "calculator",
        "content": "awful awful"}, {"role": "assistant", "content": "The answer is great."}]
    completions = [episode, [{"role": "assistant", "content": "terrible"}]]
    texts = ["The answer is great.", "terrible"]  # the last assistant message: what the gold reward reads
    assert rewards.gold(prompts, completions) == [world.gold_reward(t) for t in texts] == [1.0, -1.0]
    assert rewards.gold(["q", "q"], texts) == [world.gold_reward(t) for t in texts]  # strings: unchanged

    def nan(prompts, completions):
        return [float("nan")] * len(completions)

    with pytest.raises(UserError, match=r"\(prompt 'What is 2\+3\?'\): nan is not a finite number"):
        rewards.checked("nan", nan)(prompts, completions)
    # a reward model scores prompt + completion rendered by its own chat template, as TRL's GRPOTrainer does
    config = AutoConfig.from_pretrained(tiny_path, num_labels=1)
    tok = AutoTokenizer.from_pretrained(tiny_path)
    config.pad_token_id = tok.pad_token_id
    torch.manual_seed(0)
    rm = AutoModelForSequenceClassification.from_config(config).eval()
    rm.save_pretrained(tmp_path / "rm")
    tok.save_pretrained(tmp_path / "rm")
    scores = rewards.reward_model_scorer(str(tmp_path / "rm"), device="cpu", dtype="float32")(prompts, completions)
    expected = []
    for c in completions:
        text = tok.apply_chat_template(QUESTION + c, tokenize=False)
        with torch.no_grad():
            expected.append(rm(**tok(text, return_tensors="pt", add_special_tokens=False)).logits[0, 0].item())
    assert scores == pytest.approx(expected, abs=1e-5)
