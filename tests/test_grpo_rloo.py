"""GRPO and RLOO through TRL's trainers: 2-step runs through the CLI on the tiny model with the arithmetic reward,
reward functions (weights, dataset columns, failures), loss types and the generation section reaching TRL's config."""

import json
import math

import pytest
import torch
from conftest import RECIPES, user_error

from aligntool.cli import main
from aligntool.recipe.loader import load_recipe
from aligntool.toy import arith

QUICK = ["model.name_or_path=tiny", "train.max_steps=2", "train.per_device_train_batch_size=8", "train.logging_steps=1",
         "train.save_steps=100", "algo.num_generations=4", "algo.max_completion_length=4", "dataset.toy.size=16"]

REWARDS = '''\
import json
from aligntool.toy import arith

def words(prompts, completions):
    return [float(len(c.split())) for c in completions]

def with_answer(prompts, completions, answer, **kwargs):
    with open("seen.jsonl", "a") as fh:
        for p, a in zip(prompts, answer):
            fh.write(json.dumps([p, a]) + "\\n")
    return [1.0 if c.split()[:1] == [str(a)] else 0.0 for c, a in zip(completions, answer)]

def raises(prompts, completions):
    raise RuntimeError("boom")

def short(prompts, completions):
    return [0.0] * (len(completions) - 1)

def nan_at_3(prompts, completions):
    return [float("nan") if i == 3 else 0.0 for i in range(len(completions))]
'''


@pytest.fixture
def reward_module(tmp_path, monkeypatch):
    """rw.py in the working directory (searched for module:function after the recipe's folder)."""
    (tmp_path / "rw.py").write_text(REWARDS)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def cli(capsys, name, out, *overrides) -> tuple[int, str]:
    code = main(["train", "--recipe", str(RECIPES / f"{name}.yaml"), *QUICK, *overrides,
                 f"output_dir={out}"])
    return code, capsys.readouterr().err.strip()


def trl_args(out):
    return torch.load(out / "training_args.bin", weights_only=False)


def metrics(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("loss_type", ["dapo", "dr_grpo"])
def test_grpo_runs_with_the_loss_type_in_trls_config(capsys, tmp_path, tiny_path, loss_type):
    code, err = cli(capsys, "grpo", tmp_path, f"algo.loss_type={loss_type}", "algo.scale_rewards=none")
    assert code == 0, err[-2000:]
    args = trl_args(tmp_path)
    assert type(args).__name__ == "GRPOConfig" and args.loss_type == loss_type and args.scale_rewards == "none"
    assert (args.num_generations, args.max_completion_length, args.reward_weights) == (4, 4, [1.0])
    rows = metrics(tmp_path)
    assert [r["step"] for r in rows if "loss" in r] == [1, 2]
    assert all(0.0 <= r["rewards/aligntool.toy.arith:reward/mean"] <= 1.0 for r in rows if "loss" in r)
    assert json.loads((tmp_path / "summary.json").read_text())["global_step"] == 2


def test_rloo_runs_with_its_keys_in_trls_config(capsys, tmp_path, tiny_path):
    code, err = cli(capsys, "rloo", tmp_path, "algo.beta=0.1", "algo.normalize_advantages=true",
                    "algo.reward_clip_range=[-1, 1]")
    assert code == 0, err[-2000:]
    args = trl_args(tmp_path)
    assert type(args).__name__ == "RLOOConfig" and (args.beta, args.normalize_advantages) == (0.1, True)
    assert tuple(args.reward_clip_range) == (-1.0, 1.0) and args.num_generations == 4
    rows = [r for r in metrics(tmp_path) if "loss" in r]
    assert len(rows) == 2 and all(isinstance(r["kl"], float) for r in rows)


def test_weighted_rewards_and_a_dataset_column_reach_the_functions(capsys, tmp_path, tiny_path, reward_module):
    questions = arith.prompts("train", 16)
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps({"prompt": q, "answer": arith.answer(q)}) + "\n" for q in questions))
    out = tmp_path / "run"
    code, err = cli(capsys, "grpo", out, f"dataset.path={data}", "reward.function=null",
                    "reward.functions=[{function: 'rw:with_answer', weight: 1.0}, {function: 'rw:words', weight: 0.5}]")
    assert code == 0, err[-2000:]
    assert trl_args(out).reward_weights == [1.0, 0.5]
    for r in (r for r in metrics(out) if "loss" in r):  # TRL's reward = the weighted sum of the terms' means
        assert r["reward"] == pytest.approx(r["rewards/rw:with_answer/mean"] + 0.5 * r["rewards/rw:words/mean"],
                                            abs=1e-4)
    seen = [json.loads(line) for line in (tmp_path / "seen.jsonl").read_text().splitlines()]
    assert len(seen) == 2 * 8  # 2 steps x 8 completions, each with its own row's column value
    assert all(arith.answer(p) == a for p, a in seen)


@pytest.mark.parametrize("fn,needle", [
    ("raises", "reward rw:raises: raised RuntimeError: boom (a batch of 8 completions; first prompt 'Q: "),
    ("short", "reward rw:short: returned 7 values for 8 completions, expected one number each"),
    ("nan_at_3", "reward rw:nan_at_3: "),
])
def test_a_failing_reward_function_stops_the_run_in_one_line(capsys, tmp_path, tiny_path, reward_module, fn, needle):
    code, err = cli(capsys, "grpo", tmp_path / "run", f"reward.function=rw:{fn}")
    assert code == 2 and "Traceback" not in err, err[-2000:]
    # the error line (the Trainer's progress bar, left open by the exception, is printed before and after it)
    errors = [line[line.index("aligntool: error: "):] for line in err.splitlines() if "aligntool: error: " in line]
    assert len(errors) == 1 and needle in errors[0], err[-2000:]
    last = errors[0]
    assert last.endswith("at step 1; last checkpoint kept: none"), last
    if fn == "nan_at_3":  # the row: its index in the batch and its prompt
        assert " 3 " in last and "(prompt 'Q: " in last and "nan is not a finite number" in last, last


def test_unknown_loss_type_lists_trls(capsys, tmp_path):
    from aligntool.trainers.base.trl_lists import grpo_loss_types as trl_loss_types

    types = trl_loss_types()
    # read from TRL's help text: the eight of TRL 1.16 at least, and no stray quoted word
    assert {"grpo", "dr_grpo", "dapo", "bnpo", "cispo", "sapo", "luspo", "vespo"} <= set(types)
    assert "sequence" not in types and "token" not in types
    message = user_error(load_recipe, RECIPES / "grpo.yaml", ["algo.loss_type=grpoo"])
    assert "algo.loss_type" in message and "'grpoo' is not one of TRL's: " + ", ".join(types) in message
    code, err = cli(capsys, "grpo", tmp_path, "algo.loss_type=nope")
    assert code == 2 and err.splitlines()[-1].startswith("aligntool: error: ") and ", ".join(types) in err


@pytest.mark.parametrize("name", ["grpo", "rloo"])
def test_generation_vllm_maps_to_trls_fields(tmp_path, name):
    from aligntool.train import Run

    module = __import__(f"aligntool.trainers.{name}", fromlist=["args"])
    loaded = load_recipe(RECIPES / f"{name}.yaml", [
        "generation.backend=vllm", "generation.vllm_mode=server", "generation.server_base_url=http://10.0.0.5:8000",
        "generation.gpu_memory_utilization=0.5", "generation.max_model_length=64"])
    args = module.args(Run(loaded, tmp_path))
    assert args.use_vllm is True and args.vllm_mode == "server"
    assert args.vllm_server_base_url == "http://10.0.0.5:8000"
    assert (args.vllm_gpu_memory_utilization, args.vllm_max_model_length) == (0.5, 64)
    plain = module.args(Run(load_recipe(RECIPES / f"{name}.yaml"), tmp_path))
    assert plain.use_vllm is False
    # TRL's own field for what `generation` sets is refused, naming the key to use
    clash = load_recipe(RECIPES / f"{name}.yaml", ["train.use_vllm=true"])
    message = user_error(module.args, Run(clash, tmp_path))
    assert "train.use_vllm: set generation.backend instead" in message


@pytest.mark.parametrize("name,cls", [("grpo", "GRPOConfig"), ("rloo", "RLOOConfig")])
def test_algo_keys_are_trls_with_trls_defaults(name, cls):
    import dataclasses

    import trl

    from aligntool.registry import ALGORITHMS

    fields = {f.name: f for f in dataclasses.fields(getattr(trl, cls))}
    algo = ALGORITHMS[name].load().AlgoConfig()
    for key in algo.trl_fields:
        assert key in fields, key
        assert algo.model_fields[key].description, key
        default = fields[key].default
        if default is dataclasses.MISSING:
            default = fields[key].default_factory()
        value = getattr(algo, key)
        assert value == default or (isinstance(value, float) and math.isclose(value, default)), (key, value, default)


def test_grpo_on_tiny_arith_has_a_learning_signal(tmp_path, tiny_arith_path):
    """On tiny-arith the groups disagree (some answers right, some wrong): rewards above 0, advantages, gradients,
    and the weights move (on `tiny` every reward is 0 and GRPO has nothing to learn)."""
    from safetensors.torch import load_file

    out = tmp_path / "g"
    assert main(["train", "--recipe", "grpo", "train.max_steps=2", "train.logging_steps=1", "train.save_steps=100",
                 f"output_dir={out}"]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"reward"' in line]
    assert len(rows) == 2 and all(r["reward"] > 0 for r in rows), rows
    assert all(r["frac_reward_zero_std"] < 1 and r["grad_norm"] > 0 for r in rows), rows
    before = load_file(str(tiny_arith_path / "model.safetensors"))
    after = load_file(str(out / "model.safetensors"))
    assert any(not before[k].equal(after[k]) for k in before)


def test_settings_trl_would_misread_are_refused_or_passed_on(tmp_path, recipe_file, capsys):
    from aligntool.train import Run
    from aligntool.trainers import grpo

    # the recipe's remote-code and revision settings reach TRL, which loads the reference itself when beta > 0
    loaded = load_recipe("grpo", ["model.trust_remote_code=true", "model.revision=abc123", "algo.beta=0.1"])
    config = grpo.args(Run(loaded, tmp_path))
    assert config.trust_remote_code is True and config.model_init_kwargs == {"revision": "abc123"}
    for override, message in [
        ("train.max_length=64", "train.max_length: does not apply to grpo, which limits the completions with "
                                "algo.max_completion_length"),
        ("ref_model.dtype=bfloat16", "ref_model: grpo uses the initial policy as its reference"),
        ("train.learning_rate=auto", "train.learning_rate: auto: grpo trains on rows it generates during the run"),
    ]:
        code = main(["train", "--recipe", "grpo", "model.name_or_path=tiny", override,
                     f"output_dir={tmp_path / 'x'}", "--overwrite"])
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert code == 2 and message in err, (override, err)
