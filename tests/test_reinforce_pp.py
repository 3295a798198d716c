"""REINFORCE++ (Hu 2025; OpenRLHF's ``reinforce`` / ``reinforce_baseline``): the advantages against a NumPy
re-statement of OpenRLHF's code (compute_approx_kl, compute_reward, get_cumulative_returns, the reward shaping and the
normalisation of compute_advantages_and_returns, the PolicyLoss), the global normalisation across 2 gloo processes,
and the method end to end through the CLI on the tiny model (3 iterations, a resumed run, the baseline variant)."""

import json
import shutil

import numpy as np
import pytest
import torch
from conftest import RECIPES, user_error

from aligntool.cli import main
from aligntool.losses import online as L
from aligntool.recipe.loader import load_recipe

RECIPE = RECIPES / "reinforce_pp.yaml"


# --------------------------------------------------------- OpenRLHF's code, re-stated in NumPy (one row at a time)
def np_approx_kl(logp, logp_ref, estimator):
    log_ratio = logp - logp_ref
    if estimator == "k2":
        log_ratio = log_ratio**2 / 2.0
    elif estimator == "k3":
        log_ratio = np.exp(-log_ratio) - 1 + log_ratio
    return np.clip(log_ratio, -10, 10)


def np_compute_reward(r, kl_coef, kl, action_mask, clip_range):
    kl_coef = max(kl_coef, 0.0)
    r = np.clip(r, clip_range[0], clip_range[1])
    reward = -kl_coef * kl
    for i in range(kl.shape[0]):  # the commented loop of OpenRLHF's compute_reward
        for t in reversed(range(kl.shape[1])):
            if action_mask[i][t] > 0.5:
                reward[i][t] += r[i]
                break
    return reward


def np_cumulative_returns(rewards, action_mask, gamma):
    rewards = action_mask * rewards
    returns = np.zeros_like(rewards)
    running = np.zeros(rewards.shape[0])
    for t in reversed(range(rewards.shape[1])):
        running = rewards[:, t] + gamma * running
        returns[:, t] = running
    return returns


def np_normalize(advantages, masks, std=True):
    """Over all experiences' tokens (the driver holds the whole batch)."""
    a, m = np.concatenate([x.ravel() for x in advantages]), np.concatenate([x.ravel() for x in masks])
    n = m.sum()
    mean = (a * m).sum() / n
    rstd = 1 / np.sqrt(max(((a - mean) ** 2 * m).sum() / n, 1e-8)) if std else 1
    return [(x - mean) * rstd for x in advantages]


def np_advantages(score, logp, logp_ref, mask, n, estimator, kl_coef, gamma, kl_estimator="k1", std=True):
    rewards = score.reshape(-1, n)
    if estimator == "reinforce_baseline":
        rewards = rewards - rewards.mean(-1, keepdims=True)
    rewards = rewards.reshape(-1)
    kl = np_approx_kl(logp, logp_ref, kl_estimator)
    token = np_compute_reward(rewards, kl_coef, kl, mask, (-10, 10))
    returns = np_cumulative_returns(token, mask, gamma)
    return np_normalize([returns], [mask], std)[0] * mask


def batch(seed, rows=6, width=5):
    g = np.random.default_rng(seed)
    mask = np.zeros((rows, width))
    for i, length in enumerate(g.integers(1, width + 1, rows)):
        mask[i, :length] = 1
    logp, logp_ref = -g.random((rows, width)) * 3 * mask, -g.random((rows, width)) * 3 * mask
    score = g.normal(0, 4, rows)
    score[0] = 25.0  # clipped to 10
    return score, logp, logp_ref, mask


def ours(score, logp, logp_ref, mask, n, baseline, kl_coef, gamma, kl_estimator="k1", std=True, all_sum=None):
    t = lambda x: torch.tensor(x, dtype=torch.float64)  # noqa: E731
    s = L.group_baseline(t(score), n) if baseline else t(score)
    kl = L.kl_estimate(t(logp), t(logp_ref), kl_estimator)
    rewards = L.reinforce_pp_token_rewards(s, kl, t(mask), kl_coef, 10.0)
    return L.global_normalize(L.discounted_returns(rewards, t(mask), gamma), t(mask), all_sum, std).numpy()


# ---------------------------------------------------------------------------------------------- formula vectors
def test_token_rewards_and_returns_by_hand():
    # two responses, lengths 3 and 2; score on the last real token, -beta * k1 on every token; gamma 0.5
    score, mask = torch.tensor([2.0, -1.0]), torch.tensor([[1.0, 1, 1], [1, 1, 0]])
    kl = torch.tensor([[0.2, -0.4, 1.0], [0.5, 0.5, 9.0]])
    r = L.reinforce_pp_token_rewards(score, kl, mask, kl_coef=0.1, reward_clip=10.0)
    assert r.tolist() == [pytest.approx([-0.02, 0.04, 2 - 0.1]), pytest.approx([-0.05, -1 - 0.05, 0.0])]
    g = L.discounted_returns(r, mask, gamma=0.5)
    assert g[0].tolist() == pytest.approx([-0.02 + 0.5 * (0.04 + 0.5 * 1.9), 0.04 + 0.5 * 1.9, 1.9])
    assert g[1].tolist() == pytest.approx([-0.05 + 0.5 * -1.05, -1.05, 0.0])


def test_kl_estimators_against_openrlhf():
    _, logp, logp_ref, _ = batch(0)
    logp[0, 0], logp_ref[0, 0] = -30.0, 0.0  # k3 = e^30 - 31: clamped to 10; k1 = -30: clamped to -10
    for est in ("k1", "k2", "k3"):
        got = L.kl_estimate(torch.tensor(logp), torch.tensor(logp_ref), est).numpy()
        np.testing.assert_allclose(got, np_approx_kl(logp, logp_ref, est), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("n,baseline,gamma,kl_estimator,std", [
    (1, False, 1.0, "k1", True), (2, False, 0.9, "k1", True), (3, True, 1.0, "k1", True),
    (2, True, 1.0, "k3", False)])
def test_advantages_match_openrlhf(n, baseline, gamma, kl_estimator, std):
    score, logp, logp_ref, mask = batch(n + 10 * baseline)
    want = np_advantages(score, logp, logp_ref, mask, n, "reinforce_baseline" if baseline else "reinforce", 0.05,
                         gamma, kl_estimator, std)
    got = ours(score, logp, logp_ref, mask, n, baseline, 0.05, gamma, kl_estimator, std)
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9)
    if std:  # zero mean, unit (population) variance over the masked tokens
        assert (got * mask).sum() / mask.sum() == pytest.approx(0, abs=1e-9)
        assert (got**2 * mask).sum() / mask.sum() == pytest.approx(1, abs=1e-6)


def test_group_baseline_by_hand():
    got = L.group_baseline(torch.tensor([1.0, 3.0, 0.0, 4.0, 8.0, 0.0]), 3)
    assert got.tolist() == pytest.approx([1 - 4 / 3, 3 - 4 / 3, -4 / 3, 0.0, 4.0, -4.0])


def test_policy_loss_matches_openrlhf():
    g = np.random.default_rng(3)
    logp, old, adv = g.normal(0, 0.3, (4, 5)), g.normal(0, 0.3, (4, 5)), g.normal(0, 1, (4, 5))
    mask = (g.random((4, 5)) > 0.3).astype(float)
    ratio = np.exp(np.clip(logp - old, -20, 20))
    per_token = -np.minimum(ratio * adv, np.clip(ratio, 0.8, 1.2) * adv)
    want = (per_token * mask).sum() / mask.sum()  # token_level_loss: masked mean
    t = torch.tensor
    got, _ = L.ppo_policy_loss(t(logp), t(old), t(adv), t(mask), 0.2)
    assert got.item() == pytest.approx(want, rel=1e-9)


def _normalize_worker(rank, port, rows, out):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)

    def all_sum(t):
        t = t.detach().clone()
        dist.all_reduce(t)
        return t

    score, logp, logp_ref, mask = (x[rows[rank]] for x in batch(7, rows=8))
    np.save(out / f"rank{rank}.npy", ours(score, logp, logp_ref, mask, 2, True, 0.05, 1.0, all_sum=all_sum))
    dist.destroy_process_group()


def test_global_normalisation_over_two_processes(tmp_path):
    """Two gloo processes each holding half of the batch normalise with the whole batch's mean and std."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    rows = [slice(0, 4), slice(4, 8)]  # whole prompt groups of 2 on each process
    mp.spawn(_normalize_worker, args=(port, rows, tmp_path), nprocs=2, join=True)
    score, logp, logp_ref, mask = batch(7, rows=8)
    want = np_advantages(score, logp, logp_ref, mask, 2, "reinforce_baseline", 0.05, 1.0)
    got = np.concatenate([np.load(tmp_path / f"rank{r}.npy") for r in (0, 1)])
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9)
    local = ours(score[:4], logp[:4], logp_ref[:4], mask[:4], 2, True, 0.05, 1.0)
    assert not np.allclose(local, want[:4])  # per-process statistics would differ


# --------------------------------------------------------------------------------------------------- end to end
QUICK = ["train.per_device_train_batch_size=4", "train.logging_steps=1", "train.save_steps=2",
         "algo.max_new_tokens=12", "dataset.toy.size=32"]


def rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_cli_runs_checkpoints_and_resumes_to_the_same_iteration(tmp_path, tiny_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--recipe", str(RECIPE), *QUICK, "train.max_steps=3", f"output_dir={out}"]) == 0
    first = rows(out)
    assert [r["step"] for r in first] == [1, 2, 3]
    for key in ("reward", "kl", "policy_loss", "clip_ratio/region_mean", "advantage_abs"):
        assert all(np.isfinite(r[key]) for r in first), key
    assert (out / "checkpoints" / "checkpoint-2" / "COMPLETE").is_file() and (out / "model.safetensors").is_file()
    # a second run from the iteration-2 checkpoint alone redoes iteration 3 exactly as the uninterrupted run did
    again = tmp_path / "again"
    shutil.copytree(out / "checkpoints" / "checkpoint-2", again / "checkpoints" / "checkpoint-2")
    assert main(["train", "--recipe", str(RECIPE), *QUICK, "train.max_steps=3", f"output_dir={again}",
                 "--resume"]) == 0
    (resumed,) = rows(again)
    assert resumed["step"] == 3
    for key in ("reward", "kl", "policy_loss", "completions/mean_length"):
        assert resumed[key] == pytest.approx(first[2][key], abs=1e-5), key


def test_baseline_variant_with_kl_loss_and_minibatches(tmp_path, tiny_path):
    out = tmp_path / "baseline"
    assert main(["train", "--recipe", str(RECIPE), *QUICK, "train.max_steps=2", "algo.baseline=group",
                 "algo.samples_per_prompt=4", "train.per_device_train_batch_size=2", "algo.kl_in=loss",
                 "algo.kl_estimator=k2", "algo.num_minibatches=2", "algo.ppo_epochs=2", f"output_dir={out}"]) == 0
    last = rows(out)[-1]
    assert last["step"] == 2 and np.isfinite(last["kl_loss"]) and last["kl_loss"] >= 0  # k2 >= 0
    assert "group_reward_std" in last


def test_bad_settings_are_one_line_errors(tmp_path):
    msg = user_error(load_recipe, RECIPE, ["algo.baseline=group"])
    assert "samples_per_prompt" in msg
    msg = user_error(load_recipe, RECIPE, ["algo.baseline=group", "algo.samples_per_prompt=2", "algo.gamma=0.9"])
    assert "gamma" in msg


def test_minibatches_that_do_not_divide_the_rows_are_a_user_error(tmp_path, tiny_path, capsys):
    code = main(["train", "--recipe", str(RECIPE), *QUICK, "train.max_steps=1", "algo.num_minibatches=3",
                 f"output_dir={tmp_path / 'x'}"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and "algo.num_minibatches" in err, err
