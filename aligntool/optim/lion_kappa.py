"""Lion-kappa: Lion with the sign replaced by the gradient of a convex kappa.

Chen, Liu, Liang, Liu, "Lion Secretly Solves Constrained Optimization: As Lyapunov Predicts", ICLR 2024
(arXiv 2310.05898); Lion itself: Chen et al., "Symbolic Discovery of Optimization Algorithms", NeurIPS 2023
(github.com/google/automl/tree/master/lion).
"""

from __future__ import annotations

import torch
from torch.optim import Optimizer

KAPPAS = ("l1", "l2")


def closure_loss(closure):
    """The loss of an optimizer's ``step(closure)``: the closure re-evaluated with gradients on, or None."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


def grad_kappa(m: torch.Tensor, kappa: str, eps: float = 1e-12) -> torch.Tensor:
    """The (sub)gradient of kappa at ``m``, per tensor.

    - ``l1``: kappa(x) = ||x||_1, grad = sign(x) (plain Lion); its conjugate is the indicator of ||x||_inf <= 1.
    - ``l2``: kappa(x) = ||x||_2, grad = x / ||x||_2 (0 at x = 0: a subgradient); conjugate: indicator of
      ||x||_2 <= 1. Both are norm examples of kappa analysed in the paper (kappa a norm: kappa* is the indicator of
      the dual-norm unit ball)."""
    if kappa == "l1":
        return torch.sign(m)
    if kappa == "l2":
        norm = torch.linalg.vector_norm(m)
        return m / norm if norm > eps else torch.zeros_like(m)
    raise ValueError(f"unknown kappa {kappa!r}; expected one of {', '.join(KAPPAS)}")


class LionKappa(Optimizer):
    r"""Lion-kappa (Chen et al., ICLR 2024, the discrete-time Lion-K update of Section 3; Lion: Chen et al. 2023,
    "Symbolic Discovery of Optimization Algorithms", Algorithm 2). Per parameter x with gradient g:

        m_tilde = beta1 * m + (1 - beta1) * g
        x      <- x - lr * (grad_kappa(m_tilde) + lambda * x)        (lambda = weight_decay, decoupled)
        m      <- beta2 * m + (1 - beta2) * g

    The paper shows (Lyapunov analysis) that this solves min_x f(x) + kappa*(x) with kappa* scaled by lambda, i.e.
    min_x f(x) + (1/lambda) kappa*(lambda x): for ``kappa="l1"`` (sign; plain Lion) the bound-constrained problem
    min f(x) s.t. ||x||_inf <= 1/lambda; for ``kappa="l2"`` (normalised momentum, per tensor)
    min f(x) s.t. ||x||_2 <= 1/lambda, with the norm taken per parameter tensor. We chose l2 as the second kappa
    because its constraint set is the other norm ball the paper analyses and its update needs no extra
    hyperparameter. State: one momentum tensor per parameter (half of Adam's)."""

    def __init__(self, params, lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.99), weight_decay: float = 0.0,
                 kappa: str = "l1", eps: float = 1e-12):
        if lr <= 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        if not all(0 <= b < 1 for b in betas):
            raise ValueError(f"betas must be in [0, 1), got {betas}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        if kappa not in KAPPAS:
            raise ValueError(f"unknown kappa {kappa!r}; expected one of {', '.join(KAPPAS)}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), weight_decay=weight_decay, kappa=kappa, eps=eps))

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure_loss(closure)
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, wd = group["lr"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                m = state["exp_avg"]
                direction = grad_kappa(m.mul(beta1).add_(g, alpha=1 - beta1), group["kappa"], group["eps"])
                if wd:
                    p.mul_(1 - lr * wd)
                p.add_(direction, alpha=-lr)
                m.mul_(beta2).add_(g, alpha=1 - beta2)
        return loss
