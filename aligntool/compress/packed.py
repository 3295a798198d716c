"""The packed (really compressed) form of a compressed model, and the loader that rebuilds the model from it.

``packed/`` holds ``packed.safetensors``, ``manifest.json``, the model config and the tokenizer. Each compressed
weight is stored in its own encoding (tensor names ``<weight name>::<part>``), always of the ``[out, in]`` matrix:

* ``sparse``: ``mask`` (1 bit per weight, ``quantizers.pack_mask``) + ``values`` (the kept weights, row-major, in the
  model's dtype);
* ``rtn``: ``codes`` (``bits`` per weight, bit-packed) + ``scale`` and ``zero`` (fp16, one per group);
* ``jlcm``: ``codes`` (bit-packed) + ``codebooks`` (fp16, one per row group) + ``perm`` (row order);
* ``dropped``: nothing (the weight is zero; so is its bias, if any).

A weight stored as ``[in, out]`` (GPT-2's ``Conv1D``) has ``"transposed": true`` in its entry: the encoding is of
its transpose. A fused 3-D MoE weight ``[experts, out, in]`` is an ``experts`` entry with one encoding per expert
(``"experts": {"<e>": {"kind": ..., settings}}``, tensors ``<weight name>::<e>::<part>``); an expert that was not
compressed is ``dense`` (``values``: the slice as it is).

Every other tensor is stored as it is (tied tensors once). ``manifest.json`` records each entry's shape and settings
and the SHA-256 of ``packed.safetensors``, checked on load: a corrupted file is an error, never a wrong model.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from aligntool.compress import quantizers
from aligntool.errors import UserError, first_line

FORMAT = "aligntool-packed-v1"


def encode_sparse(weight: torch.Tensor, keep: torch.Tensor) -> tuple[dict, dict]:
    return {"mask": quantizers.pack_mask(keep), "values": weight[keep].contiguous()}, {}


def encode_rtn(res: quantizers.RTNResult) -> tuple[dict, dict]:
    return ({"codes": quantizers.pack_bits(res.codes, res.bits), "scale": res.scale, "zero": res.zero},
            {"bits": res.bits, "group_size": res.group_size})


def encode_jlcm(res: quantizers.JLCMResult) -> tuple[dict, dict]:
    return ({"codes": quantizers.pack_bits(res.codes, res.bits), "codebooks": res.codebooks, "perm": res.perm},
            {"bits": res.bits, "bounds": list(res.bounds)})


def add(encoded: dict, layer, kind: str, parts: dict, meta: dict) -> None:
    """Record the encoding of ``layer``'s ``[out, in]`` matrix (a ``layers.Layer``: its state-dict ``key``, its
    ``expert`` slice or None, ``transposed``) in ``encoded``, the argument of ``write_packed``."""
    meta = {**meta, "transposed": True} if layer.transposed and kind != "dropped" else meta
    if layer.expert is None:
        encoded[layer.key] = (kind, parts, meta)
    else:
        encoded.setdefault(layer.key, ("experts", {}, {}))[1][layer.expert] = (kind, parts, meta)


def _decode(kind: str, parts: dict, meta: dict, shape: list[int], dtype: torch.dtype) -> torch.Tensor:
    if meta.get("transposed"):  # the encoding is of the [out, in] transpose of the stored [in, out]
        meta = {k: v for k, v in meta.items() if k != "transposed"}
        return _decode(kind, parts, meta, shape[::-1], dtype).T.contiguous()
    if kind == "experts":
        out = torch.empty(shape, dtype=dtype)
        for e, entry in meta["experts"].items():
            own = {k.split("::", 1)[1]: v for k, v in parts.items() if k.startswith(f"{e}::")}
            out[int(e)] = _decode(entry["kind"], own, {k: v for k, v in entry.items() if k != "kind"}, shape[1:], dtype)
        return out
    if kind == "dense":
        return parts["values"].to(dtype).view(shape)
    numel = shape[0] * shape[1] if len(shape) == 2 else int(torch.tensor(shape).prod())
    if kind == "sparse":
        keep = quantizers.unpack_mask(parts["mask"], numel).view(shape)
        out = torch.zeros(shape, dtype=dtype)
        out[keep] = parts["values"].to(dtype)
        return out
    if kind == "dropped":
        return torch.zeros(shape, dtype=dtype)
    codes = quantizers.unpack_bits(parts["codes"], meta["bits"], numel).to(torch.uint8).view(shape)
    if kind == "rtn":
        res = quantizers.RTNResult(codes, parts["scale"], parts["zero"], meta["bits"], meta["group_size"])
    elif kind == "jlcm":
        res = quantizers.JLCMResult(parts["perm"], meta["bounds"], parts["codebooks"], codes, meta["bits"])
    else:
        raise ValueError(kind)
    return res.dequantize().to(dtype)


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _digest(folder: Path, manifest: dict) -> str:
    """SHA-256 over everything the rebuild reads: the tensors, the manifest's settings and the model config."""
    h = hashlib.sha256((folder / "packed.safetensors").read_bytes())
    h.update(json.dumps({k: manifest.get(k) for k in ("format", "dtype", "entries", "aliases")},
                        sort_keys=True).encode())
    h.update((folder / "config.json").read_bytes())
    return h.hexdigest()


def write_packed(model, tokenizer, encoded: dict[str, tuple[str, dict, dict]], out: Path) -> int:
    """Write ``out/`` (see the module docstring); ``encoded`` maps a weight name to (kind, tensors, settings), as
    ``add`` records them. Returns the bytes of packed.safetensors + manifest.json."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    tensors, entries, aliases, seen = {}, {}, {}, {}
    state = model.state_dict()
    for key, t in state.items():
        if key in encoded:
            kind, parts, meta = encoded[key]
            if kind == "experts":  # one encoding per expert; the experts left out are stored as they are
                meta = {"experts": {}}
                for e in range(t.shape[0]):
                    e_kind, e_parts, e_meta = parts.get(e, ("dense", {"values": t[e]}, {}))
                    for name, part in e_parts.items():
                        tensors[f"{key}::{e}::{name}"] = part.contiguous()
                    meta["experts"][str(e)] = {"kind": e_kind, **e_meta}
            else:
                for name, part in parts.items():
                    tensors[f"{key}::{name}"] = part.contiguous()
            entries[key] = {"kind": kind, "shape": list(t.shape), **meta}
            continue
        if key.endswith(".bias") and key.removesuffix(".bias") + ".weight" in encoded:
            if encoded[key.removesuffix(".bias") + ".weight"][0] != "dropped":
                tensors[key] = t.contiguous()  # biases of compressed layers are kept whole; dropped ones are zero
            else:
                entries[key] = {"kind": "dropped", "shape": list(t.shape)}
            continue
        ptr = (t.data_ptr(), tuple(t.shape), t.stride())
        if ptr in seen:  # tied (e.g. embeddings and lm_head): the same tensor, stored once
            aliases[key] = seen[ptr]
            continue
        seen[ptr] = key
        tensors[key] = t.detach().contiguous()
    save_file(tensors, str(out / "packed.safetensors"))
    model.config.save_pretrained(out)
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    manifest = {"format": FORMAT, "dtype": dtype, "entries": entries, "aliases": aliases}
    manifest["sha256"] = _digest(out, manifest)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return (out / "packed.safetensors").stat().st_size + (out / "manifest.json").stat().st_size


def tensor_bytes(model) -> int:
    """Bytes of the model's tensors as ``write_packed`` would store them uncompressed (tied tensors once): the dense
    size the packed size compares with, whatever folder (a full model, a LoRA adapter on its base) it came from."""
    seen, total = set(), 0
    for t in model.state_dict().values():
        ptr = (t.data_ptr(), tuple(t.shape), t.stride())
        if ptr not in seen:
            seen.add(ptr)
            total += t.numel() * t.element_size()
    return total


def is_packed(path: str | Path) -> bool:
    """A packed folder (``write_packed``): ``manifest.json`` of this format beside ``packed.safetensors``."""
    path = Path(path)
    try:
        return (path / "packed.safetensors").is_file() and json.loads(
            (path / "manifest.json").read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def load_packed(path: str | Path):
    """Rebuild the model from a packed folder (a ``transformers`` causal LM in eval mode)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    try:
        manifest = json.loads((path / "manifest.json").read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: not a packed model (no manifest.json)") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"{path / 'manifest.json'}: corrupted ({exc.msg})") from None
    if manifest.get("format") != FORMAT:
        raise UserError(f"{path / 'manifest.json'}: unknown format {manifest.get('format')!r}, expected {FORMAT}")
    blob = path / "packed.safetensors"
    for needed in (blob, path / "config.json"):
        if not needed.is_file():
            raise UserError(f"{needed}: missing")
    if not isinstance(manifest.get("entries"), dict) or manifest.get("dtype") not in DTYPES:
        raise UserError(f"{path / 'manifest.json'}: corrupted (no entries, or dtype not one of {', '.join(DTYPES)})")
    if _digest(path, manifest) != manifest.get("sha256"):
        raise UserError(f"{path}: checksum mismatch: packed.safetensors, manifest.json or config.json is corrupted "
                        "or was changed after packing")
    try:
        stored = load_file(str(blob))
        dtype = DTYPES[manifest["dtype"]]
        state = {k: v for k, v in stored.items() if "::" not in k}
        for key, entry in manifest["entries"].items():
            parts = {k.split("::", 1)[1]: v for k, v in stored.items() if k.startswith(key + "::")}
            meta = {k: v for k, v in entry.items() if k not in ("kind", "shape")}
            state[key] = _decode(entry["kind"], parts, meta, entry["shape"], dtype)
        for key, target in manifest["aliases"].items():
            state[key] = state[target]
        config = AutoConfig.from_pretrained(path)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        missing, unexpected = model.load_state_dict(state, strict=False)
    except (SafetensorError, OSError, KeyError, ValueError, RuntimeError) as exc:
        raise UserError(f"{path}: cannot rebuild the model ({first_line(exc)})") from None
    if missing or unexpected:
        raise UserError(f"{path}: packed tensors do not fit the config (missing {missing[:3]}, unexpected "
                        f"{unexpected[:3]})")
    model.tie_weights()
    return model.eval()
