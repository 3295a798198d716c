"""COSMOS: SOAP on the leading eigensubspace of each hidden weight matrix's gradient, Muon on the rest, Adam elsewhere.

Liu et al., "COSMOS: A Hybrid Adaptive Optimizer for Memory-Efficient Training of LLMs", 2025 (arXiv 2502.17410);
the update rule below follows the authors' code, github.com/lliu606/COSMOS (COSMOS_optim.py), step for step.
"""

from __future__ import annotations

import math

import torch
from torch.optim import Optimizer

from aligntool.optim.lion_kappa import closure_loss

# the authors' rule when the vocabulary size is unknown: matrices with more rows than this are embeddings / heads
AUTHORS_MAX_ROWS = 10000


def newton_schulz(g: torch.Tensor, steps: int = 5, eps: float = 1e-7, bf16: bool | None = None) -> torch.Tensor:
    """Approximate orthogonalisation U V^T of ``g = U S V^T`` by the quintic Newton-Schulz iteration of Muon (Jordan
    et al. 2024, github.com/KellerJordan/Muon), as COSMOS uses it for the residual (the paper's Muon part):

        X_0 = g / (||g||_F + eps);  X_{k+1} = a X_k + b (X_k X_k^T) X_k + c (X_k X_k^T)^2 X_k,
        (a, b, c) = (3.4445, -4.7750, 2.0315),

    on the wide orientation (transposed when rows > columns). The coefficients trade exactness for speed: the
    singular values come out near 1 (roughly 0.7 to 1.2), not exactly 1. ``bf16``: iterate in bfloat16 (the authors'
    choice); False: in ``g``'s dtype; None: bfloat16 on GPUs, ``g``'s dtype on CPUs (where bfloat16 matrix products
    are slow). Returns ``g``'s dtype."""
    if g.dim() != 2:
        raise ValueError(f"newton_schulz expects a matrix, got shape {tuple(g.shape)}")
    a, b, c = 3.4445, -4.7750, 2.0315
    if bf16 is None:
        bf16 = g.is_cuda
    x = g.to(torch.bfloat16) if bf16 else g.clone()
    x = x / (x.norm() + eps)
    tall = g.size(0) > g.size(1)
    if tall:
        x = x.T
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    if tall:
        x = x.T
    return x.to(g.dtype)


def cosmos_role(shape: tuple[int, ...], rank: int, vocab_size: int | None) -> str:
    """Which rule trains a parameter of ``shape``: ``"cosmos"`` (hidden weight matrices) or ``"adam"`` (1-D weights,
    vectors stored as 1 x n / n x 1 matrices, and -- as in the authors' code -- embeddings and the output head: 2-D
    weights with a dimension equal to ``vocab_size``, or, when that is unknown, with more than 10000 rows, the
    authors' own test). Raises ValueError when ``rank`` exceeds a hidden matrix's smaller dimension."""
    if len(shape) != 2 or min(shape) == 1:
        return "adam"
    if (vocab_size in shape) if vocab_size else shape[0] > AUTHORS_MAX_ROWS:
        return "adam"
    if rank > min(shape):
        raise ValueError(f"rank {rank} is larger than the smaller dimension of a {list(shape)} matrix")
    return "cosmos"


class Cosmos(Optimizer):
    r"""COSMOS (Liu et al. 2025, Algorithm 1: SOAP on the leading eigensubspace, Muon on the remaining one; where
    the paper's Algorithm 1 and the released code differ in details -- momentum normalisation, Nesterov, where eps
    sits -- we follow the code), exactly as the authors' code updates a hidden weight matrix W (m x n, n the input
    dimension, nn.Linear layout) with gradient G at step t (beta1, beta2 = ``betas``; r = ``rank``):

    first moment and subspace (one power-iteration step on the EMA of G^T G, tracked in the basis P (n x r) with its
    r x r core S):
        M   <- beta1 M + G
        t=1: P = the r leading eigenvectors of G^T G,   S = (1 - beta2) (G P)^T (G P)
        t>1: P' = QR(beta2 P S + (1 - beta2) G^T G P).Q,  T = P^T P',
             S  <- beta2 T^T S T + (1 - beta2) (G P')^T (G P'),  P <- P'
        V   <- beta2 V + (1 - beta2) (G P)^2                 (m x r, element-wise square)
    the direction (bias-corrected Nesterov momentum; c1 = sum_{i<t} beta1^i, c2 = 1 - beta2^t):
        G~  = (G + beta1 M) / (1 + beta1 c1)    (nesterov; else M / c1)
        A   = ((G~ P) / (sqrt(V / c2) + eps)) P^T           (SOAP, Adam in the eigenbasis, on the subspace)
        B   = NS5(G~ - G~ P P^T);  B <- sqrt(mn) B / ||B||_F (Muon on the rest)
        D   = A + gamma B
    the step (decoupled weight decay; the hidden rate is lr * lr_ratio, per-entry RMS of the step lr * lr_ratio):
        W   <- (1 - lr wd) W - lr * lr_ratio * sqrt(mn) D / (||D||_F + eps)

    Every other parameter (1-D, embeddings, output head; see ``cosmos_role``) gets AdamW at rate ``lr`` with
    ``adam_betas`` (default: ``betas``). Our one deviation from the authors' code, a choice: their Adam branch adds
    0.1 g to the first moment and bias-corrects it with 1 - 0.9^t whatever beta1 is (AdamW only when beta1 = 0.9);
    ours is AdamW proper, (1 - beta1) g and 1 - beta1^t. We also leave ``p.grad`` untouched (theirs overwrites it
    with G~). State per hidden m x n matrix: M (m n) + V (m r) + P (n r) + S (r r), against Adam's 2 m n.

    ``vocab_size``: 2-D parameters with a dimension of this size go to Adam (the authors route matrices with more than
    10000 rows, i.e. the vocabulary ones at LLM scale, to Adam; with ``vocab_size=None`` we apply that rule)."""

    def __init__(self, params, lr: float = 2e-3, betas: tuple[float, float] = (0.95, 0.95), eps: float = 1e-8,
                 weight_decay: float = 0.0, rank: int = 64, gamma: float = 0.2, lr_ratio: float = 0.2,
                 nesterov: bool = True, ns_steps: int = 5, ns_bf16: bool | None = None, vocab_size: int | None = None,
                 adam_betas: tuple[float, float] | None = None):
        if lr <= 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        if not all(0 <= b < 1 for b in (*betas, *(adam_betas or ()))):
            raise ValueError(f"betas must be in [0, 1), got {betas} / {adam_betas}")
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, rank=rank, gamma=gamma,
                        lr_ratio=lr_ratio, nesterov=nesterov, ns_steps=ns_steps, ns_bf16=ns_bf16,
                        vocab_size=vocab_size, adam_betas=tuple(adam_betas or betas))
        super().__init__(params, defaults)
        for group in self.param_groups:  # fail at construction, not at the first step
            for p in group["params"]:
                cosmos_role(tuple(p.shape), group["rank"], group["vocab_size"])

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure_loss(closure)
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if cosmos_role(tuple(p.shape), group["rank"], group["vocab_size"]) == "cosmos":
                    self._cosmos_step(p, group)
                else:
                    self._adam_step(p, group)
        return loss

    def _adam_step(self, p, group):
        """AdamW (Loshchilov & Hutter 2019): m <- b1 m + (1-b1) g; v <- b2 v + (1-b2) g^2;
        p <- (1 - lr wd) p - lr (m / (1-b1^t)) / (sqrt(v / (1-b2^t)) + eps)."""
        g, state = p.grad, self.state[p]
        beta1, beta2 = group["adam_betas"]
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["step"] += 1
        t = state["step"]
        state["exp_avg"].mul_(beta1).add_(g, alpha=1 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(g, g, value=1 - beta2)
        denom = (state["exp_avg_sq"] / (1 - beta2 ** t)).sqrt_().add_(group["eps"])
        if group["weight_decay"]:
            p.mul_(1 - group["lr"] * group["weight_decay"])
        p.addcdiv_(state["exp_avg"], denom, value=-group["lr"] / (1 - beta1 ** t))

    def _cosmos_step(self, p, group):
        # in float32 for 16-bit weights (float64 stays float64): torch's SVD and QR have no bfloat16 / float16
        # kernels, and the eigenbasis would not survive 8 bits of mantissa anyway (the update is cast back)
        dt = torch.float32 if p.dtype in (torch.bfloat16, torch.float16) else p.dtype
        g, state = p.grad.to(dt), self.state[p]
        beta1, beta2 = group["betas"]
        r, eps = group["rank"], group["eps"]
        m, n = p.shape
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros(m, n, dtype=dt, device=p.device)  # M
            state["exp_avg_sq"] = torch.zeros(m, r, dtype=dt, device=p.device)  # V
            state["basis"] = torch.zeros(n, r, dtype=dt, device=p.device)  # P
            state["core"] = torch.zeros(r, r, dtype=dt, device=p.device)  # S
        state["step"] += 1
        t = state["step"]
        M, V, P, S = state["exp_avg"], state["exp_avg_sq"], state["basis"], state["core"]
        M.mul_(beta1).add_(g)
        if t == 1:
            eigvecs = torch.linalg.svd(g.T @ g, full_matrices=False)[0]  # G^T G is symmetric PSD: U = eigenvectors
            P.copy_(eigvecs[:, :r])
            gp = g @ P
            S.copy_((1 - beta2) * gp.T @ gp)
        else:
            new_p = torch.linalg.qr(beta2 * P @ S + (1 - beta2) * g.T @ (g @ P), mode="reduced")[0]
            rot = P.T @ new_p
            gp = g @ new_p
            S.copy_(beta2 * rot.T @ S @ rot + (1 - beta2) * gp.T @ gp)
            P.copy_(new_p)
        V.mul_(beta2).addcmul_(gp, gp, value=1 - beta2)
        c1 = (1 - beta1 ** t) / (1 - beta1)
        c2 = 1 - beta2 ** t
        g_tilde = (g + beta1 * M) / (1 + beta1 * c1) if group["nesterov"] else M / c1
        proj = g_tilde @ P
        soap = (proj / ((V / c2).sqrt() + eps)) @ P.T
        muon = newton_schulz(g_tilde - proj @ P.T, steps=group["ns_steps"], bf16=group["ns_bf16"])
        scale = math.sqrt(m * n)
        direction = soap + group["gamma"] * (scale * muon / (muon.norm() + eps))
        if group["weight_decay"]:
            p.mul_(1 - group["lr"] * group["weight_decay"])
        p.add_((direction / (direction.norm() + eps)).to(p.dtype), alpha=-group["lr"] * group["lr_ratio"] * scale)
