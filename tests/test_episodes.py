"""Multi-turn tool episodes in the engine (aligntool/online/episodes.py): TRL's shipped templates parse back, the
template checks, the mask of inserted tokens (zero gradient, zero KL), the episode's log-probs against one forward of
the HF model, tool errors and time limits, the stops, the per-turn random streams, the FSDP turn sync, and the engine
methods end to end on a real model that calls a tool (tests/tool_episodes_model.py)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from aligntool.errors import UserError
from aligntool.recipe.agent import AgentConfig

TRL_TEMPLATES = Path(__import__("trl").__file__).parent / "chat_templates"
LLAMA_TOKENS = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|eom_id|>",
                "<|python_tag|>"]


def _tokenizer(tiny_path, template: str):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_path)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>", *LLAMA_TOKENS]})
    tok.add_tokens(["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"])
    tok.chat_template = (TRL_TEMPLATES / f"{template}.jinja").read_text(encoding="utf-8")
    tok.eos_token = "<|eot_id|>" if template.startswith("llama") else "<|im_end|>"
    tok.bos_token = "<|begin_of_text|>"
    return tok


def multiply(a: int, b: int) -> int:
    """Multiply two integers.

    Args:
        a: The first integer.
        b: The second integer.
    """
    return a * b


@pytest.mark.parametrize("template", ["qwen2_5", "qwen3", "llama3_1", "llama3_2"])
def test_a_tool_call_rendered_by_trls_templates_parses_back(tiny_path, template):
    """The assistant turn that TRL's offline copy of each family's template renders for a tool call is parsed back, by
    the parser the engine uses (TRL's parse_response with add_response_schema's template), to the same call."""
    from trl.chat_template_utils import parse_response

    from aligntool.tokens import check_tool_template, render_prompt

    tok = _tokenizer(tiny_path, template)
    kwargs = check_tool_template(tok)  # renders tool calls, has a parser; Qwen3: TRL's prefix-preserving copy
    assert ("chat_template" in kwargs) == (template == "qwen3")
    call = {"type": "function", "function": {"name": "multiply", "arguments": {"a": 3, "b": 14}}}
    messages = [{"role": "user", "content": "What is 3 times 14?"},
                {"role": "assistant", "content": "", "tool_calls": [call]}]
    prompt = render_prompt(tok, messages[:1], [multiply], kwargs)
    full = tok.apply_chat_template(messages, tools=[multiply], tokenize=False, **kwargs)
    assert full.startswith(prompt)
    turn = tok(full[len(prompt):], add_special_tokens=False)["input_ids"]
    parsed = parse_response(tok, turn, prefix=tok(prompt, add_special_tokens=False)["input_ids"], tools=[multiply])
    assert parsed["tool_calls"][0]["function"] == call["function"], (template, full[len(prompt):])


@pytest.mark.parametrize("template, needle", [
    ("tiny", "cannot render tool calls"),  # the tiny model's own template: no tool syntax
    ("llama3", "cannot render tool calls"),  # TRL's basic Llama 3 template reads content only
    ("chatml", "cannot render tool calls"),
])
def test_a_template_without_tool_calls_is_refused_in_one_line(tiny_path, template, needle):
    from transformers import AutoTokenizer

    from aligntool.tokens import TEMPLATES, check_tool_template

    tok = AutoTokenizer.from_pretrained(tiny_path)
    if template == "llama3":
        tok = _tokenizer(tiny_path, "llama3")
    elif template == "chatml":
        tok.chat_template = TEMPLATES["chatml"]
    with pytest.raises(UserError) as err:
        check_tool_template(tok)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_engine_refuses_the_tiny_models_template_before_training(capsys, tmp_path):
    """aligntool train with agent tools and a model whose template has no tool syntax: exit 2, one line."""
    import tool_episodes_model as M
    from conftest import cli_error

    M.write_modules(tmp_path)
    data = tmp_path / "q.jsonl"
    data.write_text(json.dumps({"prompt": M.conversation(2, 3), "answer": "5"}) + "\n")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"algorithm: reinforce_pp\nmodel: {{name_or_path: tiny}}\ndataset: {{path: {data}}}\n"
                      f"reward: {{function: ep_reward:reward}}\nagent: {{tools: ['ep_tools_ok:add']}}\n"
                      f"output_dir: {tmp_path / 'out'}\ntrain: {{max_steps: 1, per_device_train_batch_size: 1}}\n")
    cli_error(capsys, ["train", "--recipe", str(recipe)], "cannot render tool calls")


# ------------------------------------------------------------------------------------------ on a model that calls
@pytest.fixture(scope="module")
def tool_model(tmp_path_factory):
    import tool_episodes_model as M

    path = M.model_path()
    modules = tmp_path_factory.mktemp("tool_modules")
    M.write_modules(modules)
    sys.path.insert(0, str(modules))
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return path, AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def _tool(module: str):
    import importlib

    return importlib.import_module(module).add


def _episodes(tool_model, module="ep_tools_ok", seeds=(1, 2), **agent):
    import tool_episodes_model as M

    from aligntool.online.episodes import run_episodes

    _, lm, tok = tool_model
    convs = [M.conversation(*q) for q in M.QUESTIONS][: len(seeds)]
    return run_episodes(lm, tok, convs, [_tool(module)], AgentConfig(tools=[f"{module}:add"], **agent),
                        max_new_tokens=24, temperature=1.0, top_p=1.0, seeds=list(seeds))


def test_an_episode_calls_the_tool_and_masks_what_the_template_inserted(tool_model):
    """Two turns: the call, then the answer after the reply; the inserted tokens (mask 0) are exactly the template's
    rendering of the tool reply between the two assistant turns (rendered here independently, as text)."""
    _, _, tok = tool_model
    for e in _episodes(tool_model):
        assert (e.stop, e.turns, e.tool_calls, e.tool_errors, e.text) == ("answer", 2, 1, 0, "The answer is 5.")
        assert [m["role"] for m in e.completion_messages] == ["assistant", "tool", "assistant"]
        assert e.completion_messages[1]["content"] == "5"
        full = tok.apply_chat_template(e.messages, tools=[_tool("ep_tools_ok")], tokenize=False)
        first_end = full.index("<|im_end|>", full.index("<|im_start|>assistant\n<tool_call>")) + len("<|im_end|>")
        reply = full[first_end: full.index("The answer is")]
        inserted = [t for t, m in zip(e.completion_ids, e.completion_mask) if m == 0]
        assert tok.decode(inserted) == reply and "<tool_response>\n5\n</tool_response>" in reply
        holes = "".join(map(str, e.completion_mask))
        assert holes.strip("1").strip("0") == "" and holes.count("01") == 1  # 1..1 0..0 1..1


@pytest.mark.parametrize("module, needle", [("ep_tools_raise", "RuntimeError: calculator broken"),
                                            ("ep_tools_hang", "did not return within 0.5 s")])
def test_a_tool_that_raises_or_hangs_becomes_the_reply_counted(tool_model, module, needle):
    import threading

    for e in _episodes(tool_model, module=module, tool_timeout=0.5):
        assert e.tool_calls == 1 and e.tool_errors == 1 and e.turns >= 2, e
        assert needle in e.completion_messages[1]["content"]
    if module == "ep_tools_hang":  # the episodes went on while the hung call (30 s) is still running
        assert any(t.name == "tool-add" and t.is_alive() for t in threading.enumerate())


def test_an_environment_per_episode_reset_with_the_row_its_methods_as_tools_and_its_reward(tool_model):
    """TRL's environment contract: one instance per episode, reset(**row) with the row's columns (the prompt
    included), its observation appended to the last message's content, its methods the tools, get_reward() kept."""
    import importlib

    import tool_episodes_model as M

    from aligntool.online.episodes import run_episodes
    from aligntool.tokens import encode_prompts, render_prompt

    _, lm, tok = tool_model
    env = importlib.import_module("ep_env").Adder
    conv = [{"role": "user", "content": "What is 2 + "}]  # the observation (the row's "rest") completes it
    episodes = run_episodes(lm, tok, [conv, conv], None, AgentConfig(environment="ep_env:Adder"), max_new_tokens=24,
                            temperature=1.0, top_p=1.0, seeds=[1, 2], environment=env,
                            rows=[{"prompt": conv, "rest": "3?"}] * 2)
    assert M.conversation(2, 3)[0]["content"] == "What is 2 + 3?" and conv[0]["content"] == "What is 2 + "
    for e in episodes:
        assert e.messages[0]["content"] == "What is 2 + 3?"
        assert e.prompt_ids == encode_prompts(tok, [render_prompt(tok, e.messages[:1], [env().add])])[0]
        assert e.reward == 10.0 * e.tool_calls and e.tool_errors == 0
    assert sum(e.tool_calls for e in episodes) > 0  # the environment's method was called as a tool


def test_max_turns_and_max_total_tokens_stop_episodes(tool_model):
    one = _episodes(tool_model, max_turns=1)
    assert all(e.stop == "max_turns" and e.turns == 1 and e.tool_calls == 0 and 0 not in e.completion_mask
               for e in one)
    call = len(one[0].completion_ids)
    tight = _episodes(tool_model, max_total_tokens=call + 3)  # the call fits, its reply does not: not appended
    assert all(e.stop == "max_total_tokens" and len(e.completion_ids) == call and e.tool_calls == 1 for e in tight)
    cut = _episodes(tool_model, max_total_tokens=4)  # the first turn itself is cut
    assert all(e.stop == "max_total_tokens" and len(e.completion_ids) == 4 for e in cut)


def test_each_turn_samples_from_its_own_stream_and_a_row_alone_samples_alike(tool_model):
    """After an error reply the second turn is uncertain: it is the draw of the stream (seed, turn 1) from its
    context (generate_from_ids called here on it), not a replay of turn 0's stream, and the same alone or in a batch."""
    from aligntool.online.episodes import turn_seed
    from aligntool.sampling import generate_from_ids
    from aligntool.tokens import stop_ids

    _, lm, tok = tool_model
    seeds = tuple(range(11, 19))
    both = _episodes(tool_model, module="ep_tools_raise", seeds=seeds)
    alone = _episodes(tool_model, module="ep_tools_raise", seeds=(11,))
    assert alone[0].completion_ids == both[0].completion_ids
    restarted_differs = []
    for seed, e in zip(seeds, both):
        start = len(e.completion_mask) - e.completion_mask[::-1].index(0)  # after the inserted reply
        context = e.prompt_ids + e.completion_ids[:start]
        draw = lambda s: generate_from_ids(lm, [context], tok.pad_token_id, stop_ids(tok), 24,  # noqa: E731
                                           seeds=[s], greedy_rows=[False])[0]
        assert e.completion_ids[start:] == draw(turn_seed(seed, 1))
        restarted_differs.append(e.completion_ids[start:] != draw(seed))
    assert any(restarted_differs)  # a restarted stream would give these draws


def test_every_process_runs_as_many_generation_calls_when_another_is_still_active(tool_model):
    """FSDP's contract (play's ``sync``): while any process has an active row, a process whose rows are done still
    takes part in each turn's generation (a one-token call)."""
    import tool_episodes_model as M

    from aligntool.online.episodes import play
    from aligntool.sampling import generate_from_ids
    from aligntool.tokens import check_tool_template, stop_ids

    _, lm, tok = tool_model
    check_tool_template(tok)
    calls = []

    def generate(contexts, seeds, greedy_rows, max_new):
        calls.append(len(contexts))
        return generate_from_ids(lm, contexts, tok.pad_token_id, stop_ids(tok), max_new, seeds=seeds,
                                 greedy_rows=greedy_rows)

    turns = []
    episodes = play(generate, tok, [M.conversation(2, 3)], [_tool("ep_tools_ok")],
                    AgentConfig(tools=["ep_tools_ok:add"], max_turns=4), max_new_tokens=24, seeds=[1],
                    greedy_rows=[False], sync=lambda active: turns.append(active) or True)  # another still active
    assert episodes[0].turns == 2 and turns == [True, True, False, False] and len(calls) == 4


# ------------------------------------------------------------------------------------------------ in the engine
def _recipe(folder: Path, model: Path, algorithm: str) -> Path:
    import tool_episodes_model as M

    M.write_modules(folder)
    data = folder / "q.jsonl"
    data.write_text("".join(json.dumps({"prompt": M.conversation(a, b), "answer": str(a + b), "weight": w}) + "\n"
                            for (a, b), w in zip(M.QUESTIONS, (1.0, 3.0))))  # rewards that differ: advantages
    recipe = folder / "r.yaml"
    recipe.write_text(f"algorithm: {algorithm}\nmodel: {{name_or_path: {model}}}\ndataset: {{path: {data}}}\n"
                      f"reward: {{function: ep_reward:reward}}\nagent: {{tools: ['ep_tools_ok:add'], max_turns: 3}}\n"
                      f"output_dir: {folder / 'out'}\ntrain: {{max_steps: 1, per_device_train_batch_size: 2, "
                      f"logging_steps: 1, seed: 0, learning_rate: 1.0e-3}}\nalgo: {{max_new_tokens: 24}}\n")
    return recipe


def _engine(tmp_path, tool_model, algorithm, *overrides):
    import importlib

    from aligntool import data, models
    from aligntool.online.engine import Engine
    from aligntool.recipe.loader import load_recipe
    from aligntool.train import Run

    loaded = load_recipe(_recipe(tmp_path, tool_model[0], algorithm), list(overrides))
    run = Run(loaded, tmp_path / "out")
    run.model_path = str(tool_model[0])
    run.tokenizer = models.load_tokenizer(run.model_path)
    run.train_dataset, run.eval_dataset = data.load_for_recipe(loaded.recipe, loaded.spec.data, run.tokenizer,
                                                               keep_conversations=True)
    return Engine(run, importlib.import_module(loaded.spec.module).method(run))


def test_episode_log_probs_equal_one_forward_of_the_model_and_the_kl_is_zero_on_inserted_tokens(tmp_path,
                                                                                             tool_model):
    """The engine's log-probs of an episode (policy and reference) equal a forward of a separately loaded HF model
    over the whole token sequence, gathered at the generated positions; 0 at the inserted ones, so every KL estimate
    is 0 there."""
    from transformers import AutoModelForCausalLM

    from aligntool.losses.online import kl_estimate

    engine = _engine(tmp_path, tool_model, "reinforce_pp")
    ro = engine.sample_groups(engine.prompts, 1)
    logp, _ = engine.policy_logprobs(ro)
    logp_ref = engine.ref_logprobs(ro)
    hf = AutoModelForCausalLM.from_pretrained(tool_model[0]).eval()
    P = ro.prompt_width
    for i, e in enumerate(ro.episodes):
        assert e.tool_calls == 1 and 0 in e.completion_mask
        seq = e.prompt_ids + e.completion_ids
        with torch.no_grad():
            alone = torch.log_softmax(hf(torch.tensor([seq])).logits[0].float(), -1)
        n = len(e.prompt_ids)
        expected = [alone[n - 1 + j, t].item() if m else 0.0
                    for j, (t, m) in enumerate(zip(e.completion_ids, e.completion_mask))]
        for got in (logp, logp_ref):
            assert got[i, : len(expected)].tolist() == pytest.approx(expected, abs=2e-5)
        assert ro.mask[i, : len(e.completion_mask)].tolist() == e.completion_mask
        assert ro.input_ids[i, P: P + len(e.completion_ids)].tolist() == e.completion_ids
    holes = (ro.mask == 0) & ro.attention_mask[:, P:].bool()
    assert holes.any()
    with torch.no_grad():  # a policy that has moved: the KL is nonzero on generated tokens, zero on inserted ones
        for p in engine.policy_lm.parameters():
            p.add_(0.01 * torch.randn_like(p))
    moved, _ = engine.policy_logprobs(ro)
    for est in ("k1", "k2", "k3"):
        kl = kl_estimate(moved, logp_ref, est)
        assert (kl[holes] == 0).all() and kl[ro.mask.bool()].abs().sum() > 0, est


def _watch_gradients(engine, checked: list):
    """Every update's loss: the gradient w.r.t. the logits (and PPO's values) at inserted positions is exactly 0,
    somewhere nonzero at generated ones; then the engine's own optimizer step."""
    forwards, step = [], engine.optimizer_step
    lm = engine.policy_lm

    def keep(module, args, out):
        t = out if isinstance(out, torch.Tensor) else out.logits
        if t.requires_grad:
            t.retain_grad()
            forwards.append(t)

    hooks = [lm.lm_head.register_forward_hook(keep)]
    model = engine.accelerator.unwrap_model(engine.model)
    if model.value_head is not None:
        hooks.append(model.value_head.register_forward_hook(keep))
    logprobs = engine.policy_logprobs
    masks = []

    def policy_logprobs(ro, grad=False):
        if grad:
            masks.append((ro.mask.clone(), ro.prompt_width))
        return logprobs(ro, grad)

    def optimizer_step(loss):
        loss.backward(retain_graph=True)
        for t in forwards:
            mask, P = masks[-1]
            R = mask.shape[1]
            g = t.grad[:, :R] if t.shape[1] == R + 1 else t.grad[:, P - 1: P - 1 + R]  # logits kept | values
            assert (g[mask == 0] == 0).all() and g[mask == 1].abs().sum() > 0
            checked.append(tuple(t.shape))
        forwards.clear()
        engine.optimizer.zero_grad(set_to_none=True)
        return step(loss)

    engine.policy_logprobs, engine.optimizer_step = policy_logprobs, optimizer_step
    return hooks


@pytest.mark.parametrize("algorithm, overrides", [
    ("reinforce_pp", ["algo.kl_in=loss", "algo.kl_estimator=k3", "algo.num_minibatches=1"]),
    pytest.param("reinforce_pp", ["algo.num_minibatches=2", "algo.gamma=0.9"], marks=pytest.mark.system),
    pytest.param("remax", [], marks=pytest.mark.system),
    pytest.param("ppo", ["algo.ppo_epochs=1", "algo.gamma=0.9"], marks=pytest.mark.system),
    # P3O's gradient is (r1 - r2) grad(log pi(y1) - log pi(y2)): the two samples must differ; after an error reply
    # the second turn is uncertain on this model (train.seed 0 and 5 draw pairs of equal length: a gradient of 0
    # everywhere, rightly; seed 1 draws pairs that differ)
    pytest.param("p3o", ["algo.ppo_epochs=1", "agent.tools=[ep_tools_raise:add]", "reward.function=ep_reward:length",
                         "train.seed=1"],
                 marks=pytest.mark.system),
])
def test_engine_methods_train_on_tool_episodes_with_zero_gradient_on_inserted_tokens(tmp_path, tool_model, algorithm,
                                                                                    overrides):
    """One iteration of each engine method on tool episodes (Engine.train, the real update): the gradient of the
    method's loss w.r.t. the logits (PPO: and the values) predicting inserted tokens is exactly 0; the logged
    statistics carry the episodes' tool metrics (TRL's names where TRL has them)."""
    engine = _engine(tmp_path, tool_model, algorithm, *overrides)
    torch.manual_seed(0)
    with torch.no_grad():  # a policy away from its reference: the KL terms have a gradient too (ReMax's greedy
        for p in engine.policy_lm.parameters():  # baseline equals the sample on this model: only its KL term moves)
            p.add_(0.01 * torch.randn_like(p) * (algorithm != "p3o"))  # P3O: its pairs differ at the reference
        head = engine.accelerator.unwrap_model(engine.model).value_head
        if head is not None:  # PPO's head starts at 0: values that are no returns anywhere
            head.weight.normal_(0, 0.1)
            head.bias.fill_(0.5)
    checked = []
    hooks = _watch_gradients(engine, checked)
    try:
        engine.train()
    finally:
        for h in hooks:
            h.remove()
    assert checked
    row = json.loads((tmp_path / "out" / "metrics.jsonl").read_text().splitlines()[0])
    assert row["tools/call_frequency"] == 1.0 and row["tools/call_rate"] == 1.0
    if algorithm != "p3o":
        assert row["episodes/turns"] == 2.0 and row["tools/failure_frequency"] == 0.0
        assert row["reward"] == 2.0  # (1 + 3) / 2: both answered
    else:
        assert row["tools/failure_frequency"] == 1.0 and row["tools/errors"] == 1.0
    completions = [json.loads(x) for x in (tmp_path / "out" / "completions.jsonl").read_text().splitlines()]
    assert "<tool_response>" in completions[0]["completion"]


# ------------------------------------------------------------------------------- conversations reach the engine
def test_conversational_prompts_render_in_the_engine_as_before_and_with_chat_template_kwargs(tmp_path, tiny_path):
    """Without agent, the engine's prompt for a conversation is the text data.prompts_as_text gave before (the same
    runs sample the same prompts), the dataset's other columns keyed by it; with train.chat_template_kwargs the
    template gets them (Qwen3's enable_thinking: false writes the empty think block after the generation prompt)."""
    import datasets

    from aligntool import data, models
    from aligntool.data.formats import prompts_as_text
    from aligntool.online.engine import Engine
    from aligntool.online.reinforce_pp import method
    from aligntool.recipe.loader import load_recipe
    from aligntool.train import Run

    rows = [{"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"Say {w}."}],
             "answer": w} for w in ("yes", "no", "yes")]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    def engine(*overrides):
        loaded = load_recipe("reinforce_pp", [f"dataset.path={tmp_path / 'c.jsonl'}", f"output_dir={tmp_path / 'o'}",
                                              "train.max_steps=1", *overrides])
        run = Run(loaded, tmp_path / "o")
        run.model_path = str(tiny_path)
        run.tokenizer = models.load_tokenizer(run.model_path, chat_template=loaded.recipe.model.chat_template)
        run.train_dataset, run.eval_dataset = data.load_for_recipe(loaded.recipe, loaded.spec.data, run.tokenizer,
                                                                   keep_conversations=True)
        return Engine(run, method(run)), run.tokenizer

    plain, tok = engine()
    before = prompts_as_text(datasets.Dataset.from_list(rows), tok, "x")["prompt"]
    assert plain.prompts == list(dict.fromkeys(before)) and len(plain.prompts) == 2
    assert [plain.columns[p]["answer"] for p in plain.prompts] == ["yes", "no"]
    qwen3 = str(TRL_TEMPLATES / "qwen3.jinja")
    thinking, _ = engine(f"model.chat_template={qwen3}", "train.chat_template_kwargs={enable_thinking: false}")
    assert all(p.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n") for p in thinking.prompts)


def test_train_chat_template_kwargs_is_a_mapping_for_the_engine_methods_only(capsys):
    from conftest import cli_error

    from aligntool.recipe.loader import load_recipe

    loaded = load_recipe("ppo", ["train.chat_template_kwargs={enable_thinking: false}"])
    assert loaded.recipe.train.model_extra["chat_template_kwargs"] == {"enable_thinking": False}
    cli_error(capsys, ["train", "--recipe", "ppo", "train.chat_template_kwargs=3"], "train.chat_template_kwargs",
              "expected a mapping")
    cli_error(capsys, ["train", "--recipe", "online_dpo", "train.chat_template_kwargs={a: 1}"],
              "unknown key 'train.chat_template_kwargs'")


@pytest.mark.system
@pytest.mark.parametrize("algorithm", ["reinforce_pp"])
def test_aligntool_train_runs_tool_episodes_end_to_end(tmp_path, tool_model, algorithm):
    """`aligntool train` (a subprocess: the CLI's data loading keeps the conversations) for two iterations with an
    eval set: the logs carry the tool metrics, the evaluation scores whole episodes."""
    import subprocess

    recipe = _recipe(tmp_path, tool_model[0], algorithm)
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "aligntool.cli", "train", "--recipe", str(recipe),
                           "train.max_steps=2", "train.learning_rate=1.0e-6",
                           f"dataset.eval_path={tmp_path / 'q.jsonl'}", "train.eval_steps=1"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "tools/call_frequency" in r]
    evals = [r for r in rows if "eval_reward" in r]
    assert len(train) == 2 and all(r["tools/call_rate"] == 1.0 and r["episodes/turns"] == 2.0 for r in train)
    assert evals and evals[-1]["eval_reward"] == 2.0  # both held-out episodes answered (weights 1 and 3)


def test_returns_gae_and_remax_discount_step_from_generated_token_to_generated_token():
    """With inserted tokens (mask 0) inside a row, the recursions run over the generated tokens only: equal to the
    same function on the row with the inserted positions cut out (done here with lists), 0 at the inserted ones."""
    from aligntool.losses import online as L
    from aligntool.online.ops import on_generated

    torch.manual_seed(0)
    mask = torch.tensor([[1, 1, 0, 0, 1, 1, 0], [1, 0, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0, 0.]])
    rewards, values = torch.randn(3, 7), torch.randn(3, 7)
    logp, logp_ref, score, greedy = torch.randn(3, 7), torch.randn(3, 7), torch.randn(3), torch.randn(3)

    def by_hand(fn, *rows_args):
        out = torch.zeros(3, 7)
        for i in range(3):
            keep = [j for j in range(7) if mask[i, j]]
            cut = [a[i:i + 1, keep] if isinstance(a, torch.Tensor) and a.shape == mask.shape else
                   a[i:i + 1] if isinstance(a, torch.Tensor) else a for a in rows_args]
            out[i, keep] = fn(*cut)[0]
        return out

    gae = lambda r, v, m: L.gae(r, v, m, 0.9, 0.8)[0]  # noqa: E731
    cases = [(lambda r, m: L.discounted_returns(r, m, 0.9), (rewards, mask)), (gae, (rewards, values, mask)),
             (lambda a, b, m, s, g: L.remax_returns(a, b, m, s, g, 0.05, 0.9, None), (logp, logp_ref, mask, score,
                                                                                     greedy))]
    for fn, args in cases:
        got = on_generated(mask, fn, *args)
        assert torch.allclose(got, by_hand(fn, *args), atol=1e-6) and (got[mask == 0] == 0).all()
    adv, returns = on_generated(mask, L.gae, rewards, values, mask, 0.9, 0.8)
    assert torch.allclose(adv, by_hand(gae, rewards, values, mask), atol=1e-6)


@pytest.mark.system
@pytest.mark.parametrize("backend", [["distributed.backend=fsdp"],
                                     ["distributed.backend=deepspeed", "distributed.zero_stage=3"]],
                         ids=["fsdp2", "zero3"])
def test_fsdp_two_processes_with_different_turn_counts_stay_in_step(tmp_path, tool_model, backend):
    """FSDP2 / ZeRO-3, 2 processes: one process's row answers at once ("hi": 1 turn), the other's calls the tool (2
    turns). Under FSDP the first takes part in the second turn's forwards (``play``'s sync); under ZeRO-3 the weights
    are gathered once per episode batch and each process generates alone. Either way the run finishes instead of
    hanging in a collective."""
    import os
    import signal
    import subprocess

    recipe = _recipe(tmp_path, tool_model[0], "remax")
    (tmp_path / "q.jsonl").write_text(
        json.dumps({"prompt": [{"role": "user", "content": "What is 2 + 3?"}], "answer": "5"}) + "\n" +
        json.dumps({"prompt": [{"role": "user", "content": "hi"}], "answer": "5"}) + "\n")
    cmd = [sys.executable, "-m", "aligntool.cli", "train", "--recipe", str(recipe), "--nproc", "2",
           *backend, "train.max_steps=2", "train.per_device_train_batch_size=1",
           "train.learning_rate=1.0e-6"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _, err = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail("the two processes did not finish: a collective waits for a process that stopped generating")
    assert proc.returncode == 0, err[-3000:]
    rows = [json.loads(x) for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [r["episodes/turns"] for r in rows] == [1.5, 1.5]  # the mean of a 2-turn and a 1-turn process
