"""What EvoPress searches over: compressible units, the levels each may take, and how a level is put into the model.

EvoPress (Sieberling et al., ICML 2025) keeps a per-layer *database* of compressed variants and searches one level per
unit under a global budget. Three spaces, one class each:

* ``SparsitySpace`` -- unstructured sparsity. Level ``l`` of layer ``i`` prunes ``k_i(l) = round(s * n_i) + l * step``
  weights (``n_i`` its size, ``s`` the target): every level step removes the *same number* of weights in every layer,
  so a mutation that raises one layer and lowers another keeps the total exactly (the authors' ``weights_diff``).
  ``l`` ranges over ``-min(k_i(0) // step, L) .. min((n_i - k_i(0)) // step, L)``. Pruning order: Wanda scores
  ``|W_ij| * ||X_j||_2`` (Sun et al. 2023), ranked over the whole layer rather than per row, so that ``k_i(l)`` is
  exact (our choice; the authors' database uses SparseGPT, which also updates the kept weights).
* ``QuantSpace`` -- bit-widths ``bits_min..bits_max``, round-to-nearest with ``group_size`` groups
  (``quantizers.rtn_quantize``; the authors use GPTQ). A mutation only trades bits between layers of the same size
  (the authors' group_rule "size"), so the total bits never move.
* ``DepthSpace`` -- attention / MLP sub-blocks (or whole blocks) replaced by identity: every linear weight (and
  bias) inside is zeroed, so the sub-block adds 0 to the residual stream -- the model stays a model transformers
  loads. The budget is the number of dropped units; a mutation swaps one dropped unit for a kept one.

A candidate is a tuple of integer levels, one per unit; ``group`` says which units may trade levels.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from aligntool.compress import quantizers
from aligntool.errors import UserError


@dataclass
class Unit:
    name: str
    linears: dict[str, torch.nn.Linear]  # module name -> module that this unit changes
    numel: int  # weights it holds


def compressible_linears(model, pattern: str) -> dict[str, torch.nn.Linear]:
    try:
        rx = re.compile(pattern)
    except re.error as exc:
        raise UserError(f"compress.layers: {pattern!r} is not a valid regex ({exc})") from None
    found = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and rx.fullmatch(n)}
    if not found:
        linear = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
        if not linear or linear == ["lm_head"]:
            raise UserError("compress: the model has no torch.nn.Linear layers to compress (GPT-2-style Conv1D "
                            "projections are not supported)")
        raise UserError(f"compress.layers: {pattern!r} matches no linear layer; the model has: {', '.join(linear[:12])}"
                        + (" ..." if len(linear) > 12 else ""))
    return found


class Space:
    mode = ""
    units: list[Unit]
    lo: list[int]
    hi: list[int]
    group: list[int]

    def __init__(self, units: list[Unit]):
        self.units = units
        self.dense = {n: (m.weight.detach().clone(), None if m.bias is None else m.bias.detach().clone())
                      for u in units for n, m in u.linears.items()}
        self.current: list[int | None] = [None] * len(units)

    def weights(self, i: int, level: int) -> dict[str, torch.Tensor]:
        """The weight of each linear of unit ``i`` at ``level``."""
        raise NotImplementedError

    def apply(self, levels) -> None:
        """Put ``levels`` into the model (only the units that changed since the last call)."""
        with torch.no_grad():
            for i, level in enumerate(levels):
                if self.current[i] == level:
                    continue
                for name, w in self.weights(i, level).items():
                    self.units[i].linears[name].weight.copy_(w)
                self.current[i] = level

    def restore(self) -> None:
        with torch.no_grad():
            for u in self.units:
                for n, m in u.linears.items():
                    m.weight.copy_(self.dense[n][0])
                    if m.bias is not None:
                        m.bias.copy_(self.dense[n][1])
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

    def __init__(self, linears: dict[str, torch.nn.Linear], input_norms: dict[str, torch.Tensor], sparsity: float,
                 num_levels: int, step: int | None, hidden_size: int | None = None):
        super().__init__([Unit(n, {n: m}, m.weight.numel()) for n, m in linears.items()])
        self.target = sparsity
        size = hidden_size**2 if hidden_size else min(u.numel for u in self.units)
        self.step = step or default_step(sparsity, num_levels, size)
        self.base = [round(sparsity * u.numel) for u in self.units]
        ranges = [level_range(u.numel, sparsity, self.step, num_levels) for u in self.units]
        self.lo, self.hi = [r[0] for r in ranges], [r[1] for r in ranges]
        self.group = [0] * len(self.units)
        self.order = {}
        for u in self.units:  # ascending Wanda score: the first k are pruned at k
            w = self.dense[u.name][0].float()
            score = w.abs() * input_norms[u.name].float()[None, :]
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

    def __init__(self, linears: dict[str, torch.nn.Linear], bits: float, bits_min: int, bits_max: int, group_size: int):
        super().__init__([Unit(n, {n: m}, m.weight.numel()) for n, m in linears.items()])
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
        blocks = _decoder_blocks(model)
        units = []
        for prefix, block in blocks:
            parts = [(prefix, block)] if unit == "block" else _sub_blocks(prefix, block)
            for name, module in parts:
                linears = {f"{name}.{n}" if n else name: m for n, m in module.named_modules()
                           if isinstance(m, torch.nn.Linear)}
                if not linears:
                    raise UserError(f"compress.mode depth: {name} holds no torch.nn.Linear layer to drop")
                units.append(Unit(name, linears, sum(m.weight.numel() for m in linears.values())))
        if drop >= len(units):
            raise UserError(f"compress.drop: {drop} units asked, the model has {len(units)} {unit} units; "
                            f"drop must be below that")
        super().__init__(units)
        self.drop = drop
        self.lo, self.hi = [0] * len(units), [1] * len(units)
        self.group = [0] * len(units)

    def weights(self, i, level):
        return {n: self.dense[n][0] * (1 - level) for n in self.units[i].linears}

    def apply(self, levels):
        super().apply(levels)
        with torch.no_grad():  # biases follow their weights
            for i, level in enumerate(levels):
                for n, m in self.units[i].linears.items():
                    if m.bias is not None:
                        m.bias.copy_(self.dense[n][1] * (1 - level))

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


def _decoder_blocks(model) -> list[tuple[str, torch.nn.Module]]:
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and re.search(r"(^|\.)(layers|h|blocks)$", name) and len(module):
            return [(f"{name}.{i}", block) for i, block in enumerate(module)]
    raise UserError("compress.mode depth: found no list of decoder blocks (model.layers / transformer.h)")


def _sub_blocks(prefix: str, block) -> list[tuple[str, torch.nn.Module]]:
    # only children holding linear layers (GPT-NeoX registers post_attention_layernorm before attention)
    children = {n: m for n, m in block.named_children() if any(isinstance(x, torch.nn.Linear) for x in m.modules())}
    attn = next((n for n in children if "attn" in n or "attention" in n), None)
    mlp = next((n for n in children if "mlp" in n or "feed_forward" in n), None)
    if attn is None or mlp is None:
        raise UserError(f"compress.mode depth: {prefix} has no attention / MLP sub-modules to drop "
                        f"(children: {', '.join(children)}); use drop_unit: block")
    return [(f"{prefix}.{attn}", children[attn]), (f"{prefix}.{mlp}", children[mlp])]


def input_stats(model, linears: dict[str, torch.nn.Linear], windows: torch.Tensor, batch_size: int,
                keep_tokens: int = 0, seed: int = 0) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """One pass over ``windows``: each layer's input column norms ``||X_j||_2`` (Wanda) and, with ``keep_tokens``,
    a random sample of that many input rows (JLCM's layer-output error)."""
    sq = {n: torch.zeros(m.in_features) for n, m in linears.items()}
    rows: dict[str, list[torch.Tensor]] = {n: [] for n in linears}
    total = windows.numel()
    gen = torch.Generator().manual_seed(seed)
    pick = torch.randperm(total, generator=gen)[:keep_tokens].sort().values if keep_tokens else None
    offset = [0]

    def hook(name):
        def fn(module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            sq[name] += (x * x).sum(0)
            if pick is not None:
                lo = offset[0]
                sel = pick[(pick >= lo) & (pick < lo + x.shape[0])] - lo
                rows[name].append(x[sel])
        return fn

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in linears.items()]
    try:
        with torch.no_grad():
            for b in range(0, len(windows), batch_size):
                chunk = windows[b: b + batch_size]
                model(input_ids=chunk)
                offset[0] += chunk.numel()
    finally:
        for h in handles:
            h.remove()
    norms = {n: v.sqrt() for n, v in sq.items()}
    inputs = {n: torch.cat(r) for n, r in rows.items()} if pick is not None else {}
    return norms, inputs

