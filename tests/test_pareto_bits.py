"""Smoke test of scripts/reproduce_pareto_bits.py (--quick: the tiny model's first block at 4 and 2 bits, RTN and
JLCM, plus bf16): the printed table, its bytes against an independent count of what a packed file must hold, the
Pareto frontier recomputed here from the table, the bf16 packed folders against the compressor's dense output, and
the PNG."""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow  # ~40 s of CPU (the script in a subprocess: model loads, JLCM, scoring)
ROW = re.compile(r"^\s+(\S+)\s+(\d+)\s+(rtn|jlcm|-)\s+(\d+|bf16)\s+(\d+)\s+([\d.]+)\s+([\d.]+)$", re.M)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory, tiny_path):
    out = tmp_path_factory.mktemp("pareto")
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "reproduce_pareto_bits.py"), "--quick", "--out",
                           str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [dict(size=m[0], params=int(m[1]), method=m[2], bits=m[3], bytes=int(m[4]), loss=float(m[5]),
                 kl=float(m[6])) for m in ROW.findall(proc.stdout)]
    return out, proc.stdout, rows


def _counts(tiny_path):
    """(all parameters, weights of the linear layers of block 0) of the tiny model, counted here."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_path)
    params = sum(p.numel() for p in model.parameters())
    block0 = sum(m.weight.numel() for m in model.model.layers[0].modules() if isinstance(m, torch.nn.Linear))
    return params, block0


def test_table_has_every_point_and_real_bytes(quick_run, tiny_path):
    _, out, rows = quick_run
    got = {(r["method"], r["bits"]) for r in rows}
    assert got == {("rtn", "4"), ("rtn", "2"), ("jlcm", "4"), ("jlcm", "2"), ("-", "bf16")}, out
    params, block0 = _counts(tiny_path)
    by = {(r["method"], r["bits"]): r for r in rows}
    assert all(r["params"] == params for r in rows)
    # bf16: 2 bytes a parameter + the safetensors header (a few KB at most)
    assert 2 * params < by["-", "bf16"]["bytes"] < 2 * params + 16_384
    # RTN: bit-packed codes + an fp16 scale and zero per 128 weights (the hidden size), the rest bf16, + header and
    # manifest
    for bits in (4, 2):
        need = math.ceil(block0 * bits / 8) + 4 * block0 // 128 + 2 * (params - block0)
        assert need < by["rtn", str(bits)]["bytes"] < need + 16_384, (bits, need, out)
    # JLCM: the codes + per-group codebooks and row permutations, never less than the codes alone
    for bits in (4, 2):
        assert by["jlcm", str(bits)]["bytes"] > math.ceil(block0 * bits / 8) + 2 * (params - block0)
    assert by["rtn", "2"]["bytes"] < by["rtn", "4"]["bytes"] < by["-", "bf16"]["bytes"]
    # fewer bits, a larger divergence from the bf16 model (one block only, so small but clearly ordered)
    assert 0 < by["rtn", "4"]["kl"] < by["rtn", "2"]["kl"]
    assert by["-", "bf16"]["kl"] == 0


def test_frontier_matches_the_table(quick_run):
    _, out, rows = quick_run
    front, best = [], math.inf
    for r in sorted(rows, key=lambda r: (r["bytes"], r["loss"])):
        if r["loss"] < best:
            front.append(r)
            best = r["loss"]
    printed = re.findall(r"^\s+(\d+) bytes\s+\S+\s+(\S+)\s+(\S+)-bit\s+loss ([\d.]+)$", out, re.M)
    assert [(int(b), m, bits) for b, m, bits, _ in printed] == [(r["bytes"], r["method"], r["bits"]) for r in front]
    assert re.search(r"^claim \(4-bit Pareto-dominates .*\): (holds|does not hold) on these models$", out, re.M)


def test_packed_bf16_folders_load_and_equal_the_compressed_model(quick_run):
    import torch
    from transformers import AutoModelForCausalLM

    from aligntool.compress.packed import load_packed

    root, _, _ = quick_run
    for name in ("rtn-4", "jlcm-2"):
        folder = root / "tiny" / name
        packed = load_packed(folder / "packed")
        dense = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)  # what the compressor scored
        assert next(packed.parameters()).dtype == torch.bfloat16
        ref = dense.state_dict()
        for key, t in packed.state_dict().items():
            assert torch.equal(t, ref[key].to(torch.bfloat16)), key
        # the unquantized tensors are stored bf16-exact: nothing was rounded when they were rewritten
        assert torch.equal(packed.model.embed_tokens.weight.float(), dense.model.embed_tokens.weight)


def test_png_written(quick_run):
    root, out, _ = quick_run
    png = root / "pareto_bits.png"
    assert f"plot: {png}" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
