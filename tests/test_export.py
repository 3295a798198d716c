"""The compressed-tensors export (`compress.export`, `aligntool export`): transformers loads it, its weights are ours
moved by the integer zero point (computed here by hand from packed/), its logits are those of `aligntool unpack`'s
model moved by that weight change, its bytes on disk are what the packed format says; and what the format cannot hold
is refused in one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import cli_error

from aligntool.cli import main

pytest.importorskip("compressed_tensors")
pytestmark = pytest.mark.slow

SMALL = ["calibration.seq_len=32", "calibration.num_sequences=16", "calibration.heldout_sequences=4"]


# EvoPress at 3.5 bits between 3 and 4: its starting point already mixes the two widths (one short generation)
MIXED = ["compress.method=evopress", "compress.bits=3.5", "compress.bits_min=3", "compress.bits_max=4",
         "compress.evopress.generations=1", "compress.evopress.offspring=2", "compress.evopress.survivors=[1]",
         "compress.evopress.tokens=[128]", "compress.evopress.initial_candidates=2"]


def _compress(capsys, out: Path, bits, *extra: str) -> None:
    budget = MIXED if bits == "mixed" else ["compress.method=uniform", f"compress.bits={bits}",
                                            f"compress.bits_max={max(bits, 6)}"]
    code = main(["compress", "--recipe", "compress_quant", f"output_dir={out}", *SMALL, *budget, *extra])
    assert code == 0, capsys.readouterr().err[-3000:]
    capsys.readouterr()


def _by_hand(packed: Path, width: int, ours: dict) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per quantized weight: (compressed-tensors' weight, our scale per weight), from packed/'s scales and zero
    points and unpack's weights ``ours`` alone: the zero point ``zp = round(q_min - z / s)``, then their quantizer
    ``q = clamp(round(w / s + zp), q_min, q_max)`` and ``w' = (q - zp) * s`` (a weight of ours sits on
    ``code * s + z``; with the zero point moved it lands within half a step of theirs, on a tie on either side)."""
    from safetensors.torch import load_file

    manifest = json.loads((packed / "manifest.json").read_text())
    stored = load_file(str(packed / "packed.safetensors"))
    q_min = -(2 ** (width - 1))
    out = {}
    for key, e in manifest["entries"].items():
        rows, cols = e["shape"]
        g = e["group_size"]
        s, z = stored[f"{key}::scale"].float()[..., None], stored[f"{key}::zero"].float()[..., None]
        zp = torch.round(q_min - z / s).clamp(q_min, -q_min - 1)
        q = torch.round(ours[key].float().view(rows, -1, g) / s + zp).clamp(q_min, -q_min - 1)
        out[key] = ((q - zp) * s).view(rows, cols), s.expand(-1, -1, g).reshape(rows, cols)
    return out


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def _expected_bytes(folder: Path) -> int:
    """Tensor bytes of the export by hand: per quantized layer ``ceil(in * b / 32)`` int32 words per row, fp32 scale
    per group, the zero points packed ``ceil(out * b / 32)`` words per group column, the 2-entry int64 shape; every
    other tensor as the dense model stores it (tied embeddings once)."""
    import math

    from safetensors import safe_open

    config = json.loads((folder / "config.json").read_text())
    scheme = config["quantization_config"]["config_groups"]["group_0"]["weights"]
    b, g = scheme["num_bits"], scheme["group_size"]
    total = 0
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        names = set(f.keys())
        for name in names:
            if name.endswith(".weight_packed"):
                rows, cols = f.get_tensor(name.replace("weight_packed", "weight_shape")).tolist()
                total += rows * math.ceil(cols * b / 32) * 4 + rows * (cols // g) * 4
                total += math.ceil(rows * b / 32) * (cols // g) * 4 + 2 * 8
            elif not name.endswith(("weight_scale", "weight_zero_point", "weight_shape")):
                t = f.get_slice(name)
                total += math.prod(t.get_shape()) * 4
    return total


@pytest.mark.parametrize("bits", [4, 8, "mixed"])
def test_transformers_loads_the_export_with_the_stated_conversion_error(capsys, tmp_path, tiny_path, bits):
    """4 bits written by compress itself, 8 bits by `aligntool export` afterwards (and not over itself without
    --overwrite), EvoPress' mixed 3/4 bits stored at 4."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    out = tmp_path / f"q{bits}"
    if bits != 8:  # compress writes it (compress.export: auto)
        _compress(capsys, out, bits)
    else:  # `aligntool export` writes it from an output that has none
        _compress(capsys, out, bits, "compress.export=none")
        assert not (out / "compressed-tensors").exists()
        assert main(["export", str(out)]) == 0
        assert capsys.readouterr().out.strip() == str(out / "compressed-tensors")
        # not written over without --overwrite; with it, replaced whole
        marker = out / "compressed-tensors" / "export.json"
        before = marker.read_text()
        cli_error(capsys, ["export", str(out)], "--out", "already holds a model", "--overwrite")
        marker.write_text("{}")
        assert main(["export", str(out), "--overwrite"]) == 0
        assert marker.read_text() == before and not list(out.glob(".compressed-tensors.tmp-*"))
        capsys.readouterr()
    folder = out / "compressed-tensors"
    qc = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    width = 4 if bits == "mixed" else bits
    assert [g["weights"]["num_bits"] for g in qc["config_groups"].values()] == [width]
    widths = {e["bits"] for e in json.loads((out / "packed" / "manifest.json").read_text())["entries"].values()}
    assert widths == ({3, 4} if bits == "mixed" else {bits})
    assert main(["unpack", str(out / "packed"), "--out", str(tmp_path / "unpacked")]) == 0
    capsys.readouterr()
    ours = AutoModelForCausalLM.from_pretrained(tmp_path / "unpacked").eval()
    theirs = AutoModelForCausalLM.from_pretrained(folder).eval()

    # weights: theirs are ours moved by the integer zero point, |move| <= scale / 2
    a, b = ours.state_dict(), theirs.state_dict()
    expected = _by_hand(out / "packed", width, a)
    assert a.keys() == b.keys()
    worst = 0.0
    for key in a:
        if key in expected:
            want, scale = expected[key]
            assert torch.allclose(b[key], want, rtol=0, atol=1e-6 * float(want.abs().max())), key
            worst = max(worst, float(((want - a[key]).abs() / scale).max()))
        else:
            assert torch.equal(a[key], b[key]), key
    assert 0.4 < worst <= 0.5 + 1e-6  # the conversion's bound, reached

    # logits: unpack's model with the weights moved as above gives theirs (the error the conversion implies)
    ids = torch.randint(2, ours.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    moved = AutoModelForCausalLM.from_pretrained(tmp_path / "unpacked").eval()
    moved.load_state_dict({**a, **{k: w for k, (w, _) in expected.items()}})
    implied, got, base = _logits(moved, ids), _logits(theirs, ids), _logits(ours, ids)
    assert (got - implied).abs().max() <= 1e-4 * base.abs().max()
    assert (got - base).abs().max() > 1e-3  # the conversion does move the logits (the test can see a bad one)

    # bytes on disk: what the format stores, against the dense model
    report = json.loads((folder / "export.json").read_text())
    size = (folder / "model.safetensors").stat().st_size
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        header = 8 + int.from_bytes((folder / "model.safetensors").read_bytes()[:8], "little")
        assert len(list(f.keys())) > 0
    assert size - header == _expected_bytes(folder) and report["bytes"] == size
    dense = (tiny_path / "model.safetensors").stat().st_size
    assert size < {4: 0.22, 8: 0.33}[width] * dense


def test_export_refuses_what_the_format_cannot_hold(capsys, tmp_path):
    from safetensors.torch import save_file

    from aligntool.compress.packed import FORMAT

    def fake(name: str, entry: dict) -> Path:
        folder = tmp_path / name / "packed"
        folder.mkdir(parents=True)
        save_file({"x": torch.zeros(1)}, str(folder / "packed.safetensors"))
        (folder / "manifest.json").write_text(json.dumps({"format": FORMAT, "entries": {"a.weight": entry}}))
        return folder.parent

    for name, entry, needle in [
        ("sparse", {"kind": "sparse"}, "dropped the sparse formats"),
        ("depth", {"kind": "dropped"}, "depth pruning (dropped sub-blocks) has no compressed-tensors scheme"),
        ("jlcm", {"kind": "jlcm", "bits": 3}, "JLCM codebooks have no compressed-tensors scheme"),
        ("moe", {"kind": "experts"}, "fused MoE expert weights"),
        ("gpt2", {"kind": "rtn", "bits": 4, "transposed": True}, "Conv1D (GPT-2)"),
    ]:
        cli_error(capsys, ["export", str(fake(name, entry))], "export:", needle, "packed/")
        assert not (tmp_path / name / "compressed-tensors").exists()
    cli_error(capsys, ["export", str(tmp_path)], "OUTPUT:", "neither a compress output")
    cli_error(capsys, ["export", str(tmp_path / "sparse"), "--format", "gguf"], "--format", "'gguf'")
    cli_error(capsys, ["compress", "--recipe", "compress_sparsity", "compress.export=compressed-tensors"],
              "compress.export", "mode sparsity")


def test_compress_export_auto_notes_what_it_skips(monkeypatch, tmp_path):
    """compress.export: auto leaves out (with a note naming why) what compressed-tensors cannot hold, or a missing
    compressed-tensors; compress.export: compressed-tensors makes both an error."""
    from aligntool.compress import export
    from aligntool.compress.packed import FORMAT
    from aligntool.errors import UserError

    packed = tmp_path / "packed"
    packed.mkdir()
    notes = []
    for entries, missing, needle in [({"a.weight": {"kind": "dropped"}}, False, "depth pruning"),
                                     ({"a.weight": {"kind": "rtn", "bits": 4}}, True, "not installed")]:
        (packed / "manifest.json").write_text(json.dumps({"format": FORMAT, "entries": entries}))
        monkeypatch.setattr(export, "available", lambda missing=missing: not missing)
        got = export.for_compress("auto", packed, tmp_path / "ct", notes.append)
        assert needle in got["skipped"] and needle in notes[-1] and notes[-1].startswith("note: ")
        with pytest.raises(UserError, match=f"compress.export: .*{needle}"):
            export.for_compress("compressed-tensors", packed, tmp_path / "ct", notes.append)
        assert export.for_compress("none", packed, tmp_path / "ct", notes.append) is None
        assert not (tmp_path / "ct").exists()
