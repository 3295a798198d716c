"""Small tensor helpers the online methods share: a finiteness guard, the sequence KL of a rollout, minibatch indices.
(The KL controller and the losses themselves are in aligntool.losses.online.)"""

from __future__ import annotations

import torch


def check_finite(*tensors: torch.Tensor) -> None:
    """Raise FloatingPointError if any tensor (None skipped) holds a NaN or an infinity: the engine turns it into
    "training diverged" with the last checkpoint kept."""
    for t in tensors:
        if t is not None and not bool(torch.isfinite(t).all()):
            raise FloatingPointError("non-finite")


def sequence_kl(ro) -> torch.Tensor:
    """Per row of a Rollout (aligntool.online.rollout): the sum over response tokens of log pi - log pi_ref (needs
    ``ro.logp`` and ``ro.logp_ref``)."""
    return ((ro.logp - ro.logp_ref) * ro.mask).sum(-1)


def minibatches(n: int, size: int, generator: torch.Generator):
    """Row indices 0..n-1 in the generator's random order, in chunks of ``size`` (the last may be shorter)."""
    perm = torch.randperm(n, generator=generator)
    for i in range(0, n, size):
        yield perm[i : i + size]


def on_generated(mask: torch.Tensor, fn, *args):
    """``fn(*args)`` run over the tokens the policy generated only: every (B, R) tensor argument (the mask included)
    has each row's generated tokens moved to the front, in order, ``fn`` runs on that, and its (B, R) results are put
    back, 0 at the inserted positions (tool replies, role markers). A token-level recursion (discounted returns, GAE,
    ReMax's discount) then steps from one generated token to the next: inserted tokens are no steps of the MDP but
    part of the environment's transition. A mask without holes (single-turn rollouts) runs ``fn`` as it is."""
    m = mask.bool()
    if not (m[:, 1:] & ~m[:, :-1]).any():  # no 0 before a 1: nothing inserted
        return fn(*args)
    order = torch.argsort((~m).to(torch.int8), dim=-1, stable=True)  # generated positions first, in their order
    moved = [a.gather(-1, order) if isinstance(a, torch.Tensor) and a.shape == mask.shape else a for a in args]
    out = fn(*moved)

    def back(t):
        return torch.zeros_like(t).scatter(-1, order, t) * mask

    return tuple(back(t) for t in out) if isinstance(out, tuple) else back(out)
