"""The weight matrices ``compress`` changes ("layers"), one ``[out, in]`` view of each, and their calibration inputs.

Three kinds of module hold a decoder's matrices:

* ``torch.nn.Linear``: ``weight`` is ``[out, in]`` (``y = x W^T + b``);
* transformers' ``Conv1D`` (GPT-2): ``weight`` is ``[in, out]`` (``y = x W + b``), the transpose;
* fused MoE experts (transformers 5: Qwen2-MoE, Qwen3-MoE, Mixtral, ...; the classes ``use_experts_implementation``
  decorates): one module holds every routed expert's matrices as 3-D parameters ``gate_up_proj`` (``up_proj`` when
  the experts have no gate) and ``down_proj``, ``[experts, out, in]`` (``[experts, in, out]`` when the module says
  ``is_transposed``). Each expert's slice is a layer of its own, named ``<module>.<parameter>.<expert>``
  (``model.layers.0.mlp.experts.gate_up_proj.3``).

``Layer.weight()`` hides the difference: the ``[out, in]`` view of the stored tensor (a transpose or a slice, never a
copy), so writing into it writes the model, and everything downstream (Wanda scores, RTN groups along a row, JLCM row
groups, the packed encodings) sees one layout: ``nn.Linear``'s.

Which layers are compressed (``compress.layers``): a regex over layer names, or by default every layer of the three
kinds inside the repeated decoder blocks (``decoder_blocks``: the ``nn.ModuleList`` holding the most parameters --
``model.layers``, ``transformer.h``, ``gpt_neox.layers``), so the output head and the embeddings are never in it, less
the routers and gates of MoE blocks: layers with one output (Qwen2-MoE's ``shared_expert_gate``) or as many outputs as
the block has experts (a router that is an ``nn.Linear``). They are tiny and decide where tokens go.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from aligntool.errors import UserError

HANDLED = "nn.Linear, transformers Conv1D and fused MoE experts"


@dataclass(frozen=True, eq=False)
class Layer:
    """One compressible matrix: ``param`` of ``module`` (slice ``expert`` of a fused 3-D parameter), stored as the
    transpose of ``[out, in]`` when ``transposed``."""

    name: str  # as compress.layers and the report name it
    module_name: str
    module: torch.nn.Module
    param: str = "weight"
    expert: int | None = None
    transposed: bool = False

    @property
    def key(self) -> str:
        """State-dict key of the stored tensor (for an expert: the whole fused 3-D tensor)."""
        return _join(self.module_name, self.param)

    @property
    def kind(self) -> str:
        return "fused MoE experts" if self.expert is not None else type(self.module).__name__

    def weight(self) -> torch.Tensor:
        """The ``[out, in]`` view of the stored weight."""
        w = getattr(self.module, self.param)
        if self.expert is not None:
            w = w[self.expert]
        return w.T if self.transposed else w

    def bias(self) -> torch.Tensor | None:
        """The bias (a view of the fused ``<param>_bias`` for an expert), or None."""
        if self.expert is None:
            return self.module.bias
        b = getattr(self.module, f"{self.param}_bias", None) if getattr(self.module, "has_bias", False) else None
        return None if b is None else b[self.expert]

    def set_weight(self, value: torch.Tensor) -> None:
        with torch.no_grad():
            self.weight().copy_(value)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.weight().shape)

    @property
    def numel(self) -> int:
        return self.weight().numel()


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _fused_params(module) -> list[str]:
    """The 3-D expert parameters of a fused-experts module, [] for any other module. The attributes read here are
    the ones ``use_experts_implementation`` sets (``has_gate``, ``is_transposed``)."""
    if not hasattr(module, "has_gate") or not hasattr(module, "is_transposed"):
        return []
    names = ["gate_up_proj" if module.has_gate else "up_proj", "down_proj"]
    if all(isinstance(getattr(module, n, None), torch.Tensor) and getattr(module, n).dim() == 3 for n in names):
        return names
    return []


def layers_in(module: torch.nn.Module, prefix: str = "") -> dict[str, Layer]:
    """Every layer compress handles inside ``module`` (its names start with ``prefix``), in module order."""
    from transformers.pytorch_utils import Conv1D

    found = {}
    for name, m in module.named_modules(prefix=prefix):
        if isinstance(m, torch.nn.Linear):
            found[name] = Layer(name, name, m)
        elif isinstance(m, Conv1D):
            found[name] = Layer(name, name, m, transposed=True)
        else:
            for param in _fused_params(m):
                for e in range(getattr(m, param).shape[0]):
                    layer = Layer(_join(name, f"{param}.{e}"), name, m, param, e, bool(m.is_transposed))
                    found[layer.name] = layer
    return found


def decoder_blocks(model) -> list[tuple[str, torch.nn.Module]]:
    """The repeated decoder blocks, named: the ``nn.ModuleList`` holding the most parameters (``model.layers``,
    ``transformer.h``, ``gpt_neox.layers``, ...). A list inside a block (experts) holds fewer than the list of
    blocks around it; on a tie the outer list comes first."""
    lists = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.ModuleList) and len(m)]
    if not lists:
        raise UserError("compress: found no list of decoder blocks (an nn.ModuleList such as model.layers or "
                        "transformer.h); in modes sparsity and quant, compress.layers can name the layers instead")
    name, blocks = max(lists, key=lambda item: sum(p.numel() for p in item[1].parameters()))
    return [(_join(name, str(i)), block) for i, block in enumerate(blocks)]


def default_layers(model) -> dict[str, Layer]:
    """Every layer inside the decoder blocks except MoE routers and gates (see the module docstring)."""
    found = {}
    for prefix, block in decoder_blocks(model):
        layers = layers_in(block, prefix)
        experts = {getattr(x.module, x.param).shape[0] for x in layers.values() if x.expert is not None}
        experts |= {len(m) for n, m in block.named_modules() if isinstance(m, torch.nn.ModuleList)
                    and n.rsplit(".", 1)[-1] == "experts"}  # experts as a list of MLPs (older or remote code)
        found.update({n: x for n, x in layers.items() if x.expert is not None or x.shape[0] not in {1} | experts})
    if not found:
        raise UserError(f"compress: the decoder blocks of this model hold no layer compress handles ({HANDLED}); "
                        "set compress.layers")
    return found


def _listing(layers: dict[str, Layer], limit: int = 12) -> str:
    """Layer names for a message, each fused parameter's experts as one entry (``...gate_up_proj.{0..3}``)."""
    names: list[str] = []
    for x in layers.values():
        if x.expert is None:
            names.append(x.name)
        elif x.expert == 0:
            names.append(f"{x.key}.{{0..{getattr(x.module, x.param).shape[0] - 1}}}")
    return ", ".join(names[:limit]) + (" ..." if len(names) > limit else "")


def compressible_layers(model, pattern: str | None) -> dict[str, Layer]:
    """The layers to compress: ``pattern`` (``compress.layers``, full match of a layer name; an experts module's
    name selects all of its experts) or, when None, ``default_layers``. A matched module holding weights of
    another type is an error naming it, as is a pattern that matches nothing (it lists the layers there are)."""
    if pattern is None:
        return default_layers(model)
    try:
        rx = re.compile(pattern)
    except re.error as exc:
        raise UserError(f"compress.layers: {pattern!r} is not a valid regex ({exc})") from None
    every = layers_in(model)
    found = {n: x for n, x in every.items()
             if rx.fullmatch(n) or (x.expert is not None and rx.fullmatch(x.module_name))}
    handled = {x.module_name for x in every.values()}
    for name, m in model.named_modules():
        if rx.fullmatch(name) and name not in handled and any(True for _ in m.parameters(recurse=False)):
            raise UserError(f"compress.layers: {name} is a {type(m).__name__}; compress handles {HANDLED}")
    if not found:
        if not every:
            raise UserError(f"compress: the model has no layer compress handles ({HANDLED})")
        raise UserError(f"compress.layers: {pattern!r} matches no linear layer; the model has: {_listing(every)}")
    return found


def _expert_inputs(module, args, kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden states ``[tokens, hidden]``, chosen experts ``[tokens, k]``) of a fused-experts call,
    ``experts(hidden_states, top_k_index, top_k_weights)``."""
    hidden = args[0] if args else kwargs["hidden_states"]
    index = args[1] if len(args) > 1 else next(kwargs[k] for k in ("top_k_index", "router_indices", "topk_indices")
                                                if k in kwargs)
    hidden = hidden.detach().reshape(-1, hidden.shape[-1])
    return hidden, index.detach().reshape(hidden.shape[0], -1)


def input_stats(model, layers: dict[str, Layer], windows: torch.Tensor, batch_size: int, keep_tokens: int = 0,
                seed: int = 0) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """One pass over ``windows``: each layer's input column norms ``||X_j||_2`` (Wanda) and, with ``keep_tokens``,
    the input rows of a random sample of that many calibration tokens (JLCM's layer-output error).

    ``nn.Linear`` and ``Conv1D`` inputs are read by a hook on the module. A fused expert's inputs are exactly what
    it sees, from one hook on the experts module: ``gate_up_proj`` of expert ``e`` gets the hidden states of the
    tokens the router sent to ``e``; ``down_proj`` gets ``act(gate) * up`` of those tokens, recomputed with the
    module's own (dense) weights and gating (the routing weight scales the expert's output, so it is not part of
    ``down_proj``'s input). An expert no calibration token reached has zero norms and no rows: Wanda then ranks it
    by magnitude, JLCM fits it on the weight error."""
    sq = {n: torch.zeros(x.shape[1]) for n, x in layers.items()}
    rows: dict[str, list[torch.Tensor]] = {n: [] for n in layers}
    gen = torch.Generator().manual_seed(seed)
    pick = torch.randperm(windows.numel(), generator=gen)[:keep_tokens] if keep_tokens else None
    picked = [torch.zeros(0, dtype=torch.bool)]  # the current batch's tokens that are in the sample

    def record(name: str, x: torch.Tensor, tokens: torch.Tensor | None = None) -> None:
        x = x.float()
        sq[name] += (x * x).sum(0)
        if pick is not None:
            rows[name].append(x[picked[0] if tokens is None else picked[0][tokens]])

    def module_hook(name):
        def fn(module, args):
            record(name, args[0].detach().reshape(-1, args[0].shape[-1]))
        return fn

    def experts_hook(wanted: dict[tuple[str, int], str]):
        def fn(module, args, kwargs):
            hidden, index = _expert_inputs(module, args, kwargs)
            up, down = _fused_params(module)
            for e in sorted({e for _, e in wanted}):
                tokens = (index == e).any(-1).nonzero().squeeze(-1)
                x = hidden[tokens]
                if (up, e) in wanted:
                    record(wanted[up, e], x, tokens)
                if (down, e) in wanted:
                    w = getattr(module, up)[e]
                    b = getattr(module, f"{up}_bias")[e] if getattr(module, "has_bias", False) else None
                    h = torch.nn.functional.linear(x, w.T if module.is_transposed else w, b)
                    h = module._apply_gate(h) if module.has_gate else module.act_fn(h)
                    record(wanted[down, e], h, tokens)
        return fn

    fused: dict[torch.nn.Module, dict[tuple[str, int], str]] = {}
    handles = []
    try:
        for name, x in layers.items():
            if x.expert is None:
                handles.append(x.module.register_forward_pre_hook(module_hook(name)))
            else:
                fused.setdefault(x.module, {})[x.param, x.expert] = name
        for module, wanted in fused.items():
            handles.append(module.register_forward_pre_hook(experts_hook(wanted), with_kwargs=True))
        offset = 0
        with torch.no_grad():
            for b in range(0, len(windows), batch_size):
                chunk = windows[b: b + batch_size]
                if pick is not None:
                    sel = pick[(pick >= offset) & (pick < offset + chunk.numel())] - offset
                    picked[0] = torch.zeros(chunk.numel(), dtype=torch.bool)
                    picked[0][sel] = True
                model(input_ids=chunk)
                offset += chunk.numel()
    finally:
        for h in handles:
            h.remove()
    norms = {n: v.sqrt() for n, v in sq.items()}
    inputs = {n: torch.cat(r) if r else torch.zeros(0, layers[n].shape[1]) for n, r in rows.items()} \
        if pick is not None else {}
    return norms, inputs
