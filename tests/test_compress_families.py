"""`aligntool compress` on every family of `aligntool/toy/families.py` (GPT-2's Conv1D, GPT-NeoX's and Phi-3's fused
projections, Gemma's soft-capping, Qwen2-MoE's fused experts, ...): every mode runs in-process on each, the written
folder loads in transformers and its packed form rebuilds exactly that model, and the compressed matrices changed as
the mode says -- nothing else did. Plus: the Conv1D path is the nn.Linear path on the transposed weight, a fused
expert's calibration inputs are the tokens routed to it, and the bad-input errors."""

from __future__ import annotations

import functools
import json
import re

import pytest
import torch
from test_compress import expect_error

from aligntool.compress import layers, levels
from aligntool.toy.families import FAMILIES, family_model_path

# the smallest run that still goes through every step: calibration, one EvoPress generation of two offspring,
# scoring, both output forms
TINY = ["calibration.seq_len=16", "calibration.num_sequences=4", "calibration.heldout_sequences=2",
        "compress.eval_batch_size=4", "compress.evopress.generations=1", "compress.evopress.offspring=2",
        "compress.evopress.survivors=[1]", "compress.evopress.tokens=[32]", "compress.evopress.initial_candidates=2"]
MODES = {
    "sparsity": ["compress_sparsity", "compress.sparsity=0.5", "compress.sparsity_levels=2"],
    "quant": ["compress_quant", "compress.bits=3", "compress.bits_min=2", "compress.bits_max=4",
              "compress.group_size=32"],  # 32 divides every input size, the MoE experts' down_proj (32) included
    "depth": ["compress_depth", "compress.drop=1"],
    "jlcm": ["compress_jlcm", "compress.bits=2", "compress.jlcm_groups=2", "compress.jlcm_steps=2",
             "compress.jlcm_tokens=32"],
}
# default layers: every projection of the 2 decoder blocks; Qwen2-MoE: 4 attention + 3 shared-expert projections
# + 4 experts x (gate_up_proj, down_proj) per block, not the router nor the shared-expert gate
EXPECTED_LAYERS = {"gpt2": 8, "gpt_neox": 8, "phi3": 8, "qwen2_moe": 30}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """64-wide matrices gain nothing from threads, and on a busy machine their spinning costs seconds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@functools.lru_cache(maxsize=None)
def dense_state(family: str) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(family_model_path(family)).state_dict()


def load_model(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).eval()


def matrix(model, state: dict, name: str) -> torch.Tensor:
    """The [out, in] matrix of layer ``name``, located without aligntool: a fused expert's slice
    (``<module>.<param>.<e>`` of a 3-D tensor), a Conv1D's transposed weight, or an nn.Linear's weight."""
    from transformers.pytorch_utils import Conv1D

    fused = re.fullmatch(r"(.+)\.(\d+)", name)
    if fused and fused[1] in state and state[fused[1]].dim() == 3:
        return state[fused[1]][int(fused[2])]
    w = state[name + ".weight"]
    return w.T if isinstance(model.get_submodule(name), Conv1D) else w


def state_key(name: str, state: dict) -> str:
    fused = re.fullmatch(r"(.+)\.(\d+)", name)
    return fused[1] if fused and fused[1] in state else name + ".weight"


def run(family: str, mode: str, out, *extra: str) -> dict:
    from aligntool.compress.recipe import load_compress_recipe
    from aligntool.compress.run import compress

    recipe, *overrides = MODES[mode]
    loaded = load_compress_recipe(recipe, [f"model.name_or_path={family_model_path(family)}", f"output_dir={out}",
                                           *TINY, *overrides, *extra])
    return compress(loaded, progress=False)


def written(out) -> tuple[torch.nn.Module, dict]:
    """The folder loads in transformers; the packed form rebuilds exactly the same tensors."""
    from aligntool.compress.packed import load_packed

    model = load_model(out)
    state = model.state_dict()
    rebuilt = load_packed(out / "packed").state_dict()
    assert state.keys() == rebuilt.keys()
    for key in state:
        assert torch.equal(state[key], rebuilt[key]), key
    return model, state


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("family", FAMILIES)
def test_every_mode_compresses_every_family(family, mode, tmp_path):
    report = run(family, mode, tmp_path / "out")
    model, state = written(tmp_path / "out")
    dense = dense_state(family)
    rows = report["layers"]
    manifest = json.loads((tmp_path / "out" / "packed" / "manifest.json").read_text())["entries"]

    if mode == "depth":  # one unit dropped: its sub-module outputs exactly zero, so the residual passes through
        (dropped,) = report["budget"]["dropped_names"]
        assert report["budget"]["units"] == 4  # attention and MLP of 2 blocks
        seen = []
        handle = model.get_submodule(dropped).register_forward_hook(lambda m, a, o: seen.append(o))
        with torch.no_grad():
            model(input_ids=torch.randint(0, 100, (1, 8)))
        handle.remove()
        output = seen[0][0] if isinstance(seen[0], tuple) else seen[0]
        assert bool((output == 0).all()), dropped
        zeroed = {k for k in state if k.startswith(dropped + ".") and not torch.equal(state[k], dense[k])}
        assert zeroed and all(bool((state[k] == 0).all()) for k in zeroed)
        assert all(torch.equal(state[k], dense[k]) for k in state if not k.startswith(dropped + "."))
        if family == "qwen2_moe" and dropped.endswith("mlp"):
            assert {dropped + ".experts.gate_up_proj", dropped + ".experts.down_proj"} <= zeroed
        return

    names = [r["name"] for r in rows]
    assert len(names) == EXPECTED_LAYERS.get(family, 14), names
    assert not any("lm_head" in n or "embed" in n or n.endswith("gate") for n in names), names
    if family == "gpt2":
        assert "transformer.h.0.attn.c_attn" in names
        assert manifest["transformer.h.0.attn.c_attn.weight"].get("transposed") is True
    if family == "qwen2_moe":
        assert {"model.layers.0.mlp.experts.gate_up_proj.3", "model.layers.1.mlp.experts.down_proj.0"} <= set(names)
        entry = manifest["model.layers.0.mlp.experts.gate_up_proj"]
        kind = {"sparsity": "sparse", "quant": "rtn", "jlcm": "jlcm"}[mode]
        assert entry["kind"] == "experts" and {e["kind"] for e in entry["experts"].values()} == {kind}

    touched = {state_key(n, state) for n in names}
    for key in state:  # nothing else changed (a bias of a compressed layer is kept)
        if key not in touched:
            assert torch.equal(state[key], dense[key]), key
    for row in rows:
        w, w0 = matrix(model, state, row["name"]), matrix(model, dense, row["name"])
        assert w.shape == w0.shape and not torch.equal(w, w0), row["name"]
        if mode == "sparsity":  # exactly the report's fraction of zeros; the kept weights untouched
            assert int((w == 0).sum()) == round(row["sparsity"] * w.numel()), row
            assert torch.equal(w[w != 0], w0[w != 0])
        elif mode == "quant":  # every group of 32 weights along a row holds at most 2^bits values
            groups = w.reshape(-1, 32)
            assert max(len(torch.unique(g)) for g in groups) <= 2 ** row["bits"], row
        else:  # 2 codebooks of 4 values
            assert len(torch.unique(w)) <= 8, row
    if mode == "sparsity":
        assert report["budget"]["pruned_weights"] == sum(round(0.5 * r["weights"]) for r in rows)
    if mode == "quant":
        assert sum(r["bits"] * r["weights"] for r in rows) == 3 * sum(r["weights"] for r in rows)


@pytest.mark.slow
def test_a_pattern_can_pick_single_experts_and_the_others_stay_dense(tmp_path):
    out = tmp_path / "one"
    report = run("qwen2_moe", "quant", out, "compress.method=uniform", r"compress.layers=.*experts\.down_proj\.1")
    assert [r["name"] for r in report["layers"]] == [f"model.layers.{i}.mlp.experts.down_proj.1" for i in (0, 1)]
    model, state = written(out)
    dense = dense_state("qwen2_moe")
    key = "model.layers.0.mlp.experts.down_proj"
    assert not torch.equal(state[key][1], dense[key][1])
    assert all(torch.equal(state[key][e], dense[key][e]) for e in (0, 2, 3))
    entry = json.loads((out / "packed" / "manifest.json").read_text())["entries"][key]
    assert [entry["experts"][str(e)]["kind"] for e in range(4)] == ["dense", "rtn", "dense", "dense"]


class _Wrap(torch.nn.Module):
    """input_ids -> embedding -> one layer: the smallest model input_stats can run."""

    def __init__(self, layer, embed):
        super().__init__()
        self.embed, self.layer = embed, layer

    def forward(self, input_ids):
        return self.layer(self.embed(input_ids))


def test_conv1d_is_compressed_as_the_linear_with_the_transposed_weight():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    embed = torch.nn.Embedding(20, 64)
    linear = torch.nn.Linear(64, 48)
    conv = Conv1D(48, 64)
    with torch.no_grad():
        conv.weight.copy_(linear.weight.T)
        conv.bias.copy_(linear.bias)
    a, b = _Wrap(linear, embed), _Wrap(conv, embed)
    ids = torch.randint(0, 20, (4, 8))
    torch.testing.assert_close(a(ids), b(ids))
    la, lb = layers.compressible_layers(a, "layer"), layers.compressible_layers(b, "layer")
    assert la["layer"].shape == lb["layer"].shape == (48, 64)
    na, xa = layers.input_stats(a, la, ids, 2, keep_tokens=10)
    nb, xb = layers.input_stats(b, lb, ids, 2, keep_tokens=10)
    assert torch.equal(na["layer"], nb["layer"]) and torch.equal(xa["layer"], xb["layer"])
    assert xa["layer"].shape == (10, 64)
    for space_a, space_b, level in [
        (levels.SparsitySpace(la, na, 0.5, 4, None), levels.SparsitySpace(lb, nb, 0.5, 4, None), 1),
        (levels.QuantSpace(la, 3, 2, 4, 16), levels.QuantSpace(lb, 3, 2, 4, 16), 2),
    ]:
        space_a.apply((level,))
        space_b.apply((level,))
        assert not torch.equal(linear.weight, space_a.dense["layer"][0])  # it did compress
        assert torch.equal(conv.weight, linear.weight.T)  # the same weights, in Conv1D's layout
        torch.testing.assert_close(a(ids), b(ids))
        space_a.restore()
        space_b.restore()
        assert torch.equal(conv.weight, linear.weight.T) and torch.equal(linear.weight, space_a.dense["layer"][0])


def test_expert_inputs_are_the_tokens_routed_to_each_expert():
    """Wanda's norms of a fused expert, recomputed from the MoE block's input and the router's top-k by hand."""
    model = load_model(family_model_path("qwen2_moe"))
    chosen = layers.compressible_layers(model, r"model\.layers\.1\.mlp\.experts")
    assert len(chosen) == 8
    moe = model.model.layers[1].mlp
    seen = []
    handle = moe.register_forward_pre_hook(lambda m, args: seen.append(args[0].reshape(-1, args[0].shape[-1])))
    ids = torch.randint(0, 500, (3, 16))
    norms, inputs = layers.input_stats(model, chosen, ids, 2, keep_tokens=48)
    handle.remove()
    h = torch.cat(seen)
    top = torch.topk(torch.softmax(h @ moe.gate.weight.T, -1), 2, dim=-1).indices
    for e in range(4):
        x = h[(top == e).any(-1)]
        gate, up = (x @ moe.experts.gate_up_proj[e].T).chunk(2, dim=-1)
        mid = torch.nn.functional.silu(gate) * up
        torch.testing.assert_close(norms[f"model.layers.1.mlp.experts.gate_up_proj.{e}"], x.norm(dim=0))
        torch.testing.assert_close(norms[f"model.layers.1.mlp.experts.down_proj.{e}"], mid.norm(dim=0))
        torch.testing.assert_close(inputs[f"model.layers.1.mlp.experts.gate_up_proj.{e}"], x)  # all 48 tokens kept
    assert sum(len(inputs[f"model.layers.1.mlp.experts.down_proj.{e}"]) for e in range(4)) == 2 * 48  # top 2


@pytest.mark.parametrize("family,pattern,needles", [
    ("qwen2_moe", r".*layers\.0\.mlp\.gate", ["compress.layers: model.layers.0.mlp.gate is a Qwen2MoeTopKRouter",
                                               "nn.Linear, transformers Conv1D and fused MoE experts"]),
    ("gpt2", r"transformer\.wte", ["compress.layers: transformer.wte is a Embedding"]),
    ("llama3", r".*input_layernorm", ["model.layers.0.input_layernorm is a LlamaRMSNorm"]),
    ("gpt2", "nothing_here", ["matches no linear layer", "transformer.h.0.attn.c_attn"]),
    ("qwen2_moe", "nothing_here", ["matches no linear layer", "model.layers.0.mlp.experts.gate_up_proj.{0..3}"]),
])
def test_layers_compress_cannot_handle_are_one_line_errors(capsys, tmp_path, family, pattern, needles):
    expect_error(capsys, ["compress", "--recipe", "compress_sparsity", f"output_dir={tmp_path / 'x'}", *TINY,
                          f"model.name_or_path={family_model_path(family)}", f"compress.layers={pattern}"], *needles)
    assert not (tmp_path / "x").exists()


def test_a_pattern_that_is_no_regex_is_a_one_line_error(capsys, tmp_path):
    expect_error(capsys, ["compress", "--recipe", "compress_quant", f"output_dir={tmp_path / 'x'}", *TINY,
                          f"model.name_or_path={family_model_path('gpt2')}", "compress.layers=(c_attn"],
                 "compress.layers", "not a valid regex")
