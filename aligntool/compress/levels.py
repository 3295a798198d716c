"""What EvoPress searches over: compressible units, the levels each may take, and how a level is put into the model.

EvoPress (Sieberling et al., ICML 2025) keeps a per-layer *database* of compressed variants and searches one level per
unit under a global budget. Three spaces, one class each:

* ``SparsitySpace`` -- unstructured sparsity. Level ``l`` of layer ``i`` prunes ``k_i(l) = round(s * n_i) + l * step``
  weights (``n_i`` its size, ``s`` the target): every level step removes the *same number* of weights in every layer,
  so a mutation that raises one layer and lowers another keeps the total exactly (the authors' ``weights_diff``).
  ``l`` ranges over ``-min(k_i(0) // step, L) .. min((n_i - k_i(0)) // step, L)``. Pruning order: Wanda scores
  ``|W_ij| * ||X_j||_2`` (Sun et al. 2023), ranked over the whole layer rather than per row, so that ``k_i(l)`` is
  exact (our choice; the authors' database uses SparseGPT, which also updates the kept weights). With
  ``compress.saliency: mfac`` the order is M-FAC's OBS saliency instead, optionally with the OBS update of the kept
  weights per level (``mfac.MFACSparsitySpace``).
* ``QuantSpace`` -- bit-widths ``bits_min..bits_max``, round-to-nearest with ``group_size`` groups
  (``quantizers.rtn_quantize``; the authors use GPTQ). A mutation only trades bits between layers of the same size
  (the authors' group_rule "size"), so the total bits never move.
* ``DepthSpace`` -- attention / MLP sub-blocks (or whole blocks) replaced by identity: every layer's weight (and
  bias) inside is zeroed -- ``nn.Linear``, ``Conv1D`` and all the experts of an MoE block -- so the sub-block adds 0
  to the residual stream and the model stays a model transformers loads. The budget is the number of dropped units;
  a mutation swaps one dropped unit for a kept one.

A candidate is a tuple of integer levels, one per unit; ``group`` says which units may trade levels. Layers
(``layers.Layer``) are read and written as ``[out, in]`` matrices whatever their stored layout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from aligntool.compress import quantizers
from aligntool.compress.layers import Layer, decoder_blocks, layers_in
from aligntool.errors import UserError


@dataclass
class Unit:
    name: str
    layers: dict[str, Layer]  # layer name -> layer that this unit changes
    numel: int  # weights it holds


class Space:
    mode = ""
    units: list[Unit]
    lo: list[int]
    hi: list[int]
    group: list[int]

    def __init__(self, units: list[Unit]):
        self.units = units
        # [out, in] copies, contiguous whatever the stored layout (Conv1D keeps the transpose)
        self.dense = {n: (x.weight().detach().clone(memory_format=torch.contiguous_format),
                          None if x.bias() is None else x.bias().detach().clone())
                      for u in units for n, x in u.layers.items()}
        self.current: list[int | None] = [None] * len(units)

    def weights(self, i: int, level: int) -> dict[str, torch.Tensor]:
        """The ``[out, in]`` weight of each layer of unit ``i`` at ``level``."""
        raise NotImplementedError

    def apply(self, levels) -> None:
        """Put ``levels`` into the model (only the units that changed since the last call)."""
        with torch.no_grad():
            for i, level in enumerate(levels):
                if self.current[i] == level:
                    continue
                for name, w in self.weights(i, level).items():
                    self.units[i].layers[name].set_weight(w)
                self.current[i] = level

    def restore(self) -> None:
        with torch.no_grad():
            for u in self.units:
                for n, x in u.layers.items():
                    x.set_weight(self.dense[n][0])
                    if x.bias() is not None:
                        x.bias().copy_(self.dense[n][1])
        self.current = [None] * len(self.units)

    def uniform(self) -> tuple[int, ...]:
        raise NotImplementedError

    def initial(self, rng) -> list[tuple[int, ...]]:
        """Starting point(s) of the search; several are scored and the best kept."""
        return [self.uniform()]

    def check(self, levels) -> None:
        """The budget holds and every level exists (a bug if not: mutations preserve both)."""
        assert all(lo <= x <= hi for x, lo, hi in zip(levels, self.lo, self.hi)), levels

    def describe(self, i: int, level: int) -> dict:
        raise NotImplementedError

    def achieved(self, levels) -> dict:
        raise NotImplementedError


def default_step(sparsity: float, num_levels: int, numel: int) -> int:
    """Weights removed per level step: the authors' default ``int(0.5 * min(s, 1-s) / L * hidden^2)`` (``numel`` =
    hidden^2; the smallest compressed layer's size when the config has no hidden size). Layers too small for all
    ``L`` steps get fewer levels (``level_range``)."""
    return max(1, int(0.5 * min(sparsity, 1 - sparsity) / num_levels * numel))


def level_range(numel: int, sparsity: float, step: int, num_levels: int) -> tuple[int, int]:
    """Lowest and highest level of a layer: ``-min(k0 // step, L)`` and ``min((n - k0) // step, L)``, with
    ``k0 = round(s * n)`` the weights pruned at level 0 (sparsity at level l: ``(k0 + l * step) / n``)."""
    k0 = round(sparsity * numel)
    return -min(k0 // step, num_levels), min((numel - k0) // step, num_levels)


class SparsitySpace(Space):
    mode = "sparsity"

    def __init__(self, layers: dict[str, Layer], input_norms: dict[str, torch.Tensor], sparsity: float,
                 num_levels: int, step: int | None, hidden_size: int | None = None,
                 scores: dict[str, torch.Tensor] | None = None):
        super().__init__([Unit(n, {n: x}, x.numel) for n, x in layers.items()])
        self.target = sparsity
        size = hidden_size**2 if hidden_size else min(u.numel for u in self.units)
        self.step = step or default_step(sparsity, num_levels, size)
        self.base = [round(sparsity * u.numel) for u in self.units]
        ranges = [level_range(u.numel, sparsity, self.step, num_levels) for u in self.units]
        self.lo, self.hi = [r[0] for r in ranges], [r[1] for r in ranges]
        self.group = [0] * len(self.units)
        self.order = {}
        for u in self.units:  # ascending Wanda score (or the given ``scores``): the first k are pruned at k
            if scores is not None:
                score = scores[u.name]
            else:
                w = self.dense[u.name][0].float()
                norms = input_norms[u.name].float()
                if not norms.any():  # an expert no calibration token was routed to: magnitude alone
                    norms = torch.ones_like(norms)
                score = w.abs() * norms[None, :]
            order = torch.argsort(score.view(-1), stable=True)
            self.order[u.name] = order.int() if u.numel < 2**31 else order  # half the memory of int64

    def pruned(self, i: int, level: int) -> int:
        return self.base[i] + level * self.step

    def mask(self, i: int, level: int) -> torch.Tensor:
        name = self.units[i].name
        keep = torch.ones(self.units[i].numel, dtype=torch.bool)
        keep[self.order[name][: self.pruned(i, level)]] = False
        return keep.view_as(self.dense[name][0])

    def weights(self, i, level):
        name = self.units[i].name
        return {name: self.dense[name][0] * self.mask(i, level)}

    def uniform(self):
        return tuple([0] * len(self.units))

    def check(self, levels):
        super().check(levels)
        assert sum(levels) == 0, levels

    def describe(self, i, level):
        return {"level": level, "sparsity": self.pruned(i, level) / self.units[i].numel}

    def achieved(self, levels):
        pruned = sum(self.pruned(i, x) for i, x in enumerate(levels))
        total = sum(u.numel for u in self.units)
        return {"sparsity": pruned / total, "pruned_weights": pruned, "weights": total, "target_sparsity": self.target,
                "step_weights": self.step}


class QuantSpace(Space):
    mode = "quant"

    def __init__(self, layers: dict[str, Layer], bits: float, bits_min: int, bits_max: int, group_size: int):
        super().__init__([Unit(n, {n: x}, x.numel) for n, x in layers.items()])
        for u in self.units:
            cols = self.dense[u.name][0].shape[1]
            if cols % group_size:
                raise UserError(f"compress.group_size: {group_size} does not divide the input size {cols} of "
                                f"{u.name}; pick a divisor of every layer's input size")
        self.target, self.group_size = bits, group_size
        self.lo = [bits_min] * len(self.units)
        self.hi = [bits_max] * len(self.units)
        sizes = sorted({u.numel for u in self.units})
        self.group = [sizes.index(u.numel) for u in self.units]
        self._cache: dict[tuple[int, int], quantizers.RTNResult] = {}

    def rtn(self, i: int, bits: int) -> quantizers.RTNResult:
        if (i, bits) not in self._cache:
            self._cache[i, bits] = quantizers.rtn_quantize(self.dense[self.units[i].name][0], bits, self.group_size)
        return self._cache[i, bits]

    def weights(self, i, level):
        name = self.units[i].name
        return {name: self.rtn(i, level).dequantize().to(self.dense[name][0].dtype)}

    def total_bits(self, levels) -> int:
        return sum(u.numel * b for u, b in zip(self.units, levels))

    def budget_bits(self) -> float:
        return self.target * sum(u.numel for u in self.units)

    def uniform(self):
        return tuple([int(self.target)] * len(self.units))

    def initial(self, rng):
        if self.target == int(self.target):
            return [self.uniform()]
        # EvoPress: start every layer at ceil(bits), lower random layers until the budget holds
        out = []
        for _ in range(self.n_initial):
            levels = [math.ceil(self.target)] * len(self.units)
            while self.total_bits(levels) > self.budget_bits():
                i = rng.choice([j for j, b in enumerate(levels) if b > self.lo[j]])
                levels[i] -= 1
            out.append(tuple(levels))
        return out

    n_initial = 16

    def check(self, levels):
        super().check(levels)
        assert self.total_bits(levels) <= self.budget_bits() + 1e-6, levels

    def describe(self, i, level):
        return {"level": level, "bits": level}

    def achieved(self, levels):
        total = sum(u.numel for u in self.units)
        return {"bits": self.total_bits(levels) / total, "target_bits": self.target, "weights": total,
                "group_size": self.group_size}


class DepthSpace(Space):
    mode = "depth"

    def __init__(self, model, drop: int, unit: str):
        units = []
        for prefix, block in decoder_blocks(model):
            parts = [(prefix, block)] if unit == "block" else _sub_blocks(prefix, block)
            for name, module in parts:
                layers = layers_in(module, name)
                if not layers:
                    raise UserError(f"compress.mode depth: {name} is a {type(module).__name__} and holds no layer to "
                                    "drop (nn.Linear, transformers Conv1D or fused MoE experts)")
                units.append(Unit(name, layers, sum(x.numel for x in layers.values())))
        if drop >= len(units):
            raise UserError(f"compress.drop: {drop} units asked, the model has {len(units)} {unit} units; "
                            f"drop must be below that")
        super().__init__(units)
        self.drop = drop
        self.lo, self.hi = [0] * len(units), [1] * len(units)
        self.group = [0] * len(units)

    def weights(self, i, level):
        return {n: self.dense[n][0] * (1 - level) for n in self.units[i].layers}

    def apply(self, levels):
        super().apply(levels)
        with torch.no_grad():  # biases follow their weights
            for i, level in enumerate(levels):
                for n, x in self.units[i].layers.items():
                    if x.bias() is not None:
                        x.bias().copy_(self.dense[n][1] * (1 - level))

    def uniform(self):
        raise NotImplementedError("depth pruning has no uniform version")

    def initial(self, rng):
        out = set()
        while len(out) < min(self.n_initial, math.comb(len(self.units), self.drop)):
            dropped = set(rng.sample(range(len(self.units)), self.drop))
            out.add(tuple(int(i in dropped) for i in range(len(self.units))))
        return sorted(out)

    n_initial = 16

    def check(self, levels):
        super().check(levels)
        assert sum(levels) == self.drop, levels

    def describe(self, i, level):
        return {"level": level, "dropped": bool(level)}

    def achieved(self, levels):
        return {"dropped": sum(levels), "units": len(levels), "dropped_names": [u.name for u, x in
                                                                                 zip(self.units, levels) if x]}


def _sub_blocks(prefix: str, block) -> list[tuple[str, torch.nn.Module]]:
    # only children holding layers (GPT-NeoX registers post_attention_layernorm before attention)
    children = {n: m for n, m in block.named_children() if layers_in(m)}
    attn = next((n for n in children if "attn" in n or "attention" in n), None)
    mlp = next((n for n in children if "mlp" in n or "feed_forward" in n), None)
    if attn is None or mlp is None:
        raise UserError(f"compress.mode depth: {prefix} has no attention / MLP sub-modules to drop "
                        f"(children: {', '.join(children)}); use drop_unit: block")
    return [(f"{prefix}.{attn}", children[attn]), (f"{prefix}.{mlp}", children[mlp])]
