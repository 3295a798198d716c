"""`aligntool compress`: EvoPress level arithmetic and mutation, every mode end to end on the tiny model (budget exact,
packed form round-trips, the folder loads and generates), resume of an interrupted search, bad input."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import REPO, cli_error

from aligntool.cli import main
from aligntool.compress import evopress, layers, levels

SMALL = ["calibration.seq_len=32", "calibration.num_sequences=32", "calibration.heldout_sequences=8",
         "compress.evopress.generations=3", "compress.evopress.offspring=4", "compress.evopress.survivors=[2,1]",
         "compress.evopress.tokens=[128,512]", "compress.evopress.initial_candidates=4"]
LINEAR = r"model\.layers\.\d+\.(self_attn|mlp)\.\w+_proj"


def test_sparsity_levels_match_the_evopress_test_vector():
    # EvoPress (Sieberling et al. 2025), the authors' level arithmetic (IST-DASLab/EvoPress): numel 4096^2, s 0.5,
    # weights_diff 1e6, L 8 -> levels -8..8, sparsity 0.0231628..0.9768372
    n = 4096 * 4096
    lo, hi = levels.level_range(n, 0.5, 1_000_000, 8)
    assert (lo, hi) == (-8, 8)
    k0 = n // 2
    assert (k0 + lo * 1_000_000) / n == pytest.approx(0.0231628, abs=1e-7)
    assert (k0 + hi * 1_000_000) / n == pytest.approx(0.9768372, abs=1e-7)
    assert levels.default_step(0.7, 8, n) == 314572  # the authors' default weights_diff for hidden 4096, s 0.7
    # near the ends of the range fewer levels fit: s 0.05 of 1000 weights, step 20 -> k0 50, 2 levels down, 8 up
    assert levels.level_range(1000, 0.05, 20, 8) == (-2, 8)


@pytest.mark.parametrize("mode", ["sparsity", "quant"])
def test_mutation_keeps_the_budget_exactly_and_the_levels_in_range(mode):
    rng = random.Random(0)
    numel = [100, 100, 300, 300, 300, 50]
    if mode == "sparsity":  # any two layers may trade: each level step is the same number of weights everywhere
        space = SimpleNamespace(mode=mode, lo=[-3, -1, -4, -4, -2, 0], hi=[3, 4, 4, 1, 4, 2], group=[0] * 6)
        parent = (0,) * 6
        budget = lambda c: sum(c)  # noqa: E731
    else:  # bits trade only between layers of the same size
        space = SimpleNamespace(mode=mode, lo=[2] * 6, hi=[6] * 6, group=[0, 0, 1, 1, 1, 2])
        parent = (3,) * 6
        budget = lambda c: sum(n * b for n, b in zip(numel, c))  # noqa: E731
    seen = set()
    child = parent
    for _ in range(500):
        child = evopress.mutate(child, space, rng, max_flips=3)
        assert budget(child) == budget(parent)
        assert all(lo <= x <= hi for x, lo, hi in zip(child, space.lo, space.hi))
        seen.add(child)
    assert len(seen) > 20  # it explores (the quant space has 57 states in all)
    if mode == "quant":  # the lone 50-weight layer has no partner: it never moves
        assert all(c[5] == 3 for c in seen)


def test_depth_mutation_swaps_one_dropped_unit_for_a_kept_one():
    space = SimpleNamespace(mode="depth", lo=[0] * 8, hi=[1] * 8, group=[0] * 8)
    parent = (1, 0, 0, 1, 0, 0, 0, 0)
    for seed in range(20):
        child = evopress.mutate(parent, space, random.Random(seed), max_flips=3)
        assert sum(child) == 2 and sum(a != b for a, b in zip(parent, child)) == 2


def run_compress(capsys, out: Path, recipe: str, *overrides: str) -> dict:
    code = main(["compress", "--recipe", recipe, f"output_dir={out}", *SMALL, *overrides])
    captured = capsys.readouterr()
    assert code == 0, captured.err[-3000:]
    assert captured.out.strip().splitlines()[-1] == str(out)
    return json.loads((out / "compression_report.json").read_text())


def check_folder(out: Path) -> dict:
    """The folder loads in transformers and generates; the packed form rebuilds exactly the same weights."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from aligntool.compress.packed import load_packed

    model = AutoModelForCausalLM.from_pretrained(out).eval()
    rebuilt = load_packed(out / "packed")
    a, b = model.state_dict(), rebuilt.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("Tell me about the hotel.", return_tensors="pt").input_ids
    gen = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    assert gen.shape[1] > ids.shape[1]
    assert (out / "levels.png").stat().st_size > 1000
    report = json.loads((out / "compression_report.json").read_text())
    # real bytes: what is on disk
    assert report["bytes"]["packed"] == sum((out / "packed" / f).stat().st_size for f in ("packed.safetensors",
                                                                                             "manifest.json"))
    return a


@pytest.mark.slow
def test_evopress_sparsity_meets_the_budget_exactly_and_round_trips(tmp_path, tiny_path, capsys):
    out = tmp_path / "sparse"
    report = run_compress(capsys, out, "compress_sparsity", "compress.sparsity=0.6")
    weights = check_folder(out)
    import re

    layers = {k: v for k, v in weights.items() if re.fullmatch(LINEAR + r"\.weight", k)}
    total = sum(v.numel() for v in layers.values())
    zeros = sum(int((v == 0).sum()) for v in layers.values())
    assert zeros == sum(round(0.6 * v.numel()) for v in layers.values())  # exact, whatever levels were chosen
    assert report["budget"]["pruned_weights"] == zeros and report["budget"]["weights"] == total
    step = report["budget"]["step_weights"]
    for row in report["layers"]:  # every layer's actual zeros sit on its level grid
        pruned = int((layers[row["name"] + ".weight"] == 0).sum())
        assert (pruned - round(0.6 * row["weights"])) % step == 0
    assert len(report["search"]["history"]) == 3
    assert report["bytes"]["compressed_layers_packed"] < 0.6 * report["bytes"]["compressed_layers_dense"]
    assert report["heldout"]["kl"] > 0 and report["calibration"]["kl"] > 0


@pytest.mark.slow
def test_evopress_quant_and_uniform_rtn_meet_the_bit_budget(tmp_path, tiny_path, capsys):
    out = tmp_path / "quant"
    report = run_compress(capsys, out, "compress_quant", "compress.bits=3", "compress.group_size=64")
    weights = check_folder(out)
    rows = report["layers"]
    assert sum(r["bits"] * r["weights"] for r in rows) == 3 * sum(r["weights"] for r in rows)
    for r in rows:  # each group of 64 weights holds at most 2^bits distinct values
        w = weights[r["name"] + ".weight"]
        groups = w.view(w.shape[0], -1, 64)
        assert max(len(torch.unique(g)) for g in groups.reshape(-1, 64)[:50]) <= 2 ** r["bits"]
        # bytes: bit-packed codes + fp16 scale and zero per group
        assert r["bytes_packed"] == (w.numel() * r["bits"] + 7) // 8 + 2 * 2 * w.numel() // 64
    uniform = run_compress(capsys, tmp_path / "rtn", "compress_quant", "compress.method=uniform", "compress.bits=3",
                           "compress.group_size=64")
    assert {r["bits"] for r in uniform["layers"]} == {3} and uniform["search"] is None
    # bits equal to the lowest level leave no budget-keeping switch: a one-line error, not a crash
    assert main(["compress", "--recipe", "compress_quant", f"output_dir={tmp_path / 'b2'}", *SMALL,
                 "compress.bits=2"]) == 2
    assert "no level switch keeps the budget" in capsys.readouterr().err


@pytest.mark.slow
def test_evopress_depth_drops_exactly_that_many_sub_blocks(tmp_path, tiny_path, capsys):
    out = tmp_path / "depth"
    report = run_compress(capsys, out, "compress_depth", "compress.drop=3")
    weights = check_folder(out)
    dropped = report["budget"]["dropped_names"]
    assert len(dropped) == 3 and report["budget"]["dropped"] == 3
    for name in dropped:
        sub = [v for k, v in weights.items() if k.startswith(name + ".") and k.endswith("proj.weight")]
        assert sub and all(bool((v == 0).all()) for v in sub)
    kept = [r["name"] for r in report["layers"] if not r["dropped"]]
    assert all(bool((weights[k] != 0).any()) for k in weights if any(k.startswith(n + ".") for n in kept))
    manifest = json.loads((out / "packed" / "manifest.json").read_text())
    assert sum(e["kind"] == "dropped" for e in manifest["entries"].values()) == sum(
        1 for k in weights if k.endswith("proj.weight") and any(k.startswith(n + ".") for n in dropped))


@pytest.mark.slow
def test_jlcm_writes_codebooks_at_the_target_bits(tmp_path, tiny_path, capsys):
    out = tmp_path / "jlcm"
    report = run_compress(capsys, out, "compress_jlcm", "compress.bits=2", "compress.jlcm_steps=10",
                          "compress.jlcm_groups=4", "compress.jlcm_tokens=256")
    weights = check_folder(out)
    manifest = json.loads((out / "packed" / "manifest.json").read_text())
    for row in report["layers"]:
        entry = manifest["entries"][row["name"] + ".weight"]
        assert entry["kind"] == "jlcm" and entry["bits"] == 2 and len(entry["bounds"]) == 5
        # 4 codebooks of 4 values: the whole layer holds at most 16 distinct weights
        assert len(torch.unique(weights[row["name"] + ".weight"])) <= 16
        out_rows, cols = weights[row["name"] + ".weight"].shape
        assert row["bytes_packed"] == (out_rows * cols * 2 + 7) // 8 + 2 * 4 * 4 + 4 * out_rows
    assert 2.0 < report["budget"]["bits_per_weight"] < 2.3


def _tiny_sparsity_space(tiny_path):
    from aligntool import models
    from aligntool.compress import calibration
    from aligntool.compress.recipe import load_compress_recipe
    from aligntool.compress.run import log_probs, scores

    recipe = load_compress_recipe("compress_sparsity", SMALL)
    tok = models.load_tokenizer(str(tiny_path))
    model = models.load_model(str(tiny_path)).eval()
    calib, _ = calibration.load_windows(recipe.calibration, tok)
    linears = layers.compressible_layers(model, recipe.compress.layers)
    norms, _ = layers.input_stats(model, linears, calib, 8)
    dense = log_probs(model, calib, 8)
    space = levels.SparsitySpace(linears, norms, 0.5, 8, None)

    def fitness(candidate, idx):
        space.apply(candidate)
        return scores(model, calib[idx], dense[idx], 8)["kl"]

    return space, fitness, calib, recipe.compress.evopress.model_copy(update={"generations": 4})


@pytest.mark.slow
def test_an_interrupted_search_resumes_to_the_uninterrupted_result(tmp_path, tiny_path):
    space, fitness, calib, cfg = _tiny_sparsity_space(tiny_path)
    args = (len(calib), calib.shape[1], cfg, 0)
    straight = evopress.search(space, fitness, *args, tmp_path / "a.json", False, "f", progress=False)

    calls = {"n": 0}

    def dies_in_generation_3(candidate, idx):
        calls["n"] += 1
        if calls["n"] > 2 * (cfg.offspring + cfg.survivors[0] + 1) + 3:
            raise KeyboardInterrupt
        return fitness(candidate, idx)

    state = tmp_path / "b.json"
    with pytest.raises(KeyboardInterrupt):
        evopress.search(space, dies_in_generation_3, *args, state, False, "f", progress=False)
    assert json.loads(state.read_text())["generation"] == 2  # written after each finished generation
    resumed = evopress.search(space, fitness, *args, state, True, "f", progress=False)
    assert resumed["parent"] == straight["parent"]
    assert [h["fitness"] for h in resumed["history"]] == pytest.approx([h["fitness"] for h in straight["history"]])


@pytest.mark.slow
def test_a_killed_compress_run_leaves_no_output_folder_and_resumes(tmp_path, tiny_path, capsys):
    out = tmp_path / "run"
    state = tmp_path / ".run.search.json"
    cmd = [sys.executable, "-m", "aligntool.cli", "compress", "--recipe", "compress_sparsity", f"output_dir={out}",
           *SMALL, "compress.evopress.generations=50"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while not state.exists() and proc.poll() is None:  # the search ends by itself: no clock needed
            time.sleep(0.5)
        assert state.exists(), "the search state never appeared"
    finally:
        proc.kill()
        proc.wait()
    assert not out.exists()  # nothing half-written
    assert not list(tmp_path.glob(".run.tmp-*"))
    killed = json.loads(state.read_text())
    done = killed["generation"]
    assert 1 <= done < 50
    # a fresh process picks the killed search up where its last finished generation left it
    code = main(["compress", "--recipe", "compress_sparsity", f"output_dir={out}", *SMALL,
                 f"compress.evopress.generations={done + 1}", "--resume"])
    err = capsys.readouterr().err
    assert code == 0, err[-2000:]
    assert f"Resuming the search at generation {done} of {done + 1}" in err
    report = json.loads((out / "compression_report.json").read_text())
    assert report["search"]["history"][:done] == killed["history"]  # kept, not redone
    assert len(report["search"]["history"]) == done + 1
    code = main(["compress", "--recipe", "compress_sparsity", f"output_dir={out}", *SMALL, "--resume"])
    assert code == 2  # the finished run removed its state: nothing to resume
    assert not state.exists()


# ---------------------------------------------------------------------------------------------------- bad input
def expect_error(capsys, args, *needles):
    cli_error(capsys, args, *needles)


@pytest.mark.parametrize("override,needles", [
    ("compress.sparsity=1.0", ["compress.sparsity", "less than 1"]),
    ("compress.sparsity=0", ["compress.sparsity", "greater than 0"]),
    ("compress.evopress.tokens=[128,2048]", ["calibration set has 1024"]),
    ("compress.evopress.tokens=[100,512]", ["not a multiple of calibration.seq_len 32"]),
    ("compress.evopress.survivors=[2,2]", ["last stage must keep 1"]),
    ("compress.layers=nothing_here", ["compress.layers", "matches no linear layer", "q_proj"]),
])
def test_bad_compress_recipes_are_one_line_errors(capsys, tmp_path, tiny_path, override, needles):
    expect_error(capsys, ["compress", "--recipe", "compress_sparsity", f"output_dir={tmp_path / 'x'}", *SMALL,
                          override], *needles)
    assert not (tmp_path / "x").exists()


def test_bad_quant_budgets_and_models(capsys, tmp_path, tiny_path):
    base = ["compress", "--recipe", "compress_quant", f"output_dir={tmp_path / 'x'}", *SMALL]
    expect_error(capsys, [*base, "compress.bits=1.5"], "compress.bits 1.5 is outside", "2..6")
    expect_error(capsys, [*base, "compress.group_size=100"], "compress.group_size", "does not divide")
    expect_error(capsys, ["compress", "--recipe", "compress_jlcm", "compress.bits=2.5"], "whole bits")
    empty = tmp_path / "noweights"
    empty.mkdir()
    (empty / "config.json").write_text((tiny_path / "config.json").read_text())
    expect_error(capsys, [*base, f"model.name_or_path={empty}"], "model.name_or_path", "no weights")
    expect_error(capsys, ["compress", "--recipe", "compress_depth", f"output_dir={tmp_path / 'd'}", *SMALL,
                          "compress.drop=8"], "compress.drop", "8 units")


def test_short_calibration_file_and_corrupted_packed_file(capsys, tmp_path, tiny_path):
    text = tmp_path / "calib.txt"
    text.write_text("the hotel was nice .\n" * 20)
    expect_error(capsys, ["compress", "--recipe", "compress_sparsity", f"output_dir={tmp_path / 'x'}", *SMALL,
                          f"calibration.path={text}"], "calibration.path", "windows of 32 tokens", "need")
    # a packed folder with one flipped byte is refused on load
    out = tmp_path / "q"
    assert main(["compress", "--recipe", "compress_quant", f"output_dir={out}", *SMALL, "compress.method=uniform",
                 "compress.group_size=64"]) == 0
    capsys.readouterr()
    blob = out / "packed" / "packed.safetensors"
    data = bytearray(blob.read_bytes())
    data[-5] ^= 0xFF
    blob.write_bytes(bytes(data))
    expect_error(capsys, ["unpack", str(out / "packed"), "--out", str(tmp_path / "u")], "checksum mismatch")
    blob.write_bytes(bytes(data[:-5]) + bytes([data[-5] ^ 0xFF]) + bytes(data[-4:]))  # restored
    assert main(["unpack", str(out / "packed"), "--out", str(tmp_path / "u")]) == 0
    capsys.readouterr()
    manifest = out / "packed" / "manifest.json"  # so is a manifest whose settings were changed
    manifest.write_text(manifest.read_text().replace('"bits": 3', '"bits": 2', 1))
    expect_error(capsys, ["unpack", str(out / "packed"), "--out", str(tmp_path / "u2")], "checksum mismatch")


@pytest.mark.slow
def test_bf16_gqa_untied_model_with_biases_round_trips(tmp_path, tiny_path, capsys):
    """A Qwen2-shaped model: bf16 weights, grouped-query attention (k/v smaller than q), q/k/v biases, an untied
    output head -- every mode's packed form rebuilds exactly the weights of the loadable folder."""
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    tok = AutoTokenizer.from_pretrained(tiny_path)
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    assert model.model.layers[0].self_attn.k_proj.bias is not None
    src = tmp_path / "qwen"
    model.save_pretrained(src)
    tok.save_pretrained(src)
    for mode in (["compress_sparsity"], ["compress_quant", "compress.group_size=64"],
                 ["compress_depth", "compress.drop=1"]):
        out = tmp_path / mode[0]
        report = run_compress(capsys, out, mode[0], f"model.name_or_path={src}", *mode[1:])
        weights = check_folder(out)
        assert weights["lm_head.weight"].dtype == torch.bfloat16
        assert not torch.equal(weights["lm_head.weight"], weights["model.embed_tokens.weight"])
        if mode[0] == "compress_depth" and "self_attn" in report["budget"]["dropped_names"][0]:
            assert bool((weights[report["budget"]["dropped_names"][0] + ".k_proj.bias"] == 0).all())


def test_train_and_compress_recipes_are_not_mixed_up(capsys):
    expect_error(capsys, ["train", "--recipe", "compress_quant"], "compress recipe", "aligntool compress")
    expect_error(capsys, ["compress", "--recipe", "dpo"], "training recipe", "aligntool train")


def test_calibration_from_a_jsonl_table_and_a_text_file(tmp_path, tiny_path, capsys):
    from aligntool.compress.calibration import _toy_texts

    texts = _toy_texts(400, "train", 3)
    table = tmp_path / "calib.jsonl"
    table.write_text("".join(json.dumps({"body": t}) + "\n" for t in texts))
    expect_error(capsys, ["compress", "--recipe", "compress_quant", f"output_dir={tmp_path / 'x'}", *SMALL,
                          f"calibration.path={table}"], "calibration.text_column", "'text'", "body")
    report = run_compress(capsys, tmp_path / "q", "compress_quant", "compress.method=uniform", "compress.group_size=64",
                          f"calibration.path={table}", "calibration.text_column=body")
    assert report["calibration"]["windows"] == 32 and report["heldout"]["windows"] == 8
    text = tmp_path / "calib.txt"
    text.write_text("\n".join(texts))
    report = run_compress(capsys, tmp_path / "t", "compress_quant", "compress.method=uniform", "compress.group_size=64",
                          f"calibration.path={text}")
    assert report["calibration"]["windows"] == 32
