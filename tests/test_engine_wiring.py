"""The online engine's own steps, each on a stand-in ``self`` (a namespace with only what the step reads) or on the
tiny model, against values worked out here by hand: the score's missing-EOS penalty, group sampling's row order, the
global means and token denominators of data parallelism, the optimizer step (gradient clipping to max_grad_norm, the
gradient zeroed between updates), the prompt draw (per iteration, disjoint per process), the optimizer and LR
schedule the set-up builds from train.*, the adaptive KL controller's clip, and the online checkpoints
(save_total_limit, the RNG state restored)."""

from __future__ import annotations

import math
import random
from types import SimpleNamespace

import pytest
import torch

from aligntool.online.engine import Engine
from aligntool.online.rollout import Rollout, RolloutSteps


def _rollout(prompts, texts, missing_eos):
    n = len(prompts)
    ids = torch.zeros(n, 3, dtype=torch.long)
    return Rollout(prompts, texts, ids, torch.ones_like(ids), 1, torch.ones(n, 2), torch.tensor(missing_eos))


# ------------------------------------------------------------------------------------------------ rollout steps
@pytest.mark.parametrize("penalty", [None, 0.0, 1.5])
def test_score_subtracts_the_missing_eos_penalty_from_cut_off_responses(penalty):
    stub = SimpleNamespace(columns=None, cfg=SimpleNamespace(missing_eos_penalty=penalty),
                           scorer=lambda prompts, texts: [float(len(t)) for t in texts])
    ro = _rollout(["p", "p", "q"], ["ab", "abcd", "x"], [False, True, True])
    score = RolloutSteps.score(stub, ro).tolist()
    p = penalty or 0.0
    assert score == pytest.approx([2.0, 4.0 - p, 1.0 - p])


def test_sample_groups_puts_a_prompts_n_samples_on_consecutive_rows():
    seen = {}

    def samples(prompts, kinds, from_reference=False):
        seen["prompts"], seen["kinds"] = list(prompts), list(kinds)
        return ["rollout"]

    stub = SimpleNamespace(samples=samples)
    assert RolloutSteps.sample_groups(stub, ["a", "b", "c"], 2) == "rollout"
    assert seen == {"prompts": ["a", "a", "b", "b", "c", "c"], "kinds": ["sample"]}


# -------------------------------------------------------------------------------------------------- collectives
def test_token_denominator_is_the_global_token_count_over_the_processes():
    from aligntool.losses.online import token_denominator

    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])  # 3 tokens here
    assert token_denominator(mask).item() == 3.0
    # two processes, the other one holding 5 tokens: N = 8, each process divides by N / W = 4
    other = lambda t: t + 5  # noqa: E731  (all_sum of this process's count and the other's)
    assert token_denominator(mask, other, 2).item() == 4.0
    assert token_denominator(torch.zeros(2, 3)).item() == 1.0  # never 0


def test_global_mean_is_the_plain_mean_in_one_process():
    stub = SimpleNamespace(world=1, all_sum=lambda t: t)
    t = torch.tensor([1.0, 2.0, 6.0, 7.0])
    assert Engine.global_mean(stub, t) == pytest.approx(4.0)
    # two processes: the mean over both processes' rows (the other holds [10, 20])
    stub2 = SimpleNamespace(world=2, all_sum=lambda s: s + torch.tensor([30.0, 2.0]))
    assert Engine.global_mean(stub2, t) == pytest.approx((16 + 30) / 6)


# ------------------------------------------------------------------------------------------------ optimizer step
def _step_stub(max_grad_norm):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, -2.0, 0.5]]))
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    accel = SimpleNamespace(backward=lambda loss: loss.backward(),
                            clip_grad_norm_=lambda params, norm: torch.nn.utils.clip_grad_norm_(params, norm))
    return SimpleNamespace(model=model, optimizer=opt, scheduler=torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0),
                           accelerator=accel, args=SimpleNamespace(max_grad_norm=max_grad_norm), updates=0)


def test_optimizer_step_clips_to_max_grad_norm_and_zeroes_the_gradient_between_updates():
    stub = _step_stub(max_grad_norm=0.5)
    x = torch.tensor([[3.0, 4.0, 0.0]])
    # loss = w . x: gradient x, norm 5 -> clipped to norm 0.5: the SGD step (lr 1) moves w by -0.1 x
    norm = Engine.optimizer_step(stub, stub.model(x).sum())
    assert norm == pytest.approx(5.0)
    assert stub.model.weight.detach().tolist()[0] == pytest.approx([1.0 - 0.3, -2.0 - 0.4, 0.5])
    # a second update with gradient (0, 0, 0.2) (norm 0.2, under the clip): only its own gradient moves w
    y = torch.tensor([[0.0, 0.0, 0.2]])
    norm = Engine.optimizer_step(stub, stub.model(y).sum())
    assert norm == pytest.approx(0.2)
    assert stub.model.weight.detach().tolist()[0] == pytest.approx([0.7, -2.4, 0.3])
    assert stub.updates == 2
    with pytest.raises(FloatingPointError):
        Engine.optimizer_step(stub, torch.tensor(float("nan"), requires_grad=True))


# --------------------------------------------------------------------------------------------------- prompt draw
def _draw(iteration, rank, world, batch, seed=3, prompts=tuple(f"p{i}" for i in range(10))):
    stub = SimpleNamespace(args=SimpleNamespace(seed=seed), state={"iteration": iteration}, batch_size=batch,
                           world=world, rank=rank, prompts=list(prompts))
    return Engine.batch_prompts(stub)


def test_the_prompt_draw_changes_per_iteration_and_splits_disjointly_over_processes():
    one = _draw(4, 0, 1, 6)
    assert len(one) == len(set(one)) == 6  # without replacement
    # two processes with batch 3 share the prompts one process with batch 6 draws, each its own half
    halves = [_draw(4, r, 2, 3) for r in (0, 1)]
    assert halves[0] + halves[1] == one
    # each iteration draws anew (a few iterations: not all the same batch), and the same iteration draws alike
    assert len({tuple(_draw(it, 0, 1, 6)) for it in range(5)}) > 1
    assert _draw(4, 0, 1, 6) == one
    # the batch is the start of a shuffle of the prompt list (the list cycled when shorter)
    assert set(one) <= {f"p{i}" for i in range(10)}
    big = _draw(2, 0, 1, 15)
    assert sorted(big[:10]) == sorted(f"p{i}" for i in range(10)) and len(big) == 15


# ------------------------------------------------------------------------------ adaptive KL controller (Ziegler)
# target 6: KL 60 -> e = 9 clipped to 0.2; 6.6 -> 0.1; 3 -> -0.5 clipped to -0.2; 0 -> -1 clipped to -0.2
@pytest.mark.parametrize("kl,error", [(60.0, 0.2), (6.6, 0.1), (3.0, -0.2), (0.0, -0.2)])
def test_adaptive_kl_clips_the_proportional_error_both_ways(kl, error):
    from aligntool.losses.online import AdaptiveKL

    # Ziegler et al. 2019 / trlx AdaptiveKLController: e = clip(KL / target - 1, -0.2, 0.2); beta *= 1 + e n / H
    c = AdaptiveKL(0.1, 6.0, 100)
    assert c.update(kl, 4) == pytest.approx(0.1 * (1 + error * 4 / 100), rel=1e-12)
    assert AdaptiveKL(0.1, None, 100).update(kl, 4) == 0.1  # no target: a fixed coefficient


# ---------------------------------------------------------------------------- the set-up and checkpoints on tiny
def test_the_engine_optimizer_and_schedule_follow_train_settings(tmp_path, tiny_path):
    from test_online_wiring import make_engine

    engine = make_engine(tmp_path, "ppo", "train.max_steps=5", "train.warmup_steps=2", "train.weight_decay=0.03",
                         "train.lr_scheduler_type=linear", "train.learning_rate=1e-3")
    assert {g["weight_decay"] for g in engine.optimizer.param_groups} == {0.03}
    S = 5 * engine.cfg.ppo_epochs * engine.cfg.num_minibatches  # optimizer steps: iterations x PPO's per iteration
    assert S > 5
    lrs = []
    for _ in range(S + 1):
        lrs.append(engine.optimizer.param_groups[0]["lr"])
        engine.optimizer.step()
        engine.scheduler.step()
    # transformers' linear schedule: k / W during warm-up (W = 2), then (S - k) / (S - W)
    expected = [1e-3 * (k / 2 if k < 2 else max(0.0, (S - k) / (S - 2))) for k in range(S + 1)]
    assert lrs == pytest.approx(expected, abs=1e-12)


def test_online_checkpoints_keep_save_total_limit_and_restore_the_rng(tmp_path, tiny_path):
    from test_online_wiring import make_engine

    from aligntool.outputs import complete_checkpoints

    engine = make_engine(tmp_path, "ppo", "train.save_total_limit=2")
    for it in (1, 2, 3):
        engine.state["iteration"] = it
        last = engine.save_checkpoint()
    assert [p.name for p in complete_checkpoints(engine._checkpoint_dir())] == ["checkpoint-3", "checkpoint-2"]
    expected_torch = torch.rand(4)  # what the RNG gives right after the save
    expected_py = random.random()
    torch.manual_seed(12345)
    random.seed(12345)
    engine.state["iteration"] = 99
    engine.load_checkpoint(last)
    assert engine.state["iteration"] == 3
    assert torch.equal(torch.rand(4), expected_torch)
    assert math.isclose(random.random(), expected_py)
