"""Pure loss and estimator functions of the preference-optimization family that TRL does not implement.

Inputs are sequence log-probs summed over completion tokens (prompt and padding masked out):
``lp`` under the policy, ``lp_ref`` under the reference, and log-ratios ``lr = lp - lp_ref``. Every function
returns per-example values (no reduction) unless its name says otherwise; trainers take the mean.
Each docstring states the formula and cites the paper (and the authors' code where it settles a detail).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

import torch
import torch.nn.functional as F


# -------------------------------------------------------------------------------------------------------- f-DPO
def f_alpha_to_trl_coef(alpha: float) -> float:
    """The paper's alpha-divergence alpha -> TRL 1.x's ``f_alpha_divergence_coef``.

    f-DPO (Wang et al. 2023, arXiv 2309.16240) writes f'(u) = (1 - u^(-alpha)) / alpha, alpha in (0, 1)
    (alpha -> 0: reverse KL, alpha = 1: forward KL). TRL 1.x computes f'(u) = (u^(a-1) - 1) / (a - 1), which is the
    paper's form with a = 1 - alpha. (TRL <= 0.26 used a = alpha; the two agree only at 0.5.)
    """
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    return 1.0 - alpha


# ---------------------------------------------------------------------------------------------------------- RSO
def rso_rejection_sample(rewards: Sequence[float], beta: float, num_samples: int, rng: random.Random) -> list[int]:
    """Statistical rejection sampling, Algorithm 1 of RSO (Liu et al. 2023, arXiv 2309.06657).

    Draws ``num_samples`` candidates (indices into ``rewards``) approximately from the optimal policy
    pi*(y|x) ∝ pi_sft(y|x) exp(r(x, y) / beta), given candidates sampled from pi_sft:

        while fewer than num_samples accepted:
            r_max = max reward over the candidates still remaining
            for each remaining candidate c (in order): u ~ U[0, 1]; accept c if u < exp((r_c - r_max) / beta),
                                                       stop as soon as num_samples are accepted
            remove the accepted candidates

    beta -> 0 keeps the top-``num_samples`` rewards; beta -> inf accepts candidates in order (uniform).
    Returns the accepted indices in acceptance order.
    """
    if num_samples > len(rewards):
        raise ValueError(f"num_samples={num_samples} exceeds the {len(rewards)} candidates")
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    remaining = list(range(len(rewards)))
    accepted: list[int] = []
    while len(accepted) < num_samples:
        r_max = max(rewards[i] for i in remaining)
        taken = []
        for i in remaining:
            u = rng.random()
            if u >= math.exp((rewards[i] - r_max) / beta):
                continue
            taken.append(i)
            accepted.append(i)
            if len(accepted) == num_samples:
                break
        remaining = [i for i in remaining if i not in taken]
    return accepted


def rso_first_round_pairs(indices: Sequence[int], rewards: Sequence[float],
                          rng: random.Random) -> list[tuple[int, int]]:
    """First-round-rank (RSO §3.3): shuffle the n responses into n/2 disjoint pairs, each labelled by the reward.
    Returns (chosen, rejected) index pairs; a tie is broken at random."""
    order = list(indices)
    rng.shuffle(order)
    pairs = []
    for a, b in zip(order[0::2], order[1::2]):
        if rewards[a] < rewards[b] or (rewards[a] == rewards[b] and rng.random() < 0.5):
            a, b = b, a
        pairs.append((a, b))
    return pairs


def rso_tournament_pairs(indices: Sequence[int], rewards: Sequence[float], rng: random.Random) -> list[tuple[int, int]]:
    """Tournament-rank (RSO §3.3): knock-out rounds until one winner; every game is a labelled pair, n - 1 in all."""
    players = list(indices)
    rng.shuffle(players)
    pairs = []
    while len(players) > 1:
        winners = []
        for a, b in zip(players[0::2], players[1::2]):
            if rewards[a] < rewards[b] or (rewards[a] == rewards[b] and rng.random() < 0.5):
                a, b = b, a
            pairs.append((a, b))
            winners.append(a)
        if len(players) % 2:
            winners.append(players[-1])  # odd one out gets a bye
        players = winners
    return pairs


# --------------------------------------------------------------------------------------------------------- SPPO
def sppo_win_rates(scores: torch.Tensor) -> torch.Tensor:
    """P_i = (1/K) sum_j sigmoid(s_i - s_j) over the K responses of one prompt, the self-pair (1/2) included
    (SPPO, Wu et al. 2024, arXiv 2405.00675; official ``scripts/compute_prob.py``). ``scores``: (..., K)."""
    return torch.sigmoid(scores.unsqueeze(-1) - scores.unsqueeze(-2)).mean(-1)


def sppo_loss(lr_w: torch.Tensor, lr_l: torch.Tensor, p_w: torch.Tensor, p_l: torch.Tensor,
              beta: float) -> torch.Tensor:
    """Soft SPPO (Wu et al. 2024, "Self-Play Preference Optimization for Language Model Alignment", eq. 4.8), with
    beta = 1/eta and the sum halved as in the authors' trainer (uclaml/SPPO, ``sppo/trainer.py``, loss ``sppo``:
    ``losses = (loss_w + loss_l) / 2``):

        L = [(lr_w - (P_w - 1/2)/beta)^2 + (lr_l - (P_l - 1/2)/beta)^2] / 2

    The halving leaves the optimum unchanged; it makes the logged loss and the gradient (so gradient clipping) equal
    to the authors'. (TRL's hard-label ``sppo_hard`` does not halve.)"""
    return ((lr_w - (p_w - 0.5) / beta) ** 2 + (lr_l - (p_l - 0.5) / beta) ** 2) / 2


# ---------------------------------------------------------------------------------------------------------- CPL
def cpl_loss(lp_pos: torch.Tensor, lp_neg: torch.Tensor, alpha: float, lam: float) -> torch.Tensor:
    """CPL (Hejna et al. 2023, arXiv 2310.13639): L = -log exp(A+) / (exp(A+) + exp(lam A-)) = softplus(-(A+ - lam A-)),
    with A = alpha * sum_t log pi(a_t | s_t) over the response and lam in (0, 1] the conservative bias.
    No reference model appears anywhere."""
    return F.softplus(-(alpha * lp_pos - lam * alpha * lp_neg))


# --------------------------------------------------------------------------------------------------------- SRPO
def srpo_loss(h_w: torch.Tensor, h_l: torch.Tensor, h_w_given_l: torch.Tensor, h_l_given_l: torch.Tensor,
              h_w_given_w: torch.Tensor, h_l_given_w: torch.Tensor, beta: float, alpha: float) -> torch.Tensor:
    """SRPO (Choi et al. 2024, arXiv 2406.01660), with h(a|b) = log pi(a|x,b) - log pi_ref(a|x,b) (revision of b into a)
    and h(a) = log pi(a|x) - log pi_ref(a|x):

        L_self = (1/2 - beta [h(yw|yl) - h(yl|yl)])^2 + (1/2 - beta [h(yw|yw) - h(yl|yw)])^2
        L_gen  = (beta [h(yw|yl) + h(yw) - h(yl|yw) - h(yl)] - 1)^2
        L      = (1 - alpha) L_gen + alpha L_self

    The targets 1/2 and 1 come from P(y ≻ y) = 1/2 and P(yw ≻ yl) = 1 in the paper's closed-form optimum; the
    (1 - alpha, alpha) weighting follows the public reimplementation (TRL PR #1772), which the paper does not pin down.
    """
    given_rejected = (0.5 - beta * (h_w_given_l - h_l_given_l)) ** 2
    given_chosen = (0.5 - beta * (h_w_given_w - h_l_given_w)) ** 2
    l_gen = (beta * (h_w_given_l + h_w - h_l_given_w - h_l) - 1.0) ** 2
    return (1 - alpha) * l_gen + alpha * (given_rejected + given_chosen)


# --------------------------------------------------------------------------------------------------------- HyPO
def rloo_kl_loss(logp: torch.Tensor, logratio: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """HyPO's KL(pi || pi_ref) term (Song et al. 2024, arXiv 2406.01462) from k >= 2 fresh samples per prompt.

    ``logp``: (P, k) sequence log-probs of the samples under the current policy (with grad);
    ``logratio``: (P, k) their log pi - log pi_ref (treated as constants).
    The reward of a sample is -logratio; its RLOO advantage is A_i = r_i - mean_{j != i} r_j. The returned loss has
    the value of the plain Monte-Carlo estimate KL ≈ mean(logratio) and the gradient of the RLOO score-function
    estimator  -mean(A_i * grad log pi(y_i)), an unbiased, lower-variance estimate of grad KL(pi || pi_ref).
    Returns (loss, kl_estimate).
    """
    k = logp.shape[-1]
    if k < 2:
        raise ValueError("the RLOO estimator needs k >= 2 samples per prompt")
    advantage = rloo_advantages(-logratio.detach())
    surrogate = -(advantage * logp).mean()
    kl = logratio.detach().mean()
    return kl + surrogate - surrogate.detach(), kl


def rloo_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """A_i = r_i - mean_{j != i} r_j along the last axis (leave-one-out baseline)."""
    k = rewards.shape[-1]
    return rewards - (rewards.sum(-1, keepdim=True) - rewards) / (k - 1)


# ---------------------------------------------------------------------------------------------------------- SPO
def spo_ssl_loss(logits: torch.Tensor, degree: torch.Tensor) -> torch.Tensor:
    """SPO's self-supervised term (Li et al. 2024, arXiv 2409.17791): cross-entropy of the predicted preference degree
    (how much key content was removed, as a class index) against the true one. Per-example values."""
    return F.cross_entropy(logits, degree, reduction="none")


def dpo_family_loss(loss_type: str, beta: float, lp_w: torch.Tensor, lp_l: torch.Tensor, ref_w: torch.Tensor,
                    ref_l: torch.Tensor, len_w: torch.Tensor, len_l: torch.Tensor, label_smoothing: float = 0.0,
                    discopop_tau: float = 0.05, ipo_length_normalized: bool = False) -> torch.Tensor:
    """Per-pair loss of one TRL DPO loss type on sequence log-probs, for trainers that build pairs online.

    TRL 1.16 computes these inside ``DPOTrainer._compute_loss`` on its own batches, so they cannot be called on a
    rollout; this restates TRL's formulas (same names, same conventions) on sequence sums. With
    lr_w = lp_w - ref_w, lr_l = lp_l - ref_l and delta = lr_w - lr_l:
        sigmoid   -log s(beta delta)              hinge     relu(1 - beta delta)
        ipo       (delta - 1/(2 beta))^2          IPO (Azar et al. 2023, "A General Theoretical Paradigm to Understand
                  Learning from Human Preferences", eq. 17) on sequence log-ratios, as TRL's OnlineDPOTrainer and
                  XPOTrainer compute it; ``ipo_length_normalized=True`` gives DPOTrainer's per-token form
                  (lr_w/|y_w| - lr_l/|y_l| - 1/(2 beta))^2
        robust    [-(1-e) log s(beta delta) + e log s(-beta delta)] / (1 - 2e)       e = label_smoothing
        exo_pair  q_w (log q_w - log(1-e)) + q_l (log q_l - log e),  q_w = s(beta delta), q_l = s(-beta delta)
        nca_pair  -log s(beta lr_w) - 1/2 log s(-beta lr_w) - 1/2 log s(-beta lr_l)
        bco_pair  -log s(beta lr_w) - log s(-beta lr_l)
        sppo_hard (lr_w - 1/(2 beta))^2 + (lr_l + 1/(2 beta))^2
        aot       label-smoothed sigmoid on sort(lp_w - lp_l) - sort(ref_w - ref_l) over the batch
        aot_unpaired  the same on sort(lr_w) - sort(lr_l)
        apo_zero  (1 - s(beta lr_w)) + s(beta lr_l);   apo_down  s(beta lr_w) + (1 - s(beta delta))
        discopop  (1 - m) (-log s(z)) + m exp(-z),  z = beta delta, m = s(z / tau); the second term is computed as
                  exp(log s(z / tau) - z), which is finite where m underflows to 0 and exp(-z) overflows
        sft       the NLL of the chosen tokens averaged over all chosen tokens of the batch, as TRL does:
                  -sum_i lp_w,i / sum_i |y_w,i|; returned per pair as -lp_w,i * B / sum_j |y_w,j| so that the batch
                  mean (what trainers take) is exactly that token mean
        sigmoid_norm  -log s(beta (lr_w/|y_w| - lr_l/|y_l|))
    s = sigmoid; all tensors (B,); lengths are completion token counts."""
    s, ls = torch.sigmoid, F.logsigmoid
    lr_w, lr_l = lp_w - ref_w, lp_l - ref_l
    delta, eps = lr_w - lr_l, label_smoothing
    n_w, n_l = len_w.clamp(min=1).to(lp_w.dtype), len_l.clamp(min=1).to(lp_l.dtype)
    if loss_type == "sigmoid":
        return -ls(beta * delta)
    if loss_type == "hinge":
        return torch.relu(1 - beta * delta)
    if loss_type == "ipo":
        margin = lr_w / n_w - lr_l / n_l if ipo_length_normalized else delta
        return (margin - 1 / (2 * beta)) ** 2
    if loss_type == "robust":
        return (-(1 - eps) * ls(beta * delta) + eps * ls(-beta * delta)) / (1 - 2 * eps)
    if loss_type == "exo_pair":
        z = beta * delta
        return s(z) * (ls(z) - math.log1p(-eps)) + s(-z) * (ls(-z) - math.log(eps))
    if loss_type == "nca_pair":
        return -ls(beta * lr_w) - 0.5 * ls(-beta * lr_w) - 0.5 * ls(-beta * lr_l)
    if loss_type == "bco_pair":
        return -ls(beta * lr_w) - ls(-beta * lr_l)
    if loss_type == "sppo_hard":
        return (lr_w - 0.5 / beta) ** 2 + (lr_l + 0.5 / beta) ** 2
    if loss_type in ("aot", "aot_unpaired"):
        if loss_type == "aot":
            d = torch.sort(lp_w - lp_l).values - torch.sort(ref_w - ref_l).values
        else:
            d = torch.sort(lr_w).values - torch.sort(lr_l).values
        return -(1 - eps) * ls(beta * d) - eps * ls(-beta * d)
    if loss_type == "apo_zero":
        return (1 - s(beta * lr_w)) + s(beta * lr_l)
    if loss_type == "apo_down":
        return s(beta * lr_w) + (1 - s(beta * delta))
    if loss_type == "discopop":
        z = beta * delta
        return (1 - s(z / discopop_tau)) * -ls(z) + torch.exp(ls(z / discopop_tau) - z)
    if loss_type == "sft":
        return -lp_w * len(lp_w) / n_w.sum()
    if loss_type == "sigmoid_norm":
        return -ls(beta * (lr_w / n_w - lr_l / n_l))
    raise ValueError(f"loss_type {loss_type!r} is not restated here (TRL's DPOTrainer loss types are)")


def xpo_loss(dpo_per_pair: torch.Tensor, ref_sample_logps: torch.Tensor, ref_sample_mask: torch.Tensor,
             alpha: float) -> torch.Tensor:
    """XPO (Xie et al. 2024, arXiv 2405.21046; TRL's XPOTrainer): L = DPO-family loss on the pair built from a policy
    sample and a reference sample + alpha * sum_t log pi_theta(y~_t | x, y~_<t) of the *reference* sample y~.
    Minimising the second term lowers the policy's likelihood of what the reference would say: the exploration bonus.
    ``dpo_per_pair`` (B,); ``ref_sample_logps`` per-token log-probs (B, T) under pi_theta, ``ref_sample_mask`` (B, T)
    marks the response tokens. Returns per-pair losses (B,)."""
    return dpo_per_pair + alpha * (ref_sample_logps * ref_sample_mask).sum(-1)


def inpo_loss(lp_w: torch.Tensor, lp_l: torch.Tensor, ref_w: torch.Tensor, ref_l: torch.Tensor, last_w: torch.Tensor,
              last_l: torch.Tensor, eta: float, ratio: float) -> torch.Tensor:
    """INPO (Zhang et al. 2024, arXiv 2407.00617), round t with previous iterate pi_t and reference pi_ref:
        h = [log pi(y_w) - log pi(y_l)] - (tau/eta) [log pi_ref(y_w) - log pi_ref(y_l)]
            - ((eta - tau)/eta) [log pi_t(y_w) - log pi_t(y_l)]
        L = (h - 1/(2 eta))^2,        ratio = tau/eta (the authors' code: 1/3, eta 0.005).
    Per pair, shapes (B,)."""
    h = (lp_w - lp_l) - ratio * (ref_w - ref_l) - (1 - ratio) * (last_w - last_l)
    return (h - 1 / (2 * eta)) ** 2
