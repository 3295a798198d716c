"""Weight quantizers for post-training compression: bit packing, round-to-nearest (RTN) groups and JLCM codebooks.

All weights are linear-layer matrices ``W`` of shape ``[out, in]`` (``y = x W^T``); codes are stored as uint8 and
counted at their packed size.

Bit packing
    Code ``i`` occupies bits ``[i*bits, (i+1)*bits)`` of one little-endian bit stream, least significant bit first;
    the stream is cut into bytes, bit ``j`` of byte ``m`` being stream bit ``8m + j``.  ``n`` codes take
    ``ceil(n * bits / 8)`` bytes.

RTN (asymmetric min-max, one ``(scale, zero)`` pair per ``group_size`` consecutive weights of a row)
    zero  = fp16(min(w_group))
    scale = fp16((max(w_group) - min(w_group)) / (2**bits - 1)),   a zero scale is replaced by 1
    code  = clamp(round((w - zero) / scale), 0, 2**bits - 1)        (with the fp16-rounded scale and zero)
    w_hat = code * scale + zero
    bytes = ceil(out * in * bits / 8) + 2 * 2 * out * in / group_size

JLCM (Yvinec, Dapogny, Bailly, ICLR 2024, arXiv 2309.17361: jointly learnable codebooks and mappings)
    Rows (neurons) with similar weight distributions are reordered to be contiguous and split into ``groups``
    groups; each group ``g`` has its own codebook ``c_g`` of ``K = 2**bits`` values and every weight stores only
    the index ``a`` of its codeword, so ``w_hat[r, i] = c[g(r), a[r, i]]`` and group membership costs nothing
    (it is implied by the row position).  Codebooks and mapping are learned jointly on calibration inputs
    ``X [n, in]`` by minimising the layer-output error

        L = mean((X W^T - X W_hat^T)^2) = sum((E H) * E),   E = W - W_hat,   H = X^T X / (n * out)

    (``X=None``: plain weight MSE, ``H = I / (out * in)``).  Every detail below that the paper leaves open is
    our choice (the paper gives no code):

    * grouping: rows are sorted by standard deviation (ties by mean, both stable sorts) and cut into ``groups``
      contiguous chunks whose sizes differ by at most one (the first ``out % groups`` chunks get the extra row);
    * initialisation: ``c_g`` at the ``(k + 1/2) / K`` quantiles of the group's weights (at most 2**20 of them,
      subsampled with ``seed``), refined by 10 Lloyd (1-D k-means) iterations, sorted ascending;
    * mapping: a latent continuous weight ``w~`` (initialised at ``W``) carries the mapping, ``a`` = index of the
      codeword nearest to ``w~`` within its group's (sorted) codebook;
    * gradients: ``dL/dc`` is exact (scatter-add of ``dL/dW_hat = -2 E H`` over each codeword's members);
      ``w~`` gets the straight-through gradient plus a curvature pull toward its codeword,

          g~ = dL/dW_hat + 2 diag(H) * (w~ - W_hat),

      i.e. the first-order estimate of ``dL/dW`` at ``w~`` itself.  Plain STE (``g~ = dL/dW_hat``) drives every
      ``w~`` toward ``W`` from its codeword's side, i.e. onto the decision boundary, where it flips back and
      forth (in our runs the loss rose again after a few dozen steps); with the pull the stationary point is
      ``w~ = W_hat + (E H) / diag(H)`` (the error-compensated target of GPTQ / OBQ; ``W`` itself when ``H`` is
      diagonal) and the loss decreases steadily.  Both ``w~`` and ``c`` are stepped by ``torch.optim.Adam``
      with learning rate ``lr * std(W)``;
    * proximal update (the paper's idea: moves toward far codewords are damped): the Adam step ``s`` on ``w~``
      is scaled by

          rho = delta / (delta + gap),   gap = |c[a + sign(s)] - c[a]|,   delta = median_k (c[k+1] - c[k])

      per group (``rho = 0`` when there is no codeword in the step direction, ``rho = 1`` when
      ``delta + gap = 0``).  The factor scales the step rather than the gradient because Adam's per-coordinate
      normalisation would cancel a gradient scale;
    * codebooks are re-sorted after every step (Adam state permuted alike) so "neighbour" stays well defined;
    * the lowest-loss (codebook, mapping) seen is kept; its codebooks are then refit in closed form for that
      mapping, ``(sum_r A_r^T H A_r) c_g = sum_r A_r^T H w_r`` (``A_r`` the one-hot mapping of row ``r``), and
      rounded to fp16.  ``steps=0`` is this refit applied to the initial (quantile + Lloyd) solution.

    bytes = ceil(out * in * bits / 8) + 2 * groups * K + 4 * out.  The row permutation could be folded into the
    neighbouring layers (permute this layer's outputs and the next layer's inputs) to cost nothing; we store it
    for generality.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_INIT_SAMPLE = 2**20  # weights per group used to initialise a codebook
_LLOYD_ITERS = 10


# ----------------------------------------------------------------------------------------------------- bit packing
def _check_bits(bits: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ValueError(f"bits must be an integer in 1..8, got {bits!r}")


def packed_nbytes(numel: int, bits: int) -> int:
    """Bytes taken by ``numel`` codes of ``bits`` bits each: ceil(numel * bits / 8)."""
    return (numel * bits + 7) // 8


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes in [0, 2**bits) into a flat uint8 tensor, LSB-first little-endian bit stream."""
    _check_bits(bits)
    flat = codes.reshape(-1)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= 1 << bits):
        raise ValueError(f"codes must lie in [0, {1 << bits}) for bits={bits}")
    flat = flat.to(torch.uint8)
    nbytes = packed_nbytes(flat.numel(), bits)
    # uint8 bit stream (one byte per bit) keeps peak memory at numel * bits bytes
    stream = torch.zeros(nbytes * 8, dtype=torch.uint8)
    planes = stream[: flat.numel() * bits].view(-1, bits)
    for b in range(bits):
        planes[:, b] = (flat >> b) & 1
    stream = stream.view(nbytes, 8)
    packed = torch.zeros(nbytes, dtype=torch.uint8)
    for j in range(8):
        packed |= stream[:, j] << j
    return packed


def unpack_bits(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: the first ``numel`` codes as a flat uint8 tensor."""
    _check_bits(bits)
    need = packed_nbytes(numel, bits)
    packed = packed.reshape(-1)
    if packed.numel() < need:
        raise ValueError(f"packed buffer has {packed.numel()} bytes, {numel} codes of {bits} bits need {need}")
    packed = packed[:need].to(torch.uint8)
    stream = torch.empty(need, 8, dtype=torch.uint8)
    for j in range(8):
        stream[:, j] = (packed >> j) & 1
    planes = stream.view(-1)[: numel * bits].view(numel, bits)
    codes = torch.zeros(numel, dtype=torch.uint8)
    for b in range(bits):
        codes |= planes[:, b] << b
    return codes


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """Pack a boolean mask at one bit per entry."""
    return pack_bits(mask.to(torch.uint8), 1)


def unpack_mask(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack_mask`: a flat bool tensor of ``numel`` entries."""
    return unpack_bits(packed, 1, numel).bool()


def _as_matrix(weight: torch.Tensor) -> torch.Tensor:
    if weight.dim() != 2:
        raise ValueError(f"weight must be a 2-D [out, in] matrix, got shape {tuple(weight.shape)}")
    return weight.detach().float()


# ------------------------------------------------------------------------------------------------------------- RTN
@dataclass
class RTNResult:
    codes: torch.Tensor  # uint8 [out, in]
    scale: torch.Tensor  # float16 [out, in // group_size]
    zero: torch.Tensor  # float16 [out, in // group_size], the group minimum
    bits: int
    group_size: int

    def dequantize(self) -> torch.Tensor:
        """float32 [out, in] = code * scale + zero, from the stored fp16 scale and zero."""
        out, n = self.codes.shape
        groups = self.codes.float().view(out, -1, self.group_size)
        return (groups * self.scale.float()[..., None] + self.zero.float()[..., None]).view(out, n)

    def nbytes(self) -> int:
        return packed_nbytes(self.codes.numel(), self.bits) + 2 * self.scale.numel() + 2 * self.zero.numel()


def rtn_quantize(weight: torch.Tensor, bits: int, group_size: int = 128) -> RTNResult:
    """Asymmetric min-max round-to-nearest quantization per group of ``group_size`` weights along ``in``."""
    _check_bits(bits)
    w = _as_matrix(weight)
    out, n = w.shape
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1 or n % group_size:
        raise ValueError(f"group_size {group_size} does not divide the input dimension {n}")
    groups = w.view(out, n // group_size, group_size)
    lo, hi = groups.amin(-1), groups.amax(-1)
    levels = 2**bits - 1
    zero = lo.half()
    scale = ((hi - lo) / levels).half()
    if not (torch.isfinite(zero).all() and torch.isfinite(scale).all()):
        raise ValueError("weights exceed the float16 range of the stored scale / zero point")
    # a constant group (or a range below fp16 resolution) is reproduced by code 0 with any scale
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    # round with the stored fp16 values so the codes are the best ones for what dequantize() will see
    codes = torch.round((groups - zero.float()[..., None]) / scale.float()[..., None]).clamp_(0, levels)
    return RTNResult(codes.to(torch.uint8).view(out, n), scale, zero, bits, group_size)


# ------------------------------------------------------------------------------------------------------------ JLCM
@dataclass
class JLCMResult:
    perm: torch.Tensor  # int32 [out]; row r of codes is original row perm[r]
    bounds: list[int]  # group start rows (permuted order) followed by out
    codebooks: torch.Tensor  # float16 [groups, 2**bits], sorted ascending
    codes: torch.Tensor  # uint8 [out, in], permuted row order
    bits: int

    def dequantize(self) -> torch.Tensor:
        """float32 [out, in] in the original row order, from the fp16 codebooks."""
        rows = _row_groups(self.bounds)
        permuted = self.codebooks.float()[rows[:, None], self.codes.long()]
        weight = torch.empty_like(permuted)
        weight[self.perm.long()] = permuted
        return weight

    def nbytes(self) -> int:
        return packed_nbytes(self.codes.numel(), self.bits) + 2 * self.codebooks.numel() + 4 * self.perm.numel()

    def bits_per_weight(self) -> float:
        return 8 * self.nbytes() / self.codes.numel()


def _check_groups(groups: int, out: int) -> None:
    if isinstance(groups, bool) or not isinstance(groups, int) or not 1 <= groups <= out:
        raise ValueError(f"groups must be an integer in 1..{out} (the number of rows), got {groups!r}")


def _row_groups(bounds: list[int]) -> torch.Tensor:
    """Group index of every (permuted) row."""
    sizes = torch.tensor(bounds[1:]) - torch.tensor(bounds[:-1])
    return torch.repeat_interleave(torch.arange(len(sizes)), sizes)


def group_rows(weight: torch.Tensor, groups: int) -> tuple[torch.Tensor, list[int]]:
    """Order rows by (std, mean) and cut them into ``groups`` near-equal contiguous chunks.

    Returns ``perm`` (weight[perm] is grouped) and ``bounds`` (group starts followed by ``out``)."""
    w = _as_matrix(weight)
    out = w.shape[0]
    _check_groups(groups, out)
    std, mean = torch.std_mean(w, dim=1, correction=0)
    by_mean = torch.argsort(mean, stable=True)
    perm = by_mean[torch.argsort(std[by_mean], stable=True)]
    size, extra = divmod(out, groups)
    return perm, [g * size + min(g, extra) for g in range(groups + 1)]


def _nearest(values: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Index of the nearest codeword; ``codebook [R, K]`` sorted ascending per row, ``values [R, N]``."""
    mids = (codebook[:, 1:] + codebook[:, :-1]) / 2
    return torch.searchsorted(mids.contiguous(), values.contiguous())


def proximal_factor(codebook: torch.Tensor, codes: torch.Tensor, step_sign: torch.Tensor) -> torch.Tensor:
    """rho = delta / (delta + gap) for a latent weight at codeword ``codes`` stepping in direction ``step_sign``.

    ``codebook [R, K]`` sorted ascending, ``codes`` and ``step_sign`` (+1 / -1 / 0) ``[R, N]``;
    gap = |c[a + sign] - c[a]|, delta = median of the row's K - 1 consecutive codeword gaps.  rho = 0 without a
    neighbour in the step direction (or without a step), 1 when delta + gap = 0 (collapsed codebook)."""
    K = codebook.shape[1]
    sign = step_sign.long()
    neighbour = codes + sign
    valid = (sign != 0) & (neighbour >= 0) & (neighbour < K)
    gap = (codebook.gather(1, neighbour.clamp(0, K - 1)) - codebook.gather(1, codes)).abs()
    delta = (codebook[:, 1:] - codebook[:, :-1]).median(dim=1, keepdim=True).values  # K - 1 is odd: exact
    denom = delta + gap
    rho = torch.where(denom > 0, delta / denom, torch.ones_like(gap))
    return torch.where(valid, rho, torch.zeros_like(rho))


def _init_codebook(values: torch.Tensor, K: int, gen: torch.Generator) -> torch.Tensor:
    """Quantile initialisation refined by Lloyd iterations on a (seeded) subsample of the group's weights."""
    if values.numel() > _INIT_SAMPLE:
        values = values[torch.randperm(values.numel(), generator=gen)[:_INIT_SAMPLE]]
    values = values.sort().values
    idx = ((torch.arange(K) + 0.5) / K * values.numel()).long().clamp(max=values.numel() - 1)
    c = values[idx]
    for _ in range(_LLOYD_ITERS):
        a = _nearest(values[None], c[None])[0]
        sums = torch.zeros(K).index_add_(0, a, values)
        counts = torch.bincount(a, minlength=K)
        c = torch.where(counts > 0, sums / counts.clamp(min=1), c).sort().values  # empty cells keep their value
    return c


def _refit_codebook(w: torch.Tensor, codes: torch.Tensor, H: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """Closed-form codebook minimising sum_r (w_r - A_r c)^T H (w_r - A_r c) for one group's fixed mapping."""
    K = old.numel()
    S = torch.zeros(K, K, dtype=torch.float64)
    b = torch.zeros(K, dtype=torch.float64)
    wh = w @ H
    # costs about K gradient steps; chunks bound the one-hot [rows, in, K] block
    chunk = max(1, 2**22 // (w.shape[1] * K))
    for start in range(0, w.shape[0], chunk):
        onehot = torch.nn.functional.one_hot(codes[start : start + chunk], K).float()
        ht = onehot.transpose(1, 2) @ H  # A_r^T H
        S += (ht @ onehot).sum(0).double()
        b += torch.einsum("rik,ri->k", onehot, wh[start : start + chunk]).double()
    # a small ridge toward the old codebook keeps empty codewords where they are and the system solvable
    lam = 1e-6 * float(S.diagonal().mean())
    lam = lam if lam > 0 else 1.0
    c = torch.linalg.solve(S + lam * torch.eye(K, dtype=torch.float64), b + lam * old.double())
    return c.float()


def jlcm_quantize(
    weight: torch.Tensor,
    bits: int,
    groups: int = 8,
    inputs: torch.Tensor | None = None,
    steps: int = 200,
    lr: float = 1e-2,
    seed: int = 0,
) -> JLCMResult:
    """Per-row-group codebooks with a jointly learned mapping (see the module docstring for every formula).

    ``inputs`` are calibration activations ``[..., in]`` (None: weight MSE); ``lr`` is relative to ``std(W)``;
    ``seed`` drives the initialisation subsample, so the result is deterministic given it."""
    _check_bits(bits)
    w = _as_matrix(weight)
    out, n = w.shape
    _check_groups(groups, out)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be a non-negative integer, got {steps!r}")
    if not lr > 0:
        raise ValueError(f"lr must be positive, got {lr!r}")
    if inputs is None:
        H = torch.eye(n) / (out * n)
    else:
        if inputs.shape[-1] != n:
            raise ValueError(f"inputs have {inputs.shape[-1]} features, the weight has {n} inputs")
        x = inputs.detach().reshape(-1, n).float()
        H = x.T @ x / (x.shape[0] * out)
    K = 2**bits
    gen = torch.Generator().manual_seed(seed)
    perm, bounds = group_rows(w, groups)
    rows = _row_groups(bounds)
    target = w[perm]

    codebooks = torch.stack([_init_codebook(target[s:e].reshape(-1), K, gen) for s, e in zip(bounds, bounds[1:])])
    latent = target.clone()
    codes = _nearest(latent, codebooks[rows])

    curvature = 2 * H.diagonal()

    def loss_and_grad(cb: torch.Tensor, a: torch.Tensor) -> tuple[float, torch.Tensor, torch.Tensor]:
        w_hat = cb[rows].gather(1, a)
        eh = (target - w_hat) @ H
        return float((eh * (target - w_hat)).sum()), -2 * eh, w_hat

    best_loss, grad, w_hat = loss_and_grad(codebooks, codes)
    best = (codebooks.clone(), codes)
    if steps:
        opt = torch.optim.Adam([latent, codebooks], lr=lr * float(w.std(correction=0)))
        with torch.no_grad():
            for _ in range(steps):
                flat_index = (rows[:, None] * K + codes).view(-1)
                codebooks.grad = torch.zeros(groups * K).index_add_(0, flat_index, grad.view(-1)).view(groups, K)
                latent.grad = grad + curvature * (latent - w_hat)  # straight-through + curvature pull
                before_latent, before_codebooks = latent.clone(), codebooks.clone()
                opt.step()
                step = latent - before_latent
                latent.copy_(before_latent + proximal_factor(before_codebooks[rows], codes, step.sign()) * step)
                order = codebooks.argsort(dim=1)
                codebooks.copy_(codebooks.gather(1, order))
                state = opt.state[codebooks]
                for key in ("exp_avg", "exp_avg_sq"):  # momentum follows its codeword
                    state[key].copy_(state[key].gather(1, order))
                codes = _nearest(latent, codebooks[rows])
                loss, grad, w_hat = loss_and_grad(codebooks, codes)
                if loss < best_loss:
                    best_loss, best = loss, (codebooks.clone(), codes)

    codebooks, codes = best
    codebooks = torch.stack(
        [_refit_codebook(target[s:e], codes[s:e], H, codebooks[g]) for g, (s, e) in enumerate(zip(bounds, bounds[1:]))]
    ).half()
    # keep codebooks sorted (as documented) and remap the codes to the new positions
    codebooks, order = codebooks.sort(dim=1)
    codes = order.argsort(dim=1)[rows[:, None], codes]
    return JLCMResult(perm.int(), bounds, codebooks, codes.to(torch.uint8), bits)
