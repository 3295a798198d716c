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
