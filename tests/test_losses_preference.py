"""Independent test vectors (plain math, by hand, from the papers' formulas) for the preference losses TRL lacks."""

import math
import random

import pytest
import torch

from aligntool.losses import preference as L

sig = lambda z: 1 / (1 + math.exp(-z))  # noqa: E731
softplus = lambda z: math.log1p(math.exp(z))  # noqa: E731


class Draws:
    """A stand-in for random.Random that returns fixed uniform draws (the worked example of RSO's Algorithm 1)."""

    def __init__(self, values):
        self.values = list(values)

    def random(self):
        return self.values.pop(0)


def test_f_alpha_maps_the_papers_alpha_onto_trls_coefficient():
    # f-DPO (Wang et al. 2023), alpha-divergence: alpha_paper = 0.3 on the shared pairs gives delta
    # [1.0037542, 0.7335657], mean loss 0.6506799
    a = L.f_alpha_to_trl_coef(0.3)
    assert a == pytest.approx(0.7)
    trl_score = lambda lr: (math.exp((a - 1) * lr) - 1) / (a - 1)  # noqa: E731 - TRL 1.x's alpha_divergence form
    paper_fprime = lambda lr: (1 - math.exp(-0.3 * lr)) / 0.3  # noqa: E731 - f'(u) = (1 - u^-alpha)/alpha
    pairs = [(0.5, -0.5), (0.2, -0.5)]
    deltas = [trl_score(c) - trl_score(r) for c, r in pairs]
    assert deltas == pytest.approx([paper_fprime(c) - paper_fprime(r) for c, r in pairs])
    assert deltas == pytest.approx([1.0037542, 0.7335657], abs=1e-7)
    assert sum(softplus(-0.1 * d) for d in deltas) / 2 == pytest.approx(0.6506799, abs=1e-7)
    for bad in (0.0, 1.0, -0.2):
        with pytest.raises(ValueError):
            L.f_alpha_to_trl_coef(bad)


def test_rso_sampler_worked_example():
    # pass 1 thresholds [1, e^-1, e^-2, e^-4] with u [0.9, 0.5, 0.1, 0.5]: c1, c3; pass 2 r_max 0.5, u 0.7: c2
    assert L.rso_rejection_sample([1.0, 0.5, 0.0, -1.0], 0.5, 3, Draws([0.9, 0.5, 0.1, 0.5, 0.7])) == [0, 2, 1]


def test_rso_acceptance_frequencies_follow_exp_r_minus_rmax_over_beta():
    rewards, beta = [-0.5, 0.0, -1.0, -2.0], 0.8
    p = [math.exp((r - max(rewards)) / beta) for r in rewards]
    # with one sample, candidate i is returned iff it is the first accepted in pass 1 (the max always accepts)
    expected = [p[i] * math.prod(1 - p[j] for j in range(i)) for i in range(len(p))]
    rng, n = random.Random(1234), 40000
    counts = [0] * len(rewards)
    for _ in range(n):
        counts[L.rso_rejection_sample(rewards, beta, 1, rng)[0]] += 1
    for c, e in zip(counts, expected):
        assert abs(c / n - e) < 4 * math.sqrt(e * (1 - e) / n) + 1e-9, (counts, expected)


def test_rso_beta_limits():
    rewards = [0.3, 2.0, -1.0, 1.5, 0.0, 1.9]
    rng = random.Random(0)
    for _ in range(20):  # beta -> 0: the top-k
        assert sorted(L.rso_rejection_sample(rewards, 1e-6, 3, rng)) == [1, 3, 5]
    assert L.rso_rejection_sample(rewards, 1e9, 4, rng) == [0, 1, 2, 3]  # beta -> inf: everything, in order
    with pytest.raises(ValueError):
        L.rso_rejection_sample(rewards, 0.5, 7, rng)


def test_rso_pair_construction():
    rewards = [0.1, 0.9, 0.5, 0.3, 0.7, 0.2, 0.8, 0.4]
    rng = random.Random(3)
    first = L.rso_first_round_pairs(range(8), rewards, rng)
    assert len(first) == 4 and sorted(i for p in first for i in p) == list(range(8))
    assert all(rewards[c] > rewards[r] for c, r in first)
    tour = L.rso_tournament_pairs(range(8), rewards, rng)
    assert len(tour) == 7 and all(rewards[c] > rewards[r] for c, r in tour)
    assert 1 not in [r for _, r in tour]  # the best response never loses
    assert len(L.rso_tournament_pairs(range(5), rewards, rng)) == 4  # byes: still n - 1 games


def test_sppo_win_rates_include_the_self_pair():
    p = L.sppo_win_rates(torch.tensor([[1.0, 0.0, -1.0]], dtype=torch.float64))
    p_w = (0.5 + sig(1) + sig(2)) / 3
    assert p[0].tolist() == pytest.approx([p_w, 0.5, 1 - p_w])
    assert p_w == pytest.approx(0.7039519, abs=1e-7)


def test_sppo_loss_vector_batch_and_extremes():
    p_w, p_l = 0.7039519, 0.2960481
    got = L.sppo_loss(torch.tensor([0.5, 0.0]), torch.tensor([-0.5, 0.0]), torch.tensor([p_w, 0.5]),
                      torch.tensor([p_l, 0.5]), beta=0.1)
    # by hand: (0.5 - 2.039519)^2 = 2.3701183 for each squared term; the authors' trainer (uclaml/SPPO,
    # sppo/trainer.py) halves their sum: (2.3701183 + 2.3701183) / 2 (unhalved it would be 4.7402366)
    assert (0.5 - (p_w - 0.5) / 0.1) ** 2 == pytest.approx(2.3701183, abs=1e-6)
    assert got.tolist() == pytest.approx([2.3701183, 0.0], abs=1e-5)
    big = L.sppo_loss(torch.tensor([1e4]), torch.tensor([-1e4]), torch.tensor([1.0]), torch.tensor([0.0]), 0.001)
    assert torch.isfinite(big).all()


def test_cpl_loss_vectors():
    lp_pos, lp_neg = torch.tensor([-3.0, -3.0]), torch.tensor([-5.0, -5.0])
    assert L.cpl_loss(lp_pos, lp_neg, 0.1, 0.5).tolist() == pytest.approx([0.7184596] * 2, abs=1e-6)
    assert L.cpl_loss(lp_pos, lp_neg, 0.1, 1.0)[0].item() == pytest.approx(0.5981389, abs=1e-6)
    assert softplus(0.05) == pytest.approx(0.7184596, abs=1e-7)
    extreme = L.cpl_loss(torch.tensor([-1e5, 0.0]), torch.tensor([0.0, -1e5]), 1.0, 0.5)
    assert torch.isfinite(extreme).all() and extreme[0].item() == pytest.approx(1e5) and extreme[1].item() < 1e-6


def test_srpo_loss_vector():
    t = lambda *v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    # h(yw)=0.5 h(yl)=-0.5 h(yw|yl)=1.0 h(yl|yl)=-0.2 h(yw|yw)=0.3 h(yl|yw)=-0.6, beta 0.1, alpha 0.8
    got = L.srpo_loss(t(0.5, 0.0), t(-0.5, 0.0), t(1.0, 0.0), t(-0.2, 0.0), t(0.3, 0.0), t(-0.6, 0.0), 0.1, 0.8)
    by_hand = 0.2 * (0.1 * (1.0 + 0.5 + 0.6 + 0.5) - 1) ** 2 + 0.8 * ((0.5 - 0.12) ** 2 + (0.5 - 0.09) ** 2)
    assert got[0].item() == pytest.approx(0.35952, abs=1e-9) and by_hand == pytest.approx(0.35952)
    assert got[1].item() == pytest.approx(0.2 * 1 + 0.8 * 0.5)  # all-zero log-ratios: L_gen 1, L_self 0.25 + 0.25


def test_hypo_rloo_kl_value_advantages_and_gradient():
    logp = torch.tensor([[-4.0, -6.0]], requires_grad=True)
    logratio = torch.tensor([[0.8, 0.2]])
    loss, kl = L.rloo_kl_loss(logp, logratio)
    assert kl.item() == pytest.approx(0.5) and loss.item() == pytest.approx(0.5)
    assert 0.6515781 + 0.01 * loss.item() == pytest.approx(0.6565781, abs=1e-7)  # HyPO: DPO + 0.01 KL
    assert L.rloo_advantages(-logratio).tolist() == [pytest.approx([-0.6, 0.6])]
    loss.backward()
    # d/d logp_i of -(1/(P k)) sum A_i logp_i = -A_i / 2
    assert logp.grad.tolist() == [pytest.approx([0.3, -0.3])]
    with pytest.raises(ValueError):
        L.rloo_kl_loss(torch.zeros(2, 1), torch.zeros(2, 1))


def test_hypo_rloo_gradient_is_unbiased_for_kl():
    """For a categorical policy the RLOO gradient's expectation equals the exact grad of KL(pi || pi_ref)."""
    torch.manual_seed(0)
    theta = torch.tensor([0.5, -0.3, 0.1], requires_grad=True)
    ref = torch.log_softmax(torch.tensor([0.0, 0.4, -0.2]), 0)
    exact = torch.autograd.grad((torch.softmax(theta, 0) * (torch.log_softmax(theta, 0) - ref)).sum(), theta)[0]
    logp_all = torch.log_softmax(theta, 0)
    y = torch.multinomial(torch.softmax(theta.detach(), 0), 200000 * 4, replacement=True).view(-1, 4)
    loss, _ = L.rloo_kl_loss(logp_all[y], (logp_all[y] - ref[y]).detach())
    est = torch.autograd.grad(loss, theta)[0]
    assert est.tolist() == pytest.approx(exact.tolist(), abs=3e-3)


def test_spo_ssl_cross_entropy_by_hand():
    got = L.spo_ssl_loss(torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 0.0]]), torch.tensor([0, 2]))
    assert got.tolist() == pytest.approx([math.log(1 + 2 * math.exp(-2)), math.log(3)])


# ---------------------------------------------------------------------------------------- online preference (issue 7)
# two shared example pairs: lp(c), lp(r), lp_ref(c), lp_ref(r)
PAIRS = [(-10.0, -12.0, -10.5, -11.5), (-8.0, -7.5, -8.2, -7.0)]
T64 = lambda *v: torch.tensor(v, dtype=torch.float64)  # noqa: E731


def shared(col):
    return T64(*[p[col] for p in PAIRS])


def dpo_per_pair(beta=0.1):
    return T64(*[-math.log(sig(beta * ((c - rc) - (r - rr)))) for c, r, rc, rr in PAIRS])


def test_dpo_family_sigmoid_matches_the_shared_vector():
    lens = T64(4, 5)
    got = L.dpo_family_loss("sigmoid", 0.1, shared(0), shared(1), shared(2), shared(3), lens, lens)
    assert got.tolist() == pytest.approx([0.6443967, 0.6587596], abs=1e-7)


@pytest.mark.parametrize("loss_type", ["hinge", "ipo", "robust", "exo_pair", "nca_pair", "bco_pair", "sppo_hard",
                                       "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm", "aot",
                                       "aot_unpaired"])
def test_dpo_family_loss_types_by_plain_math(loss_type):
    b, eps, tau = 0.5, 0.1, 0.05
    len_w, len_l = [4, 2], [5, 3]
    lp_w, lp_l = [-10.0, -8.0], [-12.0, -7.5]
    ref_w, ref_l = [-10.5, -8.2], [-11.5, -7.0]
    lrw = [a - c for a, c in zip(lp_w, ref_w)]  # [0.5, 0.2]
    lrl = [a - c for a, c in zip(lp_l, ref_l)]  # [-0.5, -0.5]
    lsig = lambda z: math.log(sig(z))  # noqa: E731
    expected = []
    for i in range(2):
        d = lrw[i] - lrl[i]
        z = b * d
        expected.append({
            "hinge": max(0.0, 1 - z),
            "ipo": (d - 1 / (2 * b)) ** 2,  # IPO eq. 17 on sequence log-ratios (TRL's online trainers)
            "robust": (-(1 - eps) * lsig(z) + eps * lsig(-z)) / (1 - 2 * eps),
            "exo_pair": sig(z) * (lsig(z) - math.log(1 - eps)) + sig(-z) * (lsig(-z) - math.log(eps)),
            "nca_pair": -lsig(b * lrw[i]) - 0.5 * lsig(-b * lrw[i]) - 0.5 * lsig(-b * lrl[i]),
            "bco_pair": -lsig(b * lrw[i]) - lsig(-b * lrl[i]),
            "sppo_hard": (lrw[i] - 1 / (2 * b)) ** 2 + (lrl[i] + 1 / (2 * b)) ** 2,
            "apo_zero": 1 - sig(b * lrw[i]) + sig(b * lrl[i]),
            "apo_down": sig(b * lrw[i]) + 1 - sig(z),
            "discopop": (1 - sig(z / tau)) * -lsig(z) + sig(z / tau) * math.exp(-z),
            "sft": -lp_w[i] * 2 / sum(len_w),  # per pair, so that the mean is TRL's token mean over the batch
            "sigmoid_norm": -lsig(b * (lrw[i] / len_w[i] - lrl[i] / len_l[i])),
        }.get(loss_type))
    if loss_type == "aot":  # sorted policy margins [-0.5, 2.0] minus sorted reference margins [-1.2, 1.0]
        expected = [-(1 - eps) * lsig(b * d) - eps * lsig(-b * d) for d in (-0.5 + 1.2, 2.0 - 1.0)]
    if loss_type == "aot_unpaired":  # sorted lr_w [0.2, 0.5] minus sorted lr_l [-0.5, -0.5]
        expected = [-(1 - eps) * lsig(b * d) - eps * lsig(-b * d) for d in (0.7, 1.0)]
    got = L.dpo_family_loss(loss_type, b, T64(*lp_w), T64(*lp_l), T64(*ref_w), T64(*ref_l), T64(*len_w), T64(*len_l),
                            label_smoothing=eps, discopop_tau=tau)
    assert got.tolist() == pytest.approx(expected, abs=1e-9)


def test_dpo_family_sft_is_one_token_mean_over_the_batch():
    """TRL (DPOTrainer, loss 'sft') averages the chosen NLL over all chosen tokens of the batch: chosen log-probs
    summing to -4 over 1 token and -10 over 4 tokens give 14/5 = 2.8 (a mean of per-pair token means gives 3.25)."""
    zero = T64(0.0, 0.0)
    got = L.dpo_family_loss("sft", 0.1, T64(-4.0, -10.0), zero, zero, zero, T64(1, 4), T64(1, 1))
    assert got.mean().item() == pytest.approx(2.8)


def test_dpo_family_ipo_is_the_papers_sequence_form_and_per_token_on_request():
    # pair 1 of the shared example: lr_w = 0.5 over 4 tokens, lr_l = -0.5 over 5 tokens, beta (tau) 0.1
    args = (T64(-10.0), T64(-12.0), T64(-10.5), T64(-11.5), T64(4), T64(5))
    assert L.dpo_family_loss("ipo", 0.1, *args).item() == pytest.approx((1.0 - 5.0) ** 2)  # 16: IPO eq. 17
    per_token = L.dpo_family_loss("ipo", 0.1, *args, ipo_length_normalized=True).item()
    assert per_token == pytest.approx((0.5 / 4 + 0.5 / 5 - 5.0) ** 2)  # 22.800625: TRL DPOTrainer's form


def test_dpo_family_loss_is_finite_with_finite_gradients_at_extreme_log_ratios():
    """Every loss type, discopop included: m * exp(-z) at z = -2000 is 0 * inf = NaN unless computed stably."""
    from aligntool.trainers.base.trl_lists import dpo_loss_types as trl_loss_types

    for t in trl_loss_types():
        for sign in (1.0, -1.0):
            lp_w = T64(sign * -1e4, 0.0).float().requires_grad_()
            got = L.dpo_family_loss(t, 0.1, lp_w, T64(sign * 1e4, 0.0).float(), torch.zeros(2), torch.zeros(2),
                                    T64(3, 3), T64(3, 3), label_smoothing=0.1)
            got.sum().backward()
            assert torch.isfinite(got).all() and torch.isfinite(lp_w.grad).all(), (t, sign, got, lp_w.grad)


def test_discopop_matches_the_plain_formula_where_it_is_finite_and_its_limit_beyond():
    b, tau = 0.1, 0.05
    zero, one = T64(0.0), T64(1)
    for delta in (-30.0, -1.0, 0.0, 2.0, 40.0):
        z = b * delta
        m = sig(z / tau)
        plain = (1 - m) * -math.log(sig(z)) + m * math.exp(-z)
        got = L.dpo_family_loss("discopop", b, T64(delta), zero, zero, zero, one, one, discopop_tau=tau)
        assert got.item() == pytest.approx(plain, rel=1e-9), delta
    # z = -2000: m = sigmoid(-40000) underflows, exp(2000) overflows; the limit is -log sigmoid(z) = 2000
    far = L.dpo_family_loss("discopop", b, T64(-2e4), zero, zero, zero, one, one, discopop_tau=tau)
    assert far.item() == pytest.approx(2000.0)


def test_xpo_loss_vectors():
    # log pi_theta(reference sample) = [-9, -11], given per token with padding that must not count
    tokens = T64(-4.0, -5.0, -99.0), T64(-6.0, -5.0, 0.0)
    mask = T64(1, 1, 0), T64(1, 1, 1)
    got = L.xpo_loss(dpo_per_pair(), torch.stack(tokens), torch.stack(mask), alpha=0.1)
    assert got.tolist() == pytest.approx([-0.2556033, -0.4412404], abs=1e-7)
    assert got.mean().item() == pytest.approx(-0.3484219, abs=1e-7)
    small = L.xpo_loss(dpo_per_pair(), torch.stack(tokens), torch.stack(mask), alpha=1e-5)
    assert small.mean().item() == pytest.approx(0.6514781, abs=1e-7)


def test_inpo_loss_vectors_and_a_batch():
    last_w, last_l = T64(-10.2, -8.0), T64(-11.8, -7.0)
    args = (shared(0), shared(1), shared(2), shared(3), last_w, last_l)
    assert L.inpo_loss(*args, eta=0.005, ratio=1 / 3)[0].item() == pytest.approx(9880.36, abs=1e-6)
    assert L.inpo_loss(*args, eta=0.1, ratio=1 / 3)[0].item() == pytest.approx(19.36, abs=1e-9)
    assert L.inpo_loss(*args, eta=0.1, ratio=0.0)[0].item() == pytest.approx(21.16, abs=1e-9)
    # pair 2 by hand: policy margin -0.5, reference margin -1.2, last margin -1.0
    h2 = -0.5 - (1 / 3) * (-1.2) - (2 / 3) * (-1.0)
    assert L.inpo_loss(*args, eta=0.1, ratio=1 / 3)[1].item() == pytest.approx((h2 - 5) ** 2, abs=1e-9)
    # at pi = pi_ref = pi_t (the first step of iteration 1), h = 0 and L = (1/(2 eta))^2
    zero = T64(-3.0, -4.0)
    assert L.inpo_loss(zero, zero, zero, zero, zero, zero, eta=0.1, ratio=0.3).tolist() == pytest.approx([25.0, 25.0])


def authors_selection(n, pref):
    """INPO's get_pref_single.py (XuHuang441/Multi-player-Nash-Policy-Optimization, INPO_server/annotate_data), as
    written there, with get_pref(a, b) = pref[a][b] thresholded the authors' way (1 / 0.5 / 0) and use_tournament on.
    Returns (win_id, lose_id) or None where the authors' final check drops the prompt."""
    def get_pref(a, b):
        p = pref[a][b]
        return 0.5 if p == 0.5 else float(p > 0.5)

    def get_match_res(id_0, id_1):
        return (id_0, id_1) if get_pref(id_0, id_1) >= 0.5 else (id_1, id_0)

    if n == 8:
        win_1, lose_1 = get_match_res(0, 1)
        win_2, lose_2 = get_match_res(2, 3)
        win_3, lose_3 = get_match_res(4, 5)
        win_4, lose_4 = get_match_res(6, 7)
        win_5, _ = get_match_res(win_1, win_2)
        win_6, _ = get_match_res(win_3, win_4)
        win_id, _ = get_match_res(win_5, win_6)
        _, lose_5 = get_match_res(lose_1, lose_2)
        _, lose_6 = get_match_res(lose_3, lose_4)
        _, lose_id = get_match_res(lose_5, lose_6)
    else:
        win_id = 0
        for i in range(1, n):
            if get_pref(win_id, i) < 0.5:
                win_id = i
        lose_id = 1 if win_id == 0 else 0
        for i in range(n):
            if i == win_id or i == lose_id:
                continue
            if get_pref(lose_id, i) >= 0.5:
                lose_id = i
    return win_id, lose_id


def test_inpo_selection_is_the_authors_for_every_k_ties_included():
    from aligntool.preferences import select_best_and_worst

    rng = random.Random(0)
    for n in (2, 3, 4, 5, 7, 8):
        for _ in range(200):
            scores = [rng.choice([0, 1, 2, 3]) for _ in range(n)]  # many ties
            pref = [[1.0 if a > b else 0.5 if a == b else 0.0 for b in scores] for a in scores]
            got = select_best_and_worst(n, lambda i, j: pref[i][j] >= 0.5)
            assert got == authors_selection(n, pref), (n, scores)
        for _ in range(50):  # distinct scores: the best and the worst, also for odd n (no bye)
            scores = rng.sample(range(100), n)
            best, worst = select_best_and_worst(n, lambda i, j: scores[i] >= scores[j])
            assert scores[best] == max(scores) and scores[worst] == min(scores), scores


def test_inpo_selection_examples():
    from aligntool.preferences import select_best_and_worst
    from aligntool.trainers.inpo import select_pair

    # K = 3: the last sample is the worst; a bracket with a bye for it never rejects it
    scores = [-0.02, 2.73, -15.46]
    assert select_best_and_worst(3, lambda i, j: scores[i] >= scores[j]) == (1, 2)
    # 8 players: the loser bracket is the four first-round losers only
    scores = [5, 6, 1, 2, 7, 8, 3, 4]  # first-round losers: 0, 2, 4, 6 -> worst is 2 (score 1)
    assert select_best_and_worst(8, lambda i, j: scores[i] >= scores[j]) == (5, 2)
    # all tied: the first player keeps every match, so (0, K-1) is selected, and the final check drops the prompt
    tie = [[0.5] * 3 for _ in range(3)]
    assert select_best_and_worst(3, lambda i, j: tie[i][j] >= 0.5) == (0, 2)
    assert select_pair(tie, None, "tournament") is None


def test_bt_probability():
    from aligntool.preferences import bt_probability

    assert bt_probability(2.0, 1.0, 0.0) == 1.0 and bt_probability(1.0, 2.0, 0.0) == 0.0
    assert bt_probability(1.0, 1.0, 0.0) == 0.5
    assert bt_probability(2.0, 1.0, 0.5) == pytest.approx(1 / (1 + math.exp(-2.0)))
