"""Pure functions of the online RL family: PPO (GAE, clipped losses, adaptive KL), P3O, ReMax, SALSA soups,
reward-model ensembles (mean / WCO / UWO) and the unbiased best-of-n estimator.

Token tensors are (batch, T) with a 0/1 ``mask`` over response tokens. Each docstring states the formula and cites
the paper (and the authors' code where it settles a detail).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim=None, denom=None) -> torch.Tensor:
    """sum(x * mask) / sum(mask); ``denom`` replaces sum(mask) (data parallelism: see ``token_denominator``)."""
    return (x * mask).sum(dim) / (mask.sum(dim).clamp(min=1) if denom is None else denom)


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, all_sum=None) -> torch.Tensor:
    """(x - mean) / std over the masked entries (PPO advantage whitening); ``shift_mean=False`` keeps the mean.
    ``all_sum`` (a sum over processes, e.g. the engine's ``all_sum``) takes the statistics over the global batch, as
    one process holding all of it would: OpenRLHF and verl whiten over the whole batch too."""
    total = all_sum or (lambda t: t)
    count = total(mask.sum()).clamp(min=1)
    mean = total((x * mask).sum()) / count
    var = total((((x - mean) ** 2) * mask).sum()) / count
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    return (out if shift_mean else out + mean) * mask


MAX_LOG_RATIO = 20.0


def ratio_from_log(logratio: torch.Tensor) -> torch.Tensor:
    """exp(log rho) with log rho clamped to [-MAX_LOG_RATIO, MAX_LOG_RATIO] (as verl's policy loss clamps it).

    A whole-sequence ratio (P3O) is a sum of per-token log-ratios and can pass float32's exp range (~88) after a few
    large updates; unclamped, exp gives inf, and inf times a negative advantage makes the loss inf and its gradient
    NaN. Clamped, rho <= e^20 ~ 4.9e8: the loss and its gradient stay finite (the gradient is 0 beyond the clamp,
    where the unclipped branch would otherwise explode). Inside the clamp nothing changes."""
    return torch.exp(logratio.clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO))


# ------------------------------------------------------------------------------------------------------------- PPO
def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float):
    """Generalised advantage estimation (Schulman et al. 2016) over response tokens:

        delta_t = r_t + gamma * V_{t+1} - V_t        (V after the last token = 0)
        A_t     = delta_t + gamma * lam * A_{t+1},    returns_t = A_t + V_t

    Masked positions get 0. Returns (advantages, returns)."""
    values = values * mask
    rewards = rewards * mask
    T = rewards.shape[-1]
    adv = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[..., 0])
    for t in reversed(range(T)):
        next_v = values[..., t + 1] if t + 1 < T else torch.zeros_like(last)
        delta = rewards[..., t] + gamma * next_v - values[..., t]
        last = (delta + gamma * lam * last) * mask[..., t]
        adv[..., t] = last
    return adv, (adv + values) * mask


def ppo_policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor, clip: float,
                    denom=None):
    """PPO-clip: L = -mean_t min(rho_t A_t, clip(rho_t, 1-eps, 1+eps) A_t), rho_t = exp(logp_t - old_logp_t)
    (log rho_t clamped, see ``ratio_from_log``). Returns (loss, fraction of tokens where the clip was active).
    ``denom``: the token count of the mean (default: this batch's; see ``token_denominator``)."""
    ratio = ratio_from_log(logp - old_logp)
    unclipped, clipped = ratio * adv, torch.clamp(ratio, 1 - clip, 1 + clip) * adv
    loss = -masked_mean(torch.min(unclipped, clipped), mask, denom=denom)
    clipfrac = masked_mean((clipped < unclipped).float(), mask)
    return loss, clipfrac


def ppo_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
                   clip: float, denom=None):
    """Clipped value loss: 0.5 * mean_t max((V - R)^2, (clip(V, V_old - eps, V_old + eps) - R)^2)."""
    clipped = old_values + torch.clamp(values - old_values, -clip, clip)
    loss = 0.5 * masked_mean(torch.max((values - returns) ** 2, (clipped - returns) ** 2), mask, denom=denom)
    clipfrac = masked_mean(((values - returns) ** 2 < (clipped - returns) ** 2).float(), mask)
    return loss, clipfrac


class AdaptiveKL:
    """Adaptive KL coefficient (Ziegler et al. 2019):
    beta <- beta * (1 + clip(KL/target - 1, -0.2, 0.2) * n/horizon)."""

    def __init__(self, init: float, target: float | None, horizon: int):
        self.value, self.target, self.horizon = init, target, horizon

    def update(self, kl: float, n_steps: int) -> float:
        if self.target:
            error = max(-0.2, min(0.2, kl / self.target - 1))
            self.value *= 1 + error * n_steps / self.horizon
        return self.value


def kl_penalised_rewards(score: torch.Tensor, logp: torch.Tensor, logp_ref: torch.Tensor, mask: torch.Tensor,
                         kl_coef: float) -> torch.Tensor:
    """Per-token rewards of RLHF-PPO: -kl_coef * (logp_t - logp_ref_t) on every token, + score on the last one."""
    rewards = -kl_coef * (logp - logp_ref) * mask
    last = (mask.cumsum(-1) == mask.sum(-1, keepdim=True)) & mask.bool()
    return rewards + last * score.unsqueeze(-1)


# ------------------------------------------------------------------------------------------------------------- P3O
def p3o_loss(logratio_1: torch.Tensor, logratio_2: torch.Tensor, r1: torch.Tensor, r2: torch.Tensor, clip: float,
             variant: str = "separate") -> torch.Tensor:
    """P3O (Wu et al. 2023, arXiv 2310.00212): pairwise PPO on two samples of one prompt, A = (r1 - r2)/2,
    rho_i = pi(y_i|x)/pi_old(y_i|x) (whole-sequence ratios; ``logratio_i`` = log rho_i).

    V1, ``separate``: J = min(rho1 A, clip(rho1) A) + min(rho2 (-A), clip(rho2) (-A))
    V2, ``joint``:    J = min(R A, clip(R) A),  R = rho1 / rho2 — a reconstruction from the paper's description
                      ("clip the ratio of ratios"); its exact equation was not available to us.
    Both have the pairwise policy gradient (r1 - r2) grad(log pi(y1) - log pi(y2)) / 2 at theta = theta_old.
    The ratios are whole-sequence and can overflow float32: their logs are clamped (``ratio_from_log``), so the loss
    and its gradient stay finite for any input. Returns per-pair losses -J."""
    adv = (r1 - r2) / 2
    if variant == "separate":
        rho1, rho2 = ratio_from_log(logratio_1), ratio_from_log(logratio_2)
        j1 = torch.min(rho1 * adv, torch.clamp(rho1, 1 - clip, 1 + clip) * adv)
        j2 = torch.min(rho2 * -adv, torch.clamp(rho2, 1 - clip, 1 + clip) * -adv)
        return -(j1 + j2)
    if variant == "joint":
        ratio = ratio_from_log(logratio_1 - logratio_2)
        return -torch.min(ratio * adv, torch.clamp(ratio, 1 - clip, 1 + clip) * adv)
    raise ValueError(f"unknown P3O variant {variant!r}")


# ----------------------------------------------------------------------------------------------------------- ReMax
def remax_returns(logp: torch.Tensor, logp_ref: torch.Tensor, mask: torch.Tensor, reward: torch.Tensor,
                  reward_greedy: torch.Tensor, kl_coef: float, gamma: float, clip: float | None) -> torch.Tensor:
    """ReMax returns as in the official code (liziniu/ReMax ``compute_returns``):

        dr  = clip(r(x, y) - r(x, y_greedy), -clip, clip)      (clip after the baseline; None = no clip)
        R_t = kl_coef * (logp_ref_t - logp_t) + dr * gamma^(T - t),   t = 0..T-1 over the response (T its length)

    The per-token KL term is not accumulated. gamma = 1, kl_coef = 0, clip = None give the paper's plain
    REINFORCE-with-greedy-baseline return r(x, y) - r(x, y_greedy) on every token."""
    dr = reward - reward_greedy
    if clip is not None:
        dr = dr.clamp(-clip, clip)
    T = mask.sum(-1, keepdim=True)
    pos = torch.arange(mask.shape[-1], device=mask.device).expand_as(mask)
    discount = gamma ** (T - pos).clamp(min=0)
    return (kl_coef * (logp_ref - logp) + dr.unsqueeze(-1) * discount) * mask


def remax_loss(logp: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, denom=None) -> torch.Tensor:
    """L = -sum_t R_t logp_t mask_t / sum mask (R under no_grad), the official ``compute_loss``. ``denom`` replaces
    sum mask (see ``token_denominator``)."""
    return -(returns.detach() * logp * mask).sum() / (mask.sum().clamp(min=1) if denom is None else denom)


def token_denominator(mask: torch.Tensor, all_sum=None, world: int = 1) -> torch.Tensor:
    """The token count that makes a per-process token mean average to the global one under data parallelism.

    Each of W processes holds n_r of the batch's N tokens; DDP / ZeRO / FSDP average the processes' gradients. With
    per-process means sum_r / n_r the average weights a token by 1 / (W n_r), not 1 / N: processes with shorter
    responses count more. With the denominator N / W every process contributes sum_r * W / N and the average is
    sum / N, the single-process loss (TRL's GRPO normalises by the global token count the same way)."""
    n = mask.sum() if all_sum is None else all_sum(mask.sum())
    return (n / world).clamp(min=1)


# ------------------------------------------------------------------------------------------------------------ SALSA
def soup(state_dicts: Sequence[dict], weights: Sequence[float]) -> dict:
    """Weight-space average sum_i w_i theta_i of models with identical parameter names and shapes (SALSA, Chegini et
    al. 2024: a soup of SFT models as the KL reference). Weights must sum to 1."""
    if len(state_dicts) != len(weights) or len(state_dicts) < 2:
        raise ValueError("a soup needs at least two models and one weight per model")
    if not math.isclose(sum(weights), 1.0, abs_tol=1e-6):
        raise ValueError(f"soup weights must sum to 1, got {sum(weights)}")
    keys = set(state_dicts[0])
    for i, sd in enumerate(state_dicts[1:], 1):
        if set(sd) != keys:
            raise ValueError(f"model {i + 1} has different parameters than model 1")
        for k in keys:
            if sd[k].shape != state_dicts[0][k].shape:
                raise ValueError(f"parameter {k}: shape {tuple(sd[k].shape)} differs from "
                                 f"{tuple(state_dicts[0][k].shape)}")
    out = {}
    for k in state_dicts[0]:
        ref = state_dicts[0][k]
        if not ref.is_floating_point():
            out[k] = ref.clone()
            continue
        out[k] = sum(w * sd[k].double() for w, sd in zip(weights, state_dicts)).to(ref.dtype)
    return out


# --------------------------------------------------------------------------------------------- reward ensembles
def aggregate_ensemble(scores: torch.Tensor, method: str, uwo_lambda: float = 0.5, ddof: int = 0) -> torch.Tensor:
    """Coste et al. 2023 (arXiv 2310.02743) over member scores ``scores`` (k, n):
    mean; WCO = min over members; UWO = mean - lambda * Var over members. ``ddof`` picks the variance estimator:
    0 (population, the authors' best-of-n code) or 1 (unbiased, their PPO code); aligntool defaults to 0."""
    if method == "mean":
        return scores.mean(0)
    if method == "wco":
        return scores.min(0).values
    if method == "uwo":
        return scores.mean(0) - uwo_lambda * scores.var(0, correction=ddof)
    raise ValueError(f"unknown aggregate {method!r}")


def best_of_n_unbiased(proxy: Sequence[float], gold: Sequence[float], n: int) -> tuple[float, float]:
    """Unbiased estimate of E[score of the best of n] from N >= n samples (Coste et al., ``bon_sampling.py``):
    sort by proxy score ascending; E = sum_{i=n..N} C(i-1, n-1) / C(N, n) * score_(i), for proxy and gold alike.
    Returns (expected proxy score, expected gold score) of the proxy-selected best of n."""
    N = len(proxy)
    if not 1 <= n <= N:
        raise ValueError(f"n must be in 1..{N}, got {n}")
    order = sorted(range(N), key=lambda i: proxy[i])
    total = math.comb(N, n)
    weights = [math.comb(i - 1, n - 1) / total for i in range(1, N + 1)]  # 0 for i < n
    return (sum(w * proxy[j] for w, j in zip(weights, order)), sum(w * gold[j] for w, j in zip(weights, order)))


# ------------------------------------------------------------------------------------------------------ REINFORCE++
# Hu 2025, "REINFORCE++: A Simple and Efficient Approach for Aligning Large Language Models" (arXiv 2501.03262), as
# OpenRLHF implements it (github.com/OpenRLHF/OpenRLHF at 3c3be62: openrlhf/models/utils.py compute_approx_kl /
# compute_reward, openrlhf/trainer/ppo_utils/experience_maker.py compute_advantages_and_returns /
# get_cumulative_returns; the policy loss is ppo_policy_loss above, OpenRLHF's PolicyLoss).
KL_CLAMP = 10.0  # OpenRLHF clamps every per-token KL estimate to [-10, 10]


def kl_estimate(logp: torch.Tensor, logp_ref: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token KL(pi || pi_ref) estimates of the sampled tokens (Schulman's k1 / k2 / k3, OpenRLHF
    ``compute_approx_kl``), with d = log pi - log pi_ref:

        k1 = d,   k2 = d^2 / 2,   k3 = exp(-d) - 1 + d,   each clamped to [-10, 10]."""
    dtype = torch.promote_types(logp.dtype, torch.float32)  # bf16 log-probs upcast, as OpenRLHF's .float()
    d = logp.to(dtype) - logp_ref.to(dtype)
    if estimator == "k1":
        kl = d
    elif estimator == "k2":
        kl = d**2 / 2.0
    elif estimator == "k3":
        kl = (-d).exp() - 1 + d
    else:
        raise ValueError(f"unknown KL estimator {estimator!r}")
    return kl.clamp(-KL_CLAMP, KL_CLAMP)


def group_baseline(score: torch.Tensor, n: int) -> torch.Tensor:
    """REINFORCE++-baseline (OpenRLHF ``reinforce_baseline``): r_i - mean of the n rewards of its prompt. Rows
    n*j .. n*j + n - 1 share prompt j."""
    if score.numel() % n:
        raise ValueError(f"{score.numel()} rewards do not split into groups of {n}")
    groups = score.reshape(-1, n)
    return (groups - groups.mean(-1, keepdim=True)).reshape(-1)


def reinforce_pp_token_rewards(score: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float,
                               reward_clip: float | None = 10.0) -> torch.Tensor:
    """Token-level rewards (OpenRLHF ``compute_reward``; paper eq. for r(s_t, a_t)):

        r_t = 1[t = last response token] * clip(r(x, y), -c, c) - kl_coef * KL_t

    ``kl`` is the per-token estimate (``kl_estimate``; zeros when the KL is a loss term instead); a negative kl_coef
    counts as 0, as in OpenRLHF. Masked positions get 0 (OpenRLHF masks them in ``get_cumulative_returns``)."""
    kl_coef = max(kl_coef, 0.0)
    if reward_clip is not None:
        score = score.clamp(-reward_clip, reward_clip)
    last = (mask.cumsum(-1) == mask.sum(-1, keepdim=True)) & mask.bool()
    return (last * score.unsqueeze(-1).to(kl.dtype) - kl_coef * kl) * mask


def discounted_returns(rewards: torch.Tensor, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """G_t = sum_{s >= t} gamma^(s - t) r_s over the response (OpenRLHF ``get_cumulative_returns``: the returns are
    the advantages before normalisation). Masked rewards count as 0."""
    rewards = rewards * mask
    returns = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[..., 0])
    for t in reversed(range(rewards.shape[-1])):
        running = rewards[..., t] + gamma * running
        returns[..., t] = running
    return returns


def global_normalize(adv: torch.Tensor, mask: torch.Tensor, all_sum=None, std: bool = True) -> torch.Tensor:
    """REINFORCE++'s global advantage normalisation (OpenRLHF, end of ``compute_advantages_and_returns``): over every
    response token of the global batch,

        A <- (A - mean) * rsqrt(max(var, 1e-8)),   mean, var over the masked tokens (population variance)

    (``std=False``: A - mean only, OpenRLHF's ``--algo.advantage.no_std_norm``). OpenRLHF's driver holds the whole
    batch; here ``all_sum`` (a sum over processes, the engine's ``all_sum``) gives every process the global batch's
    statistics. Masked positions get 0."""
    total = all_sum or (lambda t: t)
    dtype = torch.promote_types(adv.dtype, torch.float32)
    adv, mask = adv.to(dtype), mask.to(dtype)
    count = total(mask.sum())
    mean = total((adv * mask).sum()) / count
    out = adv - mean
    if std:
        var = total(((adv - mean) ** 2 * mask).sum()) / count
        out = out * var.clamp(min=1e-8).rsqrt()
    return out * mask
