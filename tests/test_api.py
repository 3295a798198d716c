"""The Python API (aligntool/api.py) as a user calls it: docs/api_example.py -- the README's example, unchanged -- run
in a notebook-style script in a subprocess (its own working directory), and every claim it makes checked against the
files the runs wrote, read back here: the keyword and override values in recipe.yaml and summary.json, the models
loaded by transformers, the reward callable's own values as the logged reward, evaluate's and compress's results.
Then the parts that need no training, in this process: how callables are recorded, and the one-line errors."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import yaml
from conftest import REPO

from aligntool import api
from aligntool.errors import UserError

EXAMPLE = REPO / "docs" / "api_example.py"

# a user's notebook: the example, then what a user would try next -- resume the finished run with the same reward
# callable (nothing to train), and with another one (a changed recipe: refused)
NOTEBOOK = r'''
import dataclasses, json, runpy, sys
import aligntool
from aligntool.errors import UserError

g = runpy.run_path(sys.argv[1], run_name="__main__")
rl_args = dict(output_dir="runs/api-rl", train={"max_steps": 2, "per_device_train_batch_size": 8},
               algo={"max_new_tokens": 8})
again = aligntool.train("reinforce_pp", reward={"function": g["upbeat_and_short"]}, resume=True, **rl_args)


def another_reward(completions, **columns):
    return [0.0 for _ in completions]


try:
    aligntool.train("reinforce_pp", reward={"function": another_reward}, resume=True, **rl_args)
    changed = None
except UserError as exc:
    changed = str(exc)
out = {name: dataclasses.asdict(g[name]) for name in ("dpo", "sft", "rl", "small")}
out.update(seen=g["seen"], scores=g["scores"], error=g["error"], again=dataclasses.asdict(again), changed=changed,
           calls_after_resume=len(g["seen"]))
json.dump(out, open("report.json", "w"), default=str)
'''


def upbeat_and_short(completion: str) -> float:
    """The example's reward, written again here: the test's own value for each completion."""
    return float("great" in completion or "fantastic" in completion) - len(completion.split()) / 20


def _state(path):
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


@pytest.fixture(scope="module")
def notebook(tmp_path_factory, tiny_path):
    tmp = tmp_path_factory.mktemp("api")
    (tmp / "notebook.py").write_text(NOTEBOOK)
    env = {"OMP_NUM_THREADS": "1", **os.environ,  # one torch thread, as the suite's workers (conftest.py)
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "notebook.py", str(EXAMPLE)], cwd=tmp, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp, json.loads((tmp / "report.json").read_text()), proc.stdout


def test_train_by_name_merges_keywords_into_the_builtin_recipe(notebook, tiny_path):
    tmp, report, stdout = notebook
    out = tmp / "runs" / "api-dpo"
    dpo = report["dpo"]
    summary = json.loads((out / "summary.json").read_text())
    assert dpo["output_dir"] == dpo["model_path"] == "runs/api-dpo" and dpo["adapter"] is False
    assert dpo["summary"] == summary and dpo["metrics"] == summary["final_metrics"]
    assert summary["algorithm"] == "dpo" and summary["global_step"] == 5  # train={"max_steps": 5}, not dpo.yaml's 100
    recipe = yaml.safe_load((out / "recipe.yaml").read_text())
    # a keyword section merges key by key: the built-in recipe's other keys stay
    assert recipe["dataset"]["toy"]["size"] == 200 and recipe["dataset"]["path"] == "toy"
    assert recipe["train"]["per_device_train_batch_size"] == 8
    assert recipe["train"].get("learning_rate") == 5.0e-4 and recipe["train"]["max_length"] == 64  # dpo.yaml's
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)  # the folder the result names loads, and was trained
    trained, base = model.state_dict(), _state(tiny_path)
    assert trained.keys() >= base.keys()
    assert any(not trained[k].equal(base[k]) for k in base)
    assert f"DPO: runs/api-dpo final loss {round(summary['final_metrics']['train_loss'], 4)}" in stdout


def test_train_from_a_dict_with_overrides(notebook):
    tmp, report, _ = notebook
    out = tmp / "runs" / "api-sft"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["algorithm"] == "sft" and summary["global_step"] == 5  # overrides win over the dict's 50
    assert report["sft"]["summary"] == summary
    recipe = yaml.safe_load((out / "recipe.yaml").read_text())
    assert recipe["train"]["max_steps"] == 5 and recipe["dataset"]["toy"]["size"] == 200


def test_a_python_callable_is_the_reward(notebook):
    tmp, report, _ = notebook
    out = tmp / "runs" / "api-rl"
    seen = report["seen"]
    assert len(seen) == 16 and all(isinstance(c, str) for c in seen)  # 2 iterations x 8 prompts, nothing else
    # the logged reward of an iteration is the mean of the callable's values on that iteration's 8 completions
    logged = {row["step"]: row["reward"] for row in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
              if "reward" in row}
    logged[2] = json.loads((out / "summary.json").read_text())["final_metrics"]["reward"]  # the last iteration's
    assert 1 in logged
    for step, mean in logged.items():
        batch = seen[8 * (step - 1): 8 * step]
        assert mean == pytest.approx(sum(map(upbeat_and_short, batch)) / 8, abs=1e-5)
    recipe = yaml.safe_load((out / "recipe.yaml").read_text())
    assert recipe["reward"]["function"] == "<callable __main__:upbeat_and_short>"
    # resumed with the same callable: the finished run is returned, nothing trained (the callable not called again)
    assert report["again"]["summary"] == json.loads((out / "summary.json").read_text())
    assert report["calls_after_resume"] == 16
    # with another callable the recipe has changed, as a changed module:function has
    assert report["changed"].startswith("--resume: the recipe differs")
    assert "reward.function '<callable __main__:upbeat_and_short>' -> '<callable __main__:another_reward>'" in \
        report["changed"]


def test_evaluate_and_compress_results(notebook):
    tmp, report, stdout = notebook
    scores = report["scores"]
    assert scores["model"] == "runs/api-dpo" and scores["reference"] == "tiny"
    assert scores["num_prompts"] == 16 and scores["data"]["rows"] == 16
    assert 0 <= scores["win_rate"] <= 1 and math.isfinite(scores["gold_reward"])
    small = report["small"]
    out = tmp / "runs" / "api-dpo-3bit"
    assert small["report"] == json.loads((out / "compression_report.json").read_text())
    assert small["report"]["model"] == "runs/api-dpo" and small["report"]["method"] == "uniform"
    assert small["report"]["budget"]["bits"] == 3.0
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out)
    assert "keyword train=: unknown key 'train.max_stepz' (did you mean 'max_steps'?)" in report["error"]
    assert f"error: {report['error']}" in stdout


# ----------------------------------------------------------------------------------------- no training from here on


def top_level_reward(completions, **columns):
    return [0.0] * len(completions)


def test_callables_are_recorded_as_importable_names_or_tokens():
    from aligntool import rewards

    def local_reward(completions, **columns):
        return [1.0] * len(completions)

    loaded, _, tokens = api._load_train_recipe(
        "reinforce_pp", {"reward": {"functions": [top_level_reward, {"function": local_reward, "weight": 2.0},
                                                  {"function": lambda completions, **c: [0.0] * len(completions)}]}},
        [])
    specs = [t.function for t in loaded.recipe.reward.functions]
    assert specs[0] == "test_api:top_level_reward"  # importable: a name every process finds
    assert specs[1] == ("<callable test_api:test_callables_are_recorded_as_importable_names_or_tokens.<locals>."
                        "local_reward>")
    assert specs[2] == "<callable test_api:test_callables_are_recorded_as_importable_names_or_tokens.<locals>.<lambda>>"
    assert [t.weight for t in loaded.recipe.reward.functions] == [1.0, 2.0, 1.0]
    assert [key for key, _ in tokens] == ["reward.functions[1].function", "reward.functions[2].function"]
    assert rewards.function_scorer(specs[0]) is top_level_reward
    assert rewards.function_scorer(specs[1]) is local_reward
    terms = rewards.terms(loaded.recipe.reward)
    assert [name for name, _, _ in terms][1] == \
        "test_api:test_callables_are_recorded_as_importable_names_or_tokens.<locals>.local_reward"
    assert terms[1][1](["p"], ["a", "b c"]) == [1.0, 1.0]
    with pytest.raises(UserError, match=r"^reward.function: <callable __main__:gone> was a Python callable given to "
                                        r"aligntool.train in another process"):
        rewards.function_scorer("<callable __main__:gone>", "reward.function")


def test_a_reward_source_given_as_keyword_replaces_the_recipes():
    loaded, _, _ = api._load_train_recipe("grpo", {"reward": {"functions": [top_level_reward]}}, [])
    assert loaded.recipe.reward.function is None  # grpo.yaml's reward.function is replaced, not combined
    assert loaded.recipe.reward.functions[0].function == "test_api:top_level_reward"


@pytest.mark.parametrize("call,message", [
    (lambda: api.train({"algorithm": "dpo", "trian": {"max_steps": 1}}),
     "recipe dict: unknown key 'trian' (did you mean 'train'?)"),
    (lambda: api.train("dpo", overrides=["train.max_stepz=1"]),
     "override 'train.max_stepz=1': unknown key 'train.max_stepz' (did you mean 'max_steps'?)"),
    (lambda: api.train("dpo", overrides="train.max_steps=1"), "overrides: expected a list of KEY=VALUE strings"),
    (lambda: api.train("dpo", dataset={"path": top_level_reward}),
     "dataset.path: a Python callable (top_level_reward) is taken only as a reward function"),
    (lambda: api.train("reinforce_pp", reward={"function": lambda completions: [0.0] * len(completions)}, nproc=2),
     "processes nproc=2 starts; define it in a module they can import"),
    (lambda: api.train("dpo", resume=True, overwrite=True), "--resume and --overwrite: choose one"),
    (lambda: api.train(42), "recipe: expected a recipe file, a built-in name, a dict or a loaded recipe, got int"),
    (lambda: api.compress("compress_quant", compress={"bitz": 3}), "keyword compress=: unknown key 'compress.bitz'"),
    (lambda: api.evaluate("tiny", task="review"), "--task: expected one of"),
])
def test_mistakes_raise_one_line_user_errors(call, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError) as info:
        call()
    assert message in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "runs").exists()  # refused before anything is written


def test_the_api_names_stay_functions_and_import_nothing_heavy():
    """``aligntool.train`` / ``compress`` are also modules of the package; importing them must not replace the API's
    functions on the package, and reaching the API must not import torch (``aligntool --help`` stays instant)."""
    code = ("import sys, importlib, aligntool\n"
            "f = aligntool.train, aligntool.evaluate, aligntool.compress\n"
            "heavy = [m for m in ('torch', 'transformers', 'trl') if m in sys.modules]\n"
            "importlib.import_module('aligntool.train'); importlib.import_module('aligntool.compress.recipe')\n"
            "import aligntool.api as api\n"
            "print(heavy, aligntool.train is api.train, aligntool.compress is api.compress,\n"
            "      callable(aligntool.train))\n")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.stdout.split() == ["[]", "True", "True", "True"], proc.stderr[-2000:]


def test_no_result_for_a_folder_without_a_loadable_model(tmp_path, tiny_path):
    """A result is only made for a model that loads: a summary.json beside half a model is an error, as in
    `aligntool train`."""
    import shutil

    out = tmp_path / "run"
    shutil.copytree(tiny_path, out)
    (out / "summary.json").write_text(json.dumps({"final_metrics": {"loss": 1.0}, "global_step": 1}))
    assert api._train_result(out).metrics == {"loss": 1.0}
    weights = out / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # cut, as by a full disk
    with pytest.raises(UserError, match=r"^output_dir: .*run: the run finished but its model is not loadable"):
        api._train_result(out)


TWO_PROCESSES = r'''
import json, os
import aligntool
from myrewards import length  # a module the ranks import too (it is in the working directory)

r = aligntool.train("reinforce_pp", reward={"function": length}, nproc=2, output_dir="runs/rpp2",
                    train={"max_steps": 2, "per_device_train_batch_size": 4, "logging_steps": 1},
                    algo={"max_new_tokens": 8}, dataset={"toy": {"size": 16}})
json.dump(r.summary, open("summary.json", "w"))
'''

REWARD_MODULE = r'''
import json, os


def length(completions, **columns):
    with open(f"seen-{os.environ.get('RANK', 'none')}.jsonl", "a") as f:
        f.write(json.dumps(completions) + "\n")
    return [len(c) / 10 for c in completions]
'''


@pytest.mark.system
def test_two_processes_take_an_importable_reward_callable(tmp_path, tiny_path):
    """nproc=2: torchrun's ranks get the recipe with the callable as 'module:function' (it imports back to itself),
    each calls it on its own completions, and the logged reward is the mean over both ranks' values."""
    (tmp_path / "script.py").write_text(TWO_PROCESSES)
    (tmp_path / "myrewards.py").write_text(REWARD_MODULE)
    env = {"OMP_NUM_THREADS": "1", **os.environ,
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "script.py"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["global_step"] == 2
    out = tmp_path / "runs" / "rpp2"
    assert yaml.safe_load((out / "recipe.yaml").read_text())["reward"]["function"] == "myrewards:length"
    batches = {rank: [json.loads(line) for line in (tmp_path / f"seen-{rank}.jsonl").read_text().splitlines()]
               for rank in (0, 1)}
    assert [len(b) for b in batches.values()] == [2, 2]  # one call per iteration on each rank
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    first = batches[0][0] + batches[1][0]
    assert len(first) == 8
    assert logged[0]["step"] == 1 and logged[0]["reward"] == pytest.approx(sum(len(c) / 10 for c in first) / 8,
                                                                           abs=1e-5)


def test_the_readme_shows_the_example_as_it_is():
    """The README's Python API example is docs/api_example.py's code (after its docstring), character for character:
    what the test above runs is what the README shows."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    if "docs/api_example.py" not in readme:
        pytest.skip("the README has no Python API section yet")
    code = EXAMPLE.read_text(encoding="utf-8").split('"""', 2)[2].strip()
    assert f"```python\n{code}\n```" in readme, "README.md's example differs from docs/api_example.py"
