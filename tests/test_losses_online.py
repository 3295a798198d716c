"""Independent test vectors (plain math, by hand, from the papers and the authors' code) for the online RL family."""

import math

import pytest
import torch

from aligntool.losses import online as L

T = lambda *v: torch.tensor(v, dtype=torch.float64)  # noqa: E731


def test_gae_by_hand_with_masking():
    # one 3-token response and one 2-token response (last position masked)
    rewards = T([0.0, 0.0, 1.0], [0.0, 2.0, 9.0])
    values = T([0.5, 0.4, 0.3], [1.0, 0.5, 7.0])
    mask = T([1, 1, 1], [1, 1, 0])
    adv, ret = L.gae(rewards, values, mask, gamma=0.9, lam=0.8)
    # row 0: d2 = 1 - 0.3 = 0.7; d1 = 0 + 0.9*0.3 - 0.4 = -0.13; d0 = 0.9*0.4 - 0.5 = -0.14
    a2 = 0.7
    a1 = -0.13 + 0.72 * a2
    a0 = -0.14 + 0.72 * a1
    # row 1: d1 = 2 - 0.5 = 1.5 (no value after the last real token); d0 = 0.9*0.5 - 1.0 = -0.55
    b1, b0 = 1.5, -0.55 + 0.72 * 1.5
    assert adv.tolist() == [pytest.approx([a0, a1, a2]), pytest.approx([b0, b1, 0.0])]
    assert ret[0].tolist() == pytest.approx([a0 + 0.5, a1 + 0.4, a2 + 0.3])
    assert ret[1, 2].item() == 0.0


def test_gae_lambda_one_gamma_one_is_reward_to_go_minus_value():
    rewards, values, mask = T([1.0, 2.0, 3.0]), T([0.5, 0.5, 0.5]), T([1, 1, 1])
    adv, _ = L.gae(rewards, values, mask, 1.0, 1.0)
    assert adv.tolist() == [pytest.approx([6 - 0.5, 5 - 0.5, 3 - 0.5])]


def test_ppo_policy_loss_clips_by_hand():
    logp, old = T([math.log(1.5), math.log(0.5), 0.0]), T([0.0, 0.0, 0.0])
    adv, mask = T([1.0, -1.0, 2.0]), T([1, 1, 0])
    loss, clipfrac = L.ppo_policy_loss(logp, old, adv, mask, clip=0.2)
    # token 0: min(1.5, 1.2) = 1.2; token 1: min(-0.5, -0.8) = -0.8; token 2 masked
    assert loss.item() == pytest.approx(-(1.2 - 0.8) / 2)
    assert clipfrac.item() == pytest.approx(1.0)


def test_ppo_value_loss_by_hand():
    values, old, ret, mask = T([1.0, 0.0]), T([0.5, 0.1]), T([2.0, 0.0]), T([1, 1])
    loss, _ = L.ppo_value_loss(values, old, ret, mask, clip=0.2)
    # token 0: max((1-2)^2, (0.7-2)^2) = 1.69; token 1: max(0, (0.0-0)^2)=0 (clip range [-0.1, 0.3] holds 0)
    assert loss.item() == pytest.approx(0.5 * (1.69 + 0.0) / 2)


def test_adaptive_kl_controller():
    ctl = L.AdaptiveKL(0.1, target=6.0, horizon=10000)
    assert ctl.update(12.0, 100) == pytest.approx(0.1 * (1 + 0.2 * 100 / 10000))  # error clipped at +0.2
    ctl2 = L.AdaptiveKL(0.1, target=6.0, horizon=10000)
    assert ctl2.update(5.4, 100) == pytest.approx(0.1 * (1 - 0.1 * 0.01))
    assert L.AdaptiveKL(0.1, None, 1).update(100.0, 1) == 0.1  # fixed coefficient


def test_kl_penalised_rewards_put_the_score_on_the_last_token():
    r = L.kl_penalised_rewards(T(2.0, 1.0), T([-1.0, -1.0, -1.0], [-1.0, -2.0, 0.0]),
                               T([-1.5, -1.0, -0.5], [-1.0, -1.0, 0.0]), T([1, 1, 1], [1, 1, 0]), kl_coef=0.1)
    assert r[0].tolist() == pytest.approx([-0.05, 0.0, 0.05 + 2.0])
    assert r[1].tolist() == pytest.approx([0.0, 0.1 + 1.0, 0.0])


def test_p3o_vectors():
    lr1, lr2, r1, r2 = T(0.3), T(-0.1), T(1.0), T(0.2)
    assert L.p3o_loss(lr1, lr2, r1, r2, 0.2, "separate").item() == pytest.approx(-0.1180650, abs=1e-7)
    assert L.p3o_loss(lr1, lr2, r1, r2, 0.2, "joint").item() == pytest.approx(-0.48)
    # at theta = theta_old both variants have the pairwise policy gradient (r1 - r2)/2 * grad(logp1 - logp2)
    for variant in ("separate", "joint"):
        a, b = torch.zeros((), requires_grad=True), torch.zeros((), requires_grad=True)
        L.p3o_loss(a, b, r1, r2, 0.2, variant).backward()
        assert (a.grad.item(), b.grad.item()) == pytest.approx((-0.4, 0.4))
    # shifting both rewards by the same delta(x) changes nothing
    assert L.p3o_loss(lr1, lr2, r1 + 7, r2 + 7, 0.2, "separate").item() == pytest.approx(-0.1180650, abs=1e-7)


@pytest.mark.parametrize("variant", ["separate", "joint"])
def test_p3o_is_finite_with_whole_sequence_ratios_past_the_float32_range(variant):
    """A sequence log-ratio of 200 (exp overflows float32 past ~88) with a negative advantage: the unclamped ratio
    made the loss inf and its gradient NaN."""
    for lr1, lr2 in ((200.0, 0.0), (0.0, 200.0), (-200.0, 150.0)):
        a = torch.tensor(lr1, requires_grad=True)
        b = torch.tensor(lr2, requires_grad=True)
        loss = L.p3o_loss(a, b, torch.tensor(0.0), torch.tensor(2.0), 0.2, variant)  # A = (r1 - r2)/2 = -1
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(a.grad) and torch.isfinite(b.grad), (lr1, lr2, loss)
    # inside the clamp nothing changes: rho = e^3 with A = -1 -> the unclipped branch, -J = rho
    loss = L.p3o_loss(T(3.0), T(0.0), T(0.0), T(2.0), 0.2, "separate")
    assert loss.item() == pytest.approx(math.exp(3.0) - 1.0)  # + j2: min(1 * 1, clip(1) * 1) = 1 -> -(-e^3 + 1)


def test_remax_official_vector():
    logp, ref, mask = T([-1.0, -0.5, -2.0]), T([-1.2, -0.4, -2.5]), T([1, 1, 1])
    R = L.remax_returns(logp, ref, mask, T(2.0), T(1.5), kl_coef=0.05, gamma=0.99, clip=5.0)
    assert R.tolist() == [pytest.approx([0.4751495, 0.49505, 0.47], abs=1e-7)]
    assert L.remax_loss(logp, R, mask).item() == pytest.approx(0.5542248, abs=1e-7)
    # clip after the baseline, padding masked, plain REINFORCE when gamma=1, kl=0
    R2 = L.remax_returns(T([-1.0, -1.0], [-1.0, 0.0]), T([0.0, 0.0], [0.0, 0.0]), T([1, 1], [1, 0]), T(10.0, 0.0),
                         T(1.0, 0.5), kl_coef=0.0, gamma=1.0, clip=5.0)
    assert R2.tolist() == [[5.0, 5.0], [-0.5, 0.0]]


def test_soup_average_and_shape_errors():
    out = L.soup([{"w": T(1.0, -2.0)}, {"w": T(3.0, 0.0)}], [0.5, 0.5])
    assert out["w"].tolist() == [2.0, -1.0]
    assert L.soup([{"w": T(1.0)}, {"w": T(3.0)}], [0.25, 0.75])["w"].tolist() == [2.5]
    with pytest.raises(ValueError, match="shape"):
        L.soup([{"w": T(1.0)}, {"w": T(1.0, 2.0)}], [0.5, 0.5])
    with pytest.raises(ValueError, match="different parameters"):
        L.soup([{"w": T(1.0)}, {"v": T(1.0)}], [0.5, 0.5])
    with pytest.raises(ValueError, match="sum to 1"):
        L.soup([{"w": T(1.0)}, {"w": T(1.0)}], [0.5, 0.6])


def test_ensemble_aggregates():
    s = T([1.0], [2.0], [4.0])  # 3 members, 1 sample
    assert L.aggregate_ensemble(s, "mean").item() == pytest.approx(2.3333333, abs=1e-7)
    assert L.aggregate_ensemble(s, "wco").item() == 1.0
    assert L.aggregate_ensemble(s, "uwo", 0.5, ddof=0).item() == pytest.approx(1.5555556, abs=1e-7)
    assert L.aggregate_ensemble(s, "uwo", 0.5, ddof=1).item() == pytest.approx(1.1666667, abs=1e-7)
    assert L.aggregate_ensemble(s, "uwo", 0.1, ddof=0).item() == pytest.approx(2.1777778, abs=1e-7)


def test_best_of_n_unbiased_estimator():
    proxy = [0.0, 1.0, 2.0, 3.0]
    gold = [0.1, 0.4, 0.2, 0.9]
    assert L.best_of_n_unbiased(proxy, gold, 2)[1] == pytest.approx(0.5833333, abs=1e-7)
    assert L.best_of_n_unbiased(proxy, gold, 1) == pytest.approx((1.5, 0.4))  # n=1: plain means
    assert L.best_of_n_unbiased(proxy, gold, 4) == pytest.approx((3.0, 0.9))  # n=N: the top sample
    # order of the inputs does not matter, only the proxy ranking
    assert L.best_of_n_unbiased(proxy[::-1], gold[::-1], 2)[1] == pytest.approx(0.5833333, abs=1e-7)
