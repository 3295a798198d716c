"""A compress output in the compressed-tensors format (``aligntool export``, and ``compress.export``), the format
transformers and vLLM load quantized checkpoints from (llm-compressor writes it).

What the format can hold, checked against the versions installed (compressed-tensors 0.20, transformers 5.25,
vLLM 0.32):

* ``mode: quant`` (uniform or EvoPress, round-to-nearest): yes -- integer weights, asymmetric, one scale and one
  integer zero point per ``group_size`` weights of a row (``strategy: group``), written by compressed-tensors' own
  ``pack-quantized`` compressor (``ModelCompressor``): ``weight_packed`` (int32 words), ``weight_scale``,
  ``weight_zero_point`` (packed too), ``weight_shape``; ``config.json`` gets ``quantization_config`` with
  ``quant_method: compressed-tensors``.
* ``mode: sparsity``: no. compressed-tensors dropped its sparse formats (``sparse-bitmask``, ``sparse-24-bitmask``)
  after 0.14; transformers 5 has no sparse decompression and vLLM 0.32 refuses a ``sparsity_config``. The compress
  output's own ``model.safetensors`` (zeros stored dense) is what they load; ``packed/`` stays the compact form.
* ``mode: depth`` (dropped sub-blocks) and JLCM codebooks: no scheme for them; ``packed/`` stays their compact form.
* Conv1D (GPT-2) and fused MoE expert weights: compressed-tensors quantizes ``nn.Linear`` modules only.

The zero point (see ``quant_params``): ours is a float (the group minimum, ``w = code * scale + zero``); theirs is an
integer (``w = (q - zp) * scale``, ``q`` signed), so the grid of a group must contain 0. Each group keeps its scale
and gets the nearest integer zero point; compressed-tensors then rounds our (dequantized) weights onto that grid
itself, so every weight of a group moves by the same amount, at most half its scale. (Refitting the scale by least
squares per group was tried: a larger maximum error, 1.12 scales, and a larger KL on the tiny model.) The error is
measured on every weight and written to ``export.json``.

Loading (transformers 5.25): its default route cannot load asymmetric ``pack-quantized`` weights (it prepares the
zero points unpacked, the checkpoint holds them packed: a size mismatch), so ``quantization_config`` carries
``dequantize: true`` (transformers' own option: the weights are decompressed while loading, the route llm-compressor
users take to fine-tune). That route reads one scheme for every layer, so an EvoPress model with mixed bit widths
is stored at its widest width (each layer's codes keep their own range and values; the bytes are those of the widest
width).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from aligntool.errors import UserError

FORMATS = ("compressed-tensors",)
FOLDER = "compressed-tensors"  # the export's place inside a compress output
REPORT = "export.json"


def packed_folder(source: Path) -> Path:
    """The packed folder of ``source``: a compress output (``source/packed``) or a packed folder itself."""
    from aligntool.compress.packed import is_packed

    source = Path(source).expanduser()
    for candidate in (source / "packed", source):
        if is_packed(candidate):
            return candidate
    raise UserError(f"OUTPUT: {source} is neither a compress output (no packed/manifest.json) nor a packed folder")


def unsupported(manifest: dict) -> str | None:
    """Why the packed model cannot be written in compressed-tensors' format, or None when it can."""
    kinds = {e["kind"] for e in manifest["entries"].values()}
    if "experts" in kinds:
        return ("fused MoE expert weights have no compressed-tensors scheme here (it quantizes nn.Linear modules "
                "only); packed/ stays the compact form")
    if any(e.get("transposed") for e in manifest["entries"].values()):
        return ("Conv1D (GPT-2) weights have no compressed-tensors scheme (nn.Linear only); packed/ stays the compact "
                "form")
    if "jlcm" in kinds:
        return "JLCM codebooks have no compressed-tensors scheme; packed/ stays the compact form"
    if "dropped" in kinds:
        return "depth pruning (dropped sub-blocks) has no compressed-tensors scheme; packed/ stays the compact form"
    if "sparse" in kinds:
        return ("compressed-tensors >= 0.15 (and vLLM 0.32) dropped the sparse formats (sparse-bitmask, "
                "sparse-24-bitmask); the compress output's model.safetensors is the dense model they load, packed/ "
                "the compact form")
    if kinds != {"rtn"}:
        return f"nothing to export (entries of kinds {sorted(kinds)})"
    return None


def quant_params(scale: torch.Tensor, zero: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """compressed-tensors' (scale, integer zero point) per group, ``[out, groups]`` each, for our RTN groups
    ``w = code * scale + zero``, stored at ``width`` bits (at least the layer's own).

    Their grid is ``(q - zp) * scale`` with ``q`` in ``-2**(width-1) .. 2**(width-1) - 1``; with ``q = code + q_min``
    our grid is theirs at the zero point ``q_min - zero / scale``, which is rounded to the nearest integer (and
    clamped to the range of ``q``): every weight of a group moves by the same ``(zp - exact) * scale``, at most half
    a scale (more only where the clamp bites: a group whose weights are all of one sign, whose grid cannot contain 0
    otherwise). The scale is kept as it is."""
    q_min, q_max = -(2 ** (width - 1)), 2 ** (width - 1) - 1
    s = scale.float()
    return s, torch.round(q_min - zero.float() / s).clamp(q_min, q_max)


def _entries(folder: Path) -> tuple[dict, dict]:
    from safetensors.torch import load_file

    manifest = json.loads((folder / "manifest.json").read_text())
    return manifest, load_file(str(folder / "packed.safetensors"))


def _scheme(width: int, group_size: int, names: list[str]):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    targets = ["re:^" + name.replace(".", r"\.") + "$" for name in names]
    return QuantizationScheme(targets=targets, format="pack-quantized", weights=QuantizationArgs(
        num_bits=width, type="int", symmetric=False, strategy="group", group_size=group_size))


def _quantize(model, manifest: dict, stored: dict, width: int) -> dict:
    """Attach the scheme to every quantized layer of ``model`` (whose weights are ours, dequantized), set its scale
    and zero point; returns the conversion error (from compressed-tensors' own quantize / dequantize)."""
    from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize

    rtn = {k.removesuffix(".weight"): e for k, e in manifest["entries"].items()}
    group_size = next(iter(rtn.values()))["group_size"]
    scheme = _scheme(width, group_size, sorted(rtn))
    apply_quantization_config(model, QuantizationConfig(config_groups={"group_0": scheme},
                                                        quantization_status="frozen"))
    modules = dict(model.named_modules())
    worst = worst_rel = total_sq = 0.0
    count = 0
    for name, entry in rtn.items():
        key = f"{name}.weight"
        m = modules[name]
        s, zp = quant_params(stored[f"{key}::scale"], stored[f"{key}::zero"], width)
        with torch.no_grad():
            m.weight_scale.copy_(s.to(m.weight_scale.dtype))
            m.weight_zero_point.copy_(zp.to(m.weight_zero_point.dtype))
            ours = m.weight.detach().float()
            theirs = fake_quantize(m.weight, m.weight_scale, m.weight_zero_point, scheme.weights).float()
        diff = (theirs - ours).abs()
        ours_scale = stored[f"{key}::scale"].float().repeat_interleave(group_size, dim=1)
        worst = max(worst, float(diff.max()))
        worst_rel = max(worst_rel, float((diff / ours_scale).max()))
        total_sq += float((diff * diff).sum())
        count += diff.numel()
    return {"max_abs_weight_error": worst, "max_weight_error_over_scale": worst_rel,
            "rms_weight_error": math.sqrt(total_sq / count), "weights": count, "group_size": group_size}


def export(source: Path, out: Path, fmt: str = "compressed-tensors", overwrite: bool = False) -> dict:
    """Write the compressed-tensors folder of a compress output (or packed folder) ``source`` into ``out``
    (atomically; an ``out`` that holds something is replaced only with ``overwrite``). Returns export.json's dict."""
    from aligntool.outputs import atomic_path, check_output

    if fmt not in FORMATS:
        raise UserError(f"--format: {fmt!r} is not one of {', '.join(FORMATS)}")
    folder = packed_folder(source)
    manifest, _ = _entries(folder)
    why = unsupported(manifest)
    if why is not None:
        raise UserError(f"export: {folder}: {why}")
    out = Path(out).expanduser()
    check_output(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        report = write(folder, tmp)
    return report


def write(folder: Path, tmp: Path) -> dict:
    """The compressed-tensors model of the packed ``folder`` written into the new folder ``tmp`` (no checks)."""
    try:
        from compressed_tensors.compressors import ModelCompressor
    except ImportError:
        raise UserError("export: compressed-tensors is not installed (pip install 'aligntool[compressed-tensors]')") \
            from None
    from aligntool import models
    from aligntool.compress.packed import load_packed

    manifest, stored = _entries(folder)
    bits = sorted({e["bits"] for e in manifest["entries"].values()})
    width = bits[-1]
    model = load_packed(folder)
    error = _quantize(model, manifest, stored, width)
    compressor = ModelCompressor.from_pretrained_model(model)
    compressor.compress_model(model)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp, safe_serialization=True)
    compressor.update_config(str(tmp))
    config = json.loads((tmp / "config.json").read_text())
    config["quantization_config"]["dequantize"] = True  # transformers' route for asymmetric packed weights
    (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    models.load_tokenizer(str(folder), key="OUTPUT").save_pretrained(tmp)
    report = {"format": "compressed-tensors", "scheme": f"W{width}A16 asymmetric, group {error['group_size']}",
              "bits": bits, "stored_bits": width, "conversion": error,
              "bytes": sum(p.stat().st_size for p in tmp.iterdir() if p.suffix == ".safetensors")}
    (tmp / REPORT).write_text(json.dumps(report, indent=2) + "\n")
    return report


def available() -> bool:
    import importlib.util

    return importlib.util.find_spec("compressed_tensors") is not None


def check_choice(choice: str) -> None:
    """``compress.export: compressed-tensors`` needs compressed-tensors installed: checked before the run."""
    if choice == "compressed-tensors" and not available():
        raise UserError("compress.export: compressed-tensors is not installed (pip install "
                        "'aligntool[compressed-tensors]'), or set compress.export: none")


def check_layers(choice: str, selected: dict | None) -> None:
    """``compress.export: compressed-tensors`` on layers it cannot hold (Conv1D, fused experts): refused before the
    run rather than after it."""
    if choice != "compressed-tensors" or not selected:
        return
    bad = next((x for x in selected.values() if x.transposed or x.expert is not None), None)
    if bad is not None:
        raise UserError(f"compress.export: {bad.name} is a {bad.kind} weight; compressed-tensors quantizes nn.Linear "
                        "modules only (set compress.export: auto or none)")


def for_compress(choice: str, packed: Path, dest: Path, log) -> dict | None:
    """``compress.export`` inside a compress run: write ``dest`` from the freshly written ``packed`` folder. ``auto``
    skips (with a note) what the format cannot hold or a missing compressed-tensors; ``compressed-tensors`` makes
    either an error. Returns what goes into compression_report.json's ``export``."""
    if choice == "none":
        return None
    why = unsupported(json.loads((packed / "manifest.json").read_text()))
    if why is None and not available():
        why = "compressed-tensors is not installed (pip install 'aligntool[compressed-tensors]')"
    if why is not None:
        if choice == "compressed-tensors":
            raise UserError(f"compress.export: {why}")
        log(f"note: no compressed-tensors export: {why}")
        return {"format": "compressed-tensors", "skipped": why}
    report = write(packed, dest)
    log(f"compressed-tensors export ({report['scheme']}): {report['bytes']} bytes in {dest.name}/; zero points made "
        f"integer: max |w_ct - w| = {report['conversion']['max_weight_error_over_scale']:.3f} scale")
    return {**report, "folder": dest.name}
