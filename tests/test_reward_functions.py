"""Rewards as code (``reward.function`` / ``reward.functions``): the weighted sum, TRL's calling convention (dataset
columns as keyword lists, passed only to functions that take them), the one-line errors that name the function and
the first bad row, and a run that keeps its last checkpoint when a function fails mid-way."""

import json
import math

import numpy as np
import pytest
from conftest import RECIPES

from aligntool import rewards
from aligntool.cli import main
from aligntool.errors import UserError
from aligntool.recipe.schema import RewardConfig

PROMPTS = ["Q: 1+2= A:", "Q: 10+5= A:", "Q: 7+7= A:"]
COMPLETIONS = [" 3", " 16", " 14 great"]


def test_one_function_is_the_reward():
    score = rewards.load(RewardConfig(function="aligntool.toy.arith:reward"))
    assert score(PROMPTS, COMPLETIONS) == [1.0, 0.0, 1.0]


def test_weighted_terms_sum_functions_and_the_gold_reward():
    from aligntool.toy import world

    cfg = RewardConfig(functions=[{"function": "aligntool.toy.arith:reward", "weight": 2.0},
                                  {"source": "gold", "weight": -0.5}])
    expected = np.array([2.0, 0.0, 2.0]) - 0.5 * np.array([world.gold_reward(c) for c in COMPLETIONS])
    assert rewards.load(cfg)(PROMPTS, COMPLETIONS) == pytest.approx(expected.tolist(), abs=1e-12)
    names = [name for name, _, _ in rewards.terms(cfg)]
    assert names == ["aligntool.toy.arith:reward", "gold"]


def test_columns_reach_only_the_functions_that_take_them():
    seen = {}

    def plain(prompts, completions):
        return [0.0] * len(completions)

    def named(prompts, completions, answer):
        seen["answer"] = answer
        return [float(a) for a in answer]

    def catch_all(prompts, completions, **kwargs):
        seen["kwargs"] = sorted(kwargs)
        return [1.0] * len(completions)

    cols = {"answer": [3, 15, 14], "source": ["a", "b", "c"]}
    assert rewards.checked("plain", plain)(PROMPTS, COMPLETIONS, **cols) == [0.0, 0.0, 0.0]
    assert rewards.checked("named", named)(PROMPTS, COMPLETIONS, **cols) == [3.0, 15.0, 14.0]
    assert seen["answer"] == [3, 15, 14]
    assert rewards.checked("all", catch_all)(PROMPTS, COMPLETIONS, **cols) == [1.0, 1.0, 1.0]
    assert seen["kwargs"] == ["answer", "source"]


@pytest.mark.parametrize("fn,expected", [
    (lambda p, c: [1.0, 2.0], "reward m:f: returned 2 values for 3 completions"),
    (lambda p, c: [1.0, math.nan, 0.0],
     "reward m:f: completion 1 of 3 in the batch (prompt 'Q: 10+5= A:'): nan is not a finite number"),
    (lambda p, c: [1.0, 2.0, "x"], "reward m:f: completion 2 of 3 in the batch (prompt 'Q: 7+7= A:'): 'x' is not a "
     "finite number"),
    (lambda p, c: [1.0, 10**400, None], "reward m:f: completion 1 of 3 in the batch (prompt 'Q: 10+5= A:'): 1000"),
    (lambda p, c: 1 / 0, "reward m:f: raised ZeroDivisionError: division by zero (a batch of 3 completions"),
    (lambda p, c: 3.0, "reward m:f: returned float, expected a list of 3 numbers"),
])
def test_bad_outputs_name_the_function_and_the_first_bad_row(fn, expected):
    with pytest.raises(UserError) as err:
        rewards.checked("m:f", fn)(PROMPTS, COMPLETIONS)
    assert str(err.value).startswith(expected) and "\n" not in str(err.value)


def test_trl_style_functions_are_called_by_keyword():
    """TRL's documented example takes only the completions (by keyword); None means "does not apply" for TRL."""

    def reward_len(completions, **kwargs):
        return [-abs(20 - len(c)) for c in completions]

    def only_answer(completions, answer, **kwargs):
        return [None if a is None else float(c.strip() == str(a)) for c, a in zip(completions, answer)]

    assert rewards.checked("len", reward_len)(PROMPTS, COMPLETIONS) == [-18.0, -17.0, -11.0]
    assert rewards.checked("ans", only_answer, allow_none=True)(PROMPTS, COMPLETIONS, answer=[3, None, 14]) == [
        1.0, None, 0.0]
    with pytest.raises(UserError, match="completion 1 of 3 in the batch"):
        rewards.checked("ans", only_answer)(PROMPTS, COMPLETIONS, answer=[3, None, 14])
    with pytest.raises(UserError, match=r"reward bad: its signature cannot take \(prompts, completions"):
        rewards.checked("bad", lambda a, b, c: [0.0])


def test_numpy_scalars_and_bools_are_numbers():
    assert rewards.checked("np", lambda p, c: [np.float32(0.5), True, np.int64(2)])(PROMPTS, COMPLETIONS) == [
        0.5, 1.0, 2.0]


@pytest.mark.parametrize("section,message", [
    ({"function": "aligntool.toy.arith:reward", "source": "runs/rm"},
     "set one of source, ensemble, function or functions, not source and function"),
    ({"function": "no_colon"}, "function 'no_colon': expected 'module:function'"),
    ({"functions": [{"function": "a:b", "source": "gold"}]}, "sets exactly one of function or source"),
    ({"functions": []}, "at least 1 item"),
])
def test_reward_section_errors(section, message, recipe_file, capsys):
    import yaml

    path = recipe_file(yaml.safe_dump({"algorithm": "remax", "reward": section}))
    assert main(["train", "--recipe", str(path)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


def test_a_function_that_cannot_be_imported_is_named(recipe_file, capsys, tmp_path):
    path = recipe_file("algorithm: remax\nreward: {function: 'no_such_module_x:score'}\n"
                       f"output_dir: {tmp_path / 'out'}\ntrain: {{max_steps: 1}}\n")
    assert main(["train", "--recipe", str(path)]) == 2
    err = capsys.readouterr().err
    assert "reward.function: cannot import 'no_such_module_x:score'" in err and err.count("\n") == 1, err


QUICK = ["train.per_device_train_batch_size=4", "train.logging_steps=1", "algo.max_new_tokens=8",
         "dataset.toy.size=16"]

MODULE = '''
CALLS = []


def length_reward(completions, prompts, answer, **columns):
    """Rewards short answers; records what it was given (the dataset's answer column, by prompt)."""
    CALLS.append({"n": len(completions), "columns": sorted(columns),
                  "answers_match": all(a == "A-" + p[-12:] for p, a in zip(prompts, answer))})
    return [-len(c) / 10 for c in completions]


def flaky(prompts, completions):
    """Fine for the first four calls (two ReMax iterations: sample and greedy), then one bad row."""
    CALLS.append(len(completions))
    if len(CALLS) > 4:
        return [0.0] * (len(completions) - 1) + [float("inf")]
    return [0.0] * len(completions)
'''


@pytest.mark.slow
def test_remax_with_weighted_functions_and_a_failure_that_keeps_the_last_checkpoint(tmp_path, tiny_path, capsys):
    """ReMax on a user's module beside the recipe (weighted with the gold reward): trains; then a function that
    returns inf in iteration 3 stops the run with exit 2, one line naming it and the row, and the checkpoint of
    iteration 2 kept and resumable."""
    import importlib
    import sys

    (tmp_path / "my_rewards_mod.py").write_text(MODULE)
    recipe = tmp_path / "remax.yaml"
    recipe.write_text((RECIPES / "remax.yaml").read_text().replace(
        "  source: gold                # or a reward-model folder, ensemble: [...] with aggregate, or module:function",
        "  functions: [{function: 'my_rewards_mod:length_reward', weight: 1.0}, {source: gold, weight: 0.5}]"))
    try:
        from aligntool.toy import world

        data = tmp_path / "prompts.jsonl"  # a user's prompts with an extra column the reward function reads
        data.write_text("".join(json.dumps({"prompt": p, "answer": "A-" + p[-12:]}) + "\n"
                                for p in world.prompts("train", 16, seed=3)))
        out = tmp_path / "ok"
        assert main(["train", "--recipe", str(recipe), *QUICK, "train.max_steps=2", f"dataset.path={data}",
                     f"output_dir={out}"]) == 0
        mod = importlib.import_module("my_rewards_mod")
        assert [c["n"] for c in mod.CALLS] == [4, 4, 4, 4]  # sample + greedy per iteration, 4 prompts each
        assert all(c["answers_match"] and c["columns"] == [] for c in mod.CALLS)
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert len(rows) == 2 and all(math.isfinite(r["reward"]) for r in rows)

        mod.CALLS.clear()
        recipe.write_text(recipe.read_text().replace(
            "functions: [{function: 'my_rewards_mod:length_reward', weight: 1.0}, {source: gold, weight: 0.5}]",
            "function: 'my_rewards_mod:flaky'"))
        bad = tmp_path / "bad"
        assert main(["train", "--recipe", str(recipe), *QUICK, "train.max_steps=4", "train.save_steps=2",
                     f"output_dir={bad}"]) == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith("aligntool: error: reward my_rewards_mod:flaky: completion 3 of 4 in the batch (prompt ")
        assert "inf is not a finite number at iteration 3; last checkpoint kept: " in err
        assert err.endswith("checkpoint-2"), err
        assert (bad / "checkpoints" / "checkpoint-2" / "COMPLETE").is_file()
    finally:
        sys.modules.pop("my_rewards_mod", None)
