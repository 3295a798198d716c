"""Supervised losses that TRL's SFTTrainer does not implement.

Inputs are per-sequence log-probabilities ``logp = log p_hat(y | x)``: the sum of the token log-probs of the
completion (positions whose label is not -100). Functions return per-example values (no reduction).
"""

from __future__ import annotations

import math

import torch

# log p_hat is clamped to at most -LOGP_EPS (in float64) before log(1 - p_hat): p_hat = 1 exactly would give
# log(0). Only sequences with p_hat > 1 - 1e-12 are affected, where the DCO gradient factor is ~0 anyway for N > 1.
LOGP_EPS = 1e-12


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, accurate on the whole range (Maechler 2012, "Accurately Computing
    log(1 - exp(-|a|))"): log(-expm1(x)) for x > -log 2, log1p(-exp(x)) below."""
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def dco_loss(logp: torch.Tensor, n: int) -> torch.Tensor:
    """Direct Coverage Optimization loss (Chen, Raventós, Cheng, Ganguli, Druckmann 2025, "Rethinking Fine-Tuning
    when Scaling Test-Time Compute: Limiting Confidence Improves Mathematical Reasoning", arXiv 2502.07154, Sec. 4,
    the loss l_DCO^N and its gradient; the authors' blog: druckmann-lab.github.io, 2025-03-07):

        l_DCO^N(x, y) = -log(1 - (1 - p_hat(y|x))^N)

    minus the log-probability that at least one of N independent samples is the demonstration y, i.e. the negative
    log pass@N coverage of y. Its gradient is the cross-entropy gradient (of l_CE = -log p_hat) scaled per example:

        grad l_DCO^N = F(N, p_hat) * grad l_CE,   F(N, p) = N p (1 - p)^(N-1) / (1 - (1 - p)^N)

    F = 1 for N = 1 (DCO = CE), F -> 1 as p -> 0, and F -> 0 once p >> 1/N: confident examples stop being pushed.

    Computed stably through 1 - (1 - p)^N = p * sum_{k=0}^{N-1} (1 - p)^k:

        l_DCO^N = -(logp + logsumexp_{k=0}^{N-1} k * log1mexp(logp))

    in float64, exact for every p in (0, 1] (no cancellation when p is tiny, no log(0) when p -> 1, with
    logp clamped to <= -LOGP_EPS inside log(1 - p)). ``logp``: per-sequence log p_hat, any shape; returns the same
    shape and dtype."""
    if n < 1:
        raise ValueError(f"pass_n must be >= 1, got {n}")
    x = logp.double()
    log_q = log1mexp(x.clamp(max=-LOGP_EPS))  # log(1 - p_hat)
    k = torch.arange(n, dtype=torch.float64, device=logp.device)
    return (-(x + torch.logsumexp(log_q.unsqueeze(-1) * k, dim=-1))).to(logp.dtype)


def dco_gradient_factor(logp: torch.Tensor, n: int) -> torch.Tensor:
    """F(N, p_hat) = N p (1 - p)^(N-1) / (1 - (1 - p)^N), the factor that scales the CE gradient in DCO (see
    ``dco_loss``), from log p_hat, without gradient: for logging how many examples still learn."""
    with torch.no_grad():
        x = logp.double()
        log_q = log1mexp(x.clamp(max=-LOGP_EPS))
        k = torch.arange(n, dtype=torch.float64, device=logp.device)
        log_cover_over_p = torch.logsumexp(log_q.unsqueeze(-1) * k, dim=-1)  # log((1 - q^N) / p)
        return torch.exp(math.log(n) + (n - 1) * log_q - log_cover_over_p).to(logp.dtype)
