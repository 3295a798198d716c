"""Streaming SFT data and GSM8K's answer reaching reward functions (issue 28 item 1), end to end on the tiny model:
`dataset.streaming` trains SFT from a local file read as it is iterated (and is refused where it cannot work), and a
recipe with `dataset.format: gsm8k` hands each reward call the number after '####' of its prompts' rows."""

from __future__ import annotations

import importlib
import json
import re
import sys
from pathlib import Path

import pytest
from conftest import user_error

from aligntool import data
from aligntool.cli import main
from aligntool.recipe.loader import load_recipe

GSM8K = Path(__file__).parent / "data" / "gsm8k" / "test-200.jsonl"


def _rows(n: int) -> list[dict]:
    return [{"prompt": f"Q{i}: what is {i} plus one?", "completion": f" {i + 1}"} for i in range(n)]


@pytest.mark.slow
def test_sft_trains_from_a_streamed_file(tmp_path, tiny_path, capsys):
    f = tmp_path / "sft.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in _rows(40)))
    out = tmp_path / "run"
    assert main(["train", "--recipe", "sft", f"model.name_or_path={tiny_path}", f"dataset.path={f}",
                 "dataset.streaming=true", "train.max_steps=2", "train.per_device_train_batch_size=2",
                 "train.logging_steps=1", f"output_dir={out}"]) == 0
    err = capsys.readouterr().err
    assert "streamed (the first 40 rows checked" in err and "Training sft on streamed rows" in err
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in metrics if "loss" in m]
    assert [m["step"] for m in steps] == [1, 2]
    # each step read 2 rows from the stream: TRL counts the tokens it trained on (the rows' tokens, unpadded)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_path))
    first4 = sum(len(tok(r["prompt"] + r["completion"])["input_ids"]) for r in _rows(4))
    assert steps[-1]["num_tokens"] == pytest.approx(first4, abs=4 * 2)  # BOS/EOS per row at most


def test_streaming_reads_an_iterable_dataset_and_checks_its_first_rows(tmp_path):
    import datasets

    f = tmp_path / "sft.jsonl"
    rows = _rows(5) + [{"prompt": "Q5", "completion": None}]
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    loaded = load_recipe("sft", [f"dataset.path={f}", "dataset.streaming=true", "train.max_steps=2"])
    message = user_error(data.load_for_recipe, loaded.recipe, "language_modeling", log=lambda m: None)
    assert "(first 6 rows, streamed): row 6: column 'completion' is null" in message, message
    loaded = load_recipe("sft", [f"dataset.path={f}", "dataset.streaming=true", "train.max_steps=2",
                                 "dataset.drop_invalid_rows=true"])
    train, _ = data.load_for_recipe(loaded.recipe, "language_modeling", log=lambda m: None)
    assert isinstance(train, datasets.IterableDataset) and list(train) == _rows(5)


@pytest.mark.parametrize("overrides, message", [
    (["algorithm=dpo"], "dataset.streaming: applies to language-modeling data (sft); dpo trains on preference data"),
    (["train.max_steps=-1"], "dataset.streaming: set train.max_steps"),
    (["dataset.split=train[:10]"], "slices are not available with dataset.streaming"),
    (["train.learning_rate=auto"], "dataset.streaming: train.learning_rate: auto needs the training set's size"),
    (["dataset.split=test"], "dataset.split: 'test': no such split"),  # a file has one split, streamed or not
])
def test_streaming_refusals_at_load_time(tmp_path, overrides, message):
    f = tmp_path / "sft.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in _rows(4)))
    algorithm = next((o.split("=")[1] for o in overrides if o.startswith("algorithm=")), "sft")
    rest = [o for o in overrides if not o.startswith("algorithm=")]
    loaded = load_recipe(algorithm, [f"dataset.path={f}", "dataset.streaming=true", "train.max_steps=2", *rest])
    kind = "preference" if algorithm == "dpo" else "language_modeling"
    assert message in user_error(data.load_for_recipe, loaded.recipe, kind, log=lambda m: None)


@pytest.mark.parametrize("overrides, message", [
    (["dataset.eval_fraction=0.1"], "streaming: eval_fraction needs the whole training set"),
    (["dataset.mixture=[{path: a.jsonl}]", "dataset.path=toy"], "streaming: reads one source"),
])
def test_streaming_refusals_in_the_recipe(overrides, message):
    assert message in user_error(load_recipe, "sft", ["dataset.streaming=true", *overrides])


REWARD_MODULE = '''
CALLS = []


def record(prompts, completions, answer, solution, **kwargs):
    CALLS.append({"prompts": list(prompts), "answer": list(answer), "solution": list(solution)})
    return [0.0 for _ in completions]
'''


@pytest.mark.slow
@pytest.mark.parametrize("algorithm, settings", [
    ("grpo", "  num_generations: 2\n  max_completion_length: 3\n"),
    ("reinforce_pp", "  max_new_tokens: 3\n  num_minibatches: 1\n"),
])
def test_a_reward_function_receives_gsm8ks_final_answer(tmp_path, tiny_path, algorithm, settings):
    """One step on four GSM8K questions: every reward call gets, for each of its prompts, the number after '####' of
    that question's worked solution (parsed here with a regex of its own) and the solution."""
    (tmp_path / "gsm_reward_mod.py").write_text(REWARD_MODULE)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"algorithm: {algorithm}\nmodel: {{name_or_path: {tiny_path}}}\n"
                      f"dataset: {{path: {GSM8K}, format: gsm8k, split: 'train[:4]'}}\n"
                      "reward: {function: 'gsm_reward_mod:record'}\n"
                      "train: {max_steps: 1, per_device_train_batch_size: 4, logging_steps: 1, seed: 0}\n"
                      f"algo:\n{settings}")
    raw = [json.loads(line) for line in GSM8K.read_text().splitlines()[:4]]
    expected = {r["question"]: re.search(r"####\s*([-0-9.,]+)\s*$", r["answer"]).group(1).replace(",", "")
                for r in raw}
    solutions = {r["question"]: r["answer"] for r in raw}
    sys.modules.pop("gsm_reward_mod", None)
    try:
        assert main(["train", "--recipe", str(recipe), f"output_dir={tmp_path / 'run'}"]) == 0
        calls = importlib.import_module("gsm_reward_mod").CALLS
        assert calls
        seen = 0
        for call in calls:
            for prompt, answer, solution in zip(call["prompts"], call["answer"], call["solution"]):
                question = next(q for q in expected if prompt.startswith(q) or q in prompt)
                assert answer == expected[question] and solution == solutions[question]
                seen += 1
        assert seen >= 4
    finally:
        sys.modules.pop("gsm_reward_mod", None)


def test_suggest_refuses_a_streamed_dataset_in_one_line(tmp_path, capsys):
    """Step Law's suggestion counts the training set's tokens: a streamed set has no length (it crashed in len())."""
    f = tmp_path / "sft.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in _rows(8)))
    assert main(["suggest", "--recipe", "sft", f"dataset.path={f}", "dataset.streaming=true",
                 "train.max_steps=2"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and "dataset.streaming: aligntool suggest counts" in err
