"""Online RL on the rollout engine with the tiny model: PPO, P3O, ReMax; soups; reward ensembles; best-of-n."""

import json

import pytest
from conftest import RECIPES, SUMMARY_KEYS, train_two_processes

from aligntool.cli import main
from aligntool.recipe.loader import load_recipe
from aligntool.train import train

pytestmark = pytest.mark.slow

QUICK = ["train.max_steps=3", "train.per_device_train_batch_size=4", "train.logging_steps=1", "train.save_steps=2",
         "algo.max_new_tokens=16", "dataset.toy.size=32"]


@pytest.mark.parametrize("name", ["ppo", "p3o", "remax"])
def test_online_recipe_runs_logs_and_checkpoints(name, tmp_path, tiny_path):
    summary = train(load_recipe(RECIPES / f"{name}.yaml", [*QUICK, f"output_dir={tmp_path}"]))
    assert summary["global_step"] == 3 and SUMMARY_KEYS <= summary.keys() and summary["kind"] == "online"
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for key in ("reward", "kl", "entropy", "completions/mean_length"):
        assert all(isinstance(r[key], float) for r in rows), key
    assert (tmp_path / "checkpoints" / "checkpoint-2" / "COMPLETE").is_file()
    assert (tmp_path / "model.safetensors").is_file() and (tmp_path / "summary.json").is_file()
    if name == "ppo":
        assert (tmp_path / "checkpoints" / "checkpoint-2" / "value_head.safetensors").is_file()
        assert "clip_ratio/region_mean" in rows[-1] and "value_loss" in rows[-1]


@pytest.mark.parametrize("name,extra", [("remax", []), ("ppo", ["algo.critic=separate"])])
def test_online_resume_continues_from_the_checkpoint(name, extra, tmp_path, tiny_path):
    from safetensors.torch import load_file

    args = [*QUICK, *extra, f"output_dir={tmp_path}"]
    train(load_recipe(RECIPES / f"{name}.yaml", [*args, "train.max_steps=2"]))
    if name == "ppo":  # the separate critic is saved beside the policy and trained (no longer equal to it)
        critic = load_file(str(tmp_path / "checkpoints" / "checkpoint-2" / "value_head.safetensors"))
        policy = load_file(str(tmp_path / "checkpoints" / "checkpoint-2" / "model.safetensors"))
        key = "model.layers.0.mlp.down_proj.weight"
        assert f"critic_lm.{key}" in critic and not critic[f"critic_lm.{key}"].equal(policy[key])
    summary = train(load_recipe(RECIPES / f"{name}.yaml", [*args, "train.max_steps=4"]), resume=True,
                    accept_changes=True)
    assert summary["global_step"] == 4
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_ppo_with_a_soup_reference_and_soup_initialised_policy(tmp_path, tiny_path):
    summary = train(load_recipe(RECIPES / "ppo.yaml", [
        *QUICK, f"output_dir={tmp_path}", f"ref_model.soup=[{tiny_path}, {tiny_path}]",
        "ref_model.soup_weights=[0.3, 0.7]", "ref_model.policy_from_soup=true"]))
    assert summary["global_step"] == 3
    assert json.loads((tmp_path / "soup" / "soup.json").read_text())["weights"] == [0.3, 0.7]
    # a soup of one model with itself is that model: the first rollout's KL to it is ~0
    first = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert first["kl"] == pytest.approx(0.0, abs=1e-3)


def test_soup_command_averages_weights(tmp_path, tiny_path):
    import torch
    from safetensors.torch import load_file, save_file

    other = tmp_path / "other"
    import shutil

    shutil.copytree(tiny_path, other)
    base = load_file(str(tiny_path / "model.safetensors"))
    save_file({k: v * 3 for k, v in base.items()}, str(other / "model.safetensors"), metadata={"format": "pt"})
    assert main(["soup", str(tiny_path), str(other), "--out", str(tmp_path / "s"), "-w", "0.5", "-w", "0.5"]) == 0
    out = load_file(str(tmp_path / "s" / "model.safetensors"))
    key = next(iter(base))
    assert torch.allclose(out[key], 2 * base[key], atol=1e-6)
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(tmp_path / "s")


def test_reward_ensemble_with_uwo_drives_rso_scoring(tmp_path, tiny_path):
    """Two reward models (different seeds) as an ensemble: the aggregate must equal mean - lambda * var by hand."""
    from aligntool import rewards
    from aligntool.recipe.schema import RewardConfig

    members = []
    for seed in (0, 1):
        out = tmp_path / f"rm{seed}"
        train(load_recipe("reward", ["train.max_steps=2", "train.per_device_train_batch_size=4", "dataset.toy.size=16",
                                     "dataset.toy.eval_size=0", "train.eval_strategy=no", f"train.seed={seed}",
                                     f"output_dir={out}"]))
        members.append(str(out))
    prompts, texts = ["Review of the old hotel in paris:"] * 2, [" the hotel was great .", " the hotel was awful ."]
    single = [rewards.load(RewardConfig(source=m))(prompts, texts) for m in members]
    uwo = rewards.load(RewardConfig(ensemble=members, aggregate="uwo", uwo_lambda=0.5))(prompts, texts)
    for i in range(2):
        a, b = single[0][i], single[1][i]
        mean, var = (a + b) / 2, ((a - b) / 2) ** 2  # population variance of two values
        assert uwo[i] == pytest.approx(mean - 0.5 * var, abs=1e-5)
    wco = rewards.load(RewardConfig(ensemble=members, aggregate="wco"))(prompts, texts)
    assert wco == pytest.approx([min(single[0][i], single[1][i]) for i in range(2)], abs=1e-5)


def test_bon_command_json(capsys, tiny_path):
    assert main(["bon", "--n", "3", "--num-prompts", "4", "--json"]) == 0
    curve = json.loads(capsys.readouterr().out)["curve"]
    assert [r["n"] for r in curve] == [1, 2, 3]
    golds = [r["gold"] for r in curve]
    assert golds == sorted(golds)  # proxy = gold here: best-of-n can only go up with n


def test_p3o_with_two_processes(tmp_path, tiny_path):
    out = tmp_path / "ddp"
    summary, _ = train_two_processes("p3o", out, *QUICK)
    assert summary["global_step"] == 3
    assert (out / "checkpoints" / "checkpoint-2" / "COMPLETE").is_file()
