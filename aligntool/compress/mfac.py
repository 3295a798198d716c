"""M-FAC second-order saliency for unstructured sparsity (Frantar, Kurtic & Alistarh, "M-FAC: Efficient Matrix-Free
Approximations of Second-Order Information", NeurIPS 2021, arXiv 2107.03356; authors' code `IST-DASLab/M-FAC`,
``prun.py`` / ``main_prun.py``).

The Hessian of the loss is approximated by the damped empirical Fisher over ``m`` per-sample gradients ``g_i``
(the paper's Eq. 1, with the dampening its static algorithm starts from)::

    F = lambda * I + (1/m) * sum_i g_i g_i^T

and its inverse is never formed: the static algorithm (Sec. 3) applies Sherman-Morrison once per gradient,
``F_0^{-1} = I / lambda`` and ``F_i^{-1} = F_{i-1}^{-1} - F_{i-1}^{-1} g_i g_i^T F_{i-1}^{-1} / (m + g_i^T
F_{i-1}^{-1} g_i)``, keeping only the vectors ``v_i = F_{i-1}^{-1} g_i`` and the scalars ``c_i = m + g_i^T v_i``
(O(d m^2) to precompute). Then::

    F^{-1} x      = x / lambda - sum_i (v_i^T x / c_i) v_i          (IHVP, O(d m))
    [F^{-1}]_jj   = 1 / lambda - sum_i v_ij^2 / c_i                 (one diagonal element, O(m))

Optimal Brain Surgeon with this inverse: removing weight ``j`` costs ``rho_j = w_j^2 / (2 [F^{-1}]_jj)`` and the
best compensation of the other weights is ``delta_w = -(w_j / [F^{-1}]_jj) F^{-1} e_j``.

Blocks (as the authors' ``HInvFastBlock``): a layer's ``[out, in]`` weight is flattened row-major and cut into blocks of
``B`` consecutive weights (the last block holds the remainder); ``F`` is block-diagonal, one M-FAC inverse per block,
all blocks of a layer computed at once as a batch: never ``d^2``. Memory: the ``m`` gradients of every compressed
layer are held at once (4 m bytes per compressed weight), and as much again for the inverses when the OBS update is
on: with m = 32, about 3 GB for the 27.6 M-parameter toy model, 128 GB or more for a 1 B model (``aligntool compress``
logs the estimate; collecting the gradients a few layers at a time is not done yet).

Many weights at once: the authors' pruner (``MFACPruner.prune``) ranks all weights by ``rho``, drops the lowest
``k`` and applies the *sum* of their single-weight OBS updates, ``delta_w = F^{-1} sum_{j in drop} (-w_j /
[F^{-1}]_jj) e_j``, then sets the dropped weights to exactly 0 (the joint OBS solution would need
``(E^T F^{-1} E)^{-1}`` over all dropped weights). We do the same, once per level, from the dense weights. Where the
authors' code leaves a choice, ours: (a) ranking per layer, over the whole layer (like our Wanda ranking, so that
each EvoPress level prunes exactly ``k`` weights of the layer; the authors rank over all pruned parameters together);
(b) one shot per level from the dense model (the authors can also reach a sparsity in ``nrecomps`` steps,
recomputing the gradients at the pruned model each time -- that needs a backward pass per step and per level, and
EvoPress's database holds independent per-layer variants of the dense model); (c) the damping is relative:
``lambda = damp * mean_j F_jj`` of the layer's undamped empirical Fisher (the authors' ``1e-5`` is an absolute
value tuned for ResNets; gradient scales differ by orders of magnitude between models and layers, so a relative
value -- as SparseGPT's ``percdamp`` -- lets one default fit any model); (d) gradients: one per calibration window,
of the mean next-token cross-entropy of that window.
"""

from __future__ import annotations

import torch

from aligntool.compress.layers import Layer
from aligntool.compress.levels import SparsitySpace


class BlockFisherInverse:
    """Blockwise M-FAC inverse of ``F = lambda I + (1/m) sum_i g_i g_i^T`` (static algorithm, Sec. 3 of the paper).

    ``grads``: ``[m, d]`` per-sample gradients; ``block``: weights per block (``F`` block-diagonal over consecutive
    blocks of ``block`` coordinates, the last one holding ``d % block``); ``damp``: the absolute ``lambda``.
    Stores per block ``v_i = F_{i-1}^{-1} g_i`` (``[blocks, m, B]``) and ``c_i = m + g_i^T v_i`` (``[blocks, m]``)."""

    def __init__(self, grads: torch.Tensor, block: int, damp: float, dtype: torch.dtype = torch.float32):
        if grads.dim() != 2:
            raise ValueError(f"grads must be [m, d], got shape {tuple(grads.shape)}")
        if block < 1 or not damp > 0:
            raise ValueError(f"block must be >= 1 and damp > 0, got {block} and {damp}")
        self.m, self.d = grads.shape
        self.block, self.damp = block, float(damp)
        full = self.d // block * block
        self.parts = []  # (start, length, V [b, m, B], c [b, m])
        if full:
            self.parts.append((0, full, *self._precompute(grads[:, :full].to(dtype).reshape(self.m, -1, block))))
        if full < self.d:
            rest = grads[:, full:].to(dtype).reshape(self.m, 1, -1)
            self.parts.append((full, self.d - full, *self._precompute(rest)))

    def _precompute(self, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Sherman-Morrison over the ``m`` gradients of every block at once; ``g``: ``[m, b, B]``."""
        g = g.transpose(0, 1).contiguous()  # [b, m, B]
        b, m, _ = g.shape
        v = torch.empty_like(g)
        c = torch.empty(b, m, dtype=g.dtype)
        for i in range(m):
            gi = g[:, i]
            vi = gi / self.damp
            if i:
                coef = torch.bmm(v[:, :i], gi.unsqueeze(-1)).squeeze(-1) / c[:, :i]  # (v_k^T g_i) / c_k, [b, i]
                vi = vi - torch.bmm(coef.unsqueeze(1), v[:, :i]).squeeze(1)
            v[:, i] = vi
            c[:, i] = m + (gi * vi).sum(-1)
        return v, c

    def mul(self, x: torch.Tensor) -> torch.Tensor:
        """The IHVP ``F^{-1} x = x / lambda - sum_i (v_i^T x / c_i) v_i``, block by block; ``x``: ``[d]``."""
        out = torch.empty(self.d, dtype=self.parts[0][2].dtype)
        x = x.reshape(-1).to(out.dtype)
        for start, length, v, c in self.parts:
            xb = x[start: start + length].reshape(v.shape[0], -1)
            coef = torch.bmm(v, xb.unsqueeze(-1)).squeeze(-1) / c
            out[start: start + length] = (xb / self.damp - torch.bmm(coef.unsqueeze(1), v).squeeze(1)).reshape(-1)
        return out

    def diag(self) -> torch.Tensor:
        """``[F^{-1}]_jj = 1 / lambda - sum_i v_ij^2 / c_i`` for every ``j``."""
        return torch.cat([(1 / self.damp - (v * v / c.unsqueeze(-1)).sum(1)).reshape(-1)
                          for _, _, v, c in self.parts])


def obs_saliency(w: torch.Tensor, inv_diag: torch.Tensor) -> torch.Tensor:
    """OBS cost of removing each weight alone: ``rho_j = w_j^2 / (2 [F^{-1}]_jj)`` (flattened)."""
    w = w.reshape(-1).to(inv_diag.dtype)
    return w * w / (2 * inv_diag)


def obs_update(w: torch.Tensor, drop: torch.Tensor, inv: BlockFisherInverse,
               inv_diag: torch.Tensor | None = None) -> torch.Tensor:
    """The authors' multi-weight OBS step: ``w + F^{-1} sum_{j in drop} (-w_j / [F^{-1}]_jj) e_j`` with the dropped
    weights then set to exactly 0. For one dropped weight this is OBS's ``delta_w = -(w_j / [F^{-1}]_jj) F^{-1} e_j``.
    ``drop``: flat indices (or a flat bool mask) of the pruned weights; returns ``w``'s shape in the inverse's
    dtype."""
    diag = inv.diag() if inv_diag is None else inv_diag
    flat = w.reshape(-1).to(diag.dtype)
    x = torch.zeros_like(flat)
    x[drop] = -flat[drop] / diag[drop]
    out = flat + inv.mul(x)
    out[drop] = 0
    return out.view(w.shape)


def layer_gradients(model, layers: dict[str, Layer], windows: torch.Tensor) -> dict[str, torch.Tensor]:
    """One gradient per window: ``d loss / d W`` of each layer's ``[out, in]`` weight, flattened (``[m, numel]``,
    float32), with ``loss`` the window's mean next-token cross-entropy. Only the parameters holding the layers require
    a gradient meanwhile; the model's ``requires_grad`` flags are restored after."""
    params = dict(model.named_parameters())
    flags = {n: p.requires_grad for n, p in params.items()}
    holders = {x.key for x in layers.values()}
    for n, p in params.items():
        p.requires_grad_(n in holders)
    out = {n: torch.empty(len(windows), x.numel) for n, x in layers.items()}
    try:
        for i, ids in enumerate(windows):
            for p in params.values():
                p.grad = None
            ids = ids.unsqueeze(0)
            model(input_ids=ids, labels=ids).loss.backward()
            for n, x in layers.items():
                g = params[x.key].grad
                if g is None:  # the layer's output never reached the loss (an expert no token was routed to)
                    out[n][i].zero_()
                    continue
                g = g[x.expert] if x.expert is not None else g
                out[n][i] = (g.T if x.transposed else g).reshape(-1).float()
    finally:
        for n, p in params.items():
            p.grad = None
            p.requires_grad_(flags[n])
    return out


def relative_damp(grads: torch.Tensor, damp: float) -> float:
    """``lambda = damp * mean_j (1/m) sum_i g_ij^2`` (the mean diagonal of the undamped empirical Fisher); ``damp``
    itself when the gradients are all zero."""
    mean = float((grads.double() ** 2).mean())
    return damp * mean if mean > 0 else damp


class MFACSparsitySpace(SparsitySpace):
    """EvoPress's sparsity database with the M-FAC ranking: level ``l`` of layer ``i`` prunes the ``k_i(l)`` weights
    of lowest ``rho_j = w_j^2 / (2 [F^{-1}]_jj)``; with ``update`` the kept weights take the OBS step of
    ``obs_update`` for exactly that level's pruned set (computed the first time the level is asked for, then cached
    in the layer's dtype; the layer's inverse, ``m`` x its size, is kept meanwhile). ``grads`` is emptied as the
    layers are processed (each layer's gradients are freed once its inverse exists)."""

    def __init__(self, layers: dict[str, Layer], grads: dict[str, torch.Tensor], sparsity: float, num_levels: int,
                 step: int | None, hidden_size: int | None, block: int, damp: float, update: bool):
        scores, self._inverses, self._updated = {}, {}, {}
        for name, x in layers.items():
            w = x.weight().detach()
            g = grads.pop(name)
            inv = BlockFisherInverse(g, min(block, x.numel), relative_damp(g, damp))
            del g
            diag = inv.diag()
            scores[name] = obs_saliency(w, diag).view(w.shape)
            if update:
                self._inverses[name] = (inv, diag)
        super().__init__(layers, {}, sparsity, num_levels, step, hidden_size, scores=scores)
        self.update = update

    def weights(self, i, level):
        if not self.update:
            return super().weights(i, level)
        name = self.units[i].name
        if (i, level) not in self._updated:
            inv, diag = self._inverses[name]
            w = self.dense[name][0]
            new = obs_update(w, self.order[name][: self.pruned(i, level)].long(), inv, diag)
            self._updated[i, level] = new.to(w.dtype)
        return {name: self._updated[i, level]}
