"""M-FAC (Frantar et al., NeurIPS 2021): the blockwise Sherman-Morrison inverse against dense float64 linear algebra
(IHVP, inverse diagonal, OBS saliency and update), the per-window gradients against autograd on one window, the
EvoPress sparsity database built from the M-FAC ranking, `aligntool compress compress.saliency=mfac` end to end on the
tiny model, bad input.

Damping convention (the paper's): ``F = lambda * I + (1/m) sum_i g_i g_i^T`` -- lambda added once, the gradients'
outer products averaged over m."""

from __future__ import annotations

import json

import pytest
import torch
from test_compress import SMALL, check_folder, expect_error, run_compress

from aligntool.compress import mfac


def dense_fisher(g: torch.Tensor, lam: float, block: int) -> torch.Tensor:
    """Block-diagonal ``lambda I + (1/m) G_b^T G_b`` per block of ``block`` consecutive coordinates, float64."""
    m, d = g.shape
    f = torch.zeros(d, d, dtype=torch.float64)
    for s in range(0, d, block):
        gb = g[:, s: s + block].double()
        f[s: s + block, s: s + block] = lam * torch.eye(gb.shape[1], dtype=torch.float64) + gb.T @ gb / m
    return f


@pytest.mark.parametrize("d,m,block", [(64, 8, 64), (200, 32, 200), (200, 16, 48)])  # one block; one; 4 + a rest
def test_ihvp_and_inverse_diagonal_equal_the_dense_inverse(d, m, block):
    torch.manual_seed(d + m)
    g = torch.randn(m, d, dtype=torch.float64) * 0.1
    lam = 1e-3
    inv = mfac.BlockFisherInverse(g, block, lam, dtype=torch.float64)
    f = dense_fisher(g, lam, block)
    for _ in range(3):
        v = torch.randn(d, dtype=torch.float64)
        want = torch.linalg.solve(f, v)
        torch.testing.assert_close(inv.mul(v), want, rtol=1e-9, atol=1e-9 * float(want.abs().max()))
    dense_inv = torch.linalg.inv(f)
    torch.testing.assert_close(inv.diag(), dense_inv.diagonal(), rtol=1e-9, atol=0)
    # the blocks are independent: the inverse of each block alone is the same numbers
    s = (d // block) * block - block if d >= block else 0
    alone = mfac.BlockFisherInverse(g[:, s: s + block], block, lam, dtype=torch.float64)
    torch.testing.assert_close(inv.diag()[s: s + block], alone.diag(), rtol=1e-12, atol=0)
    # float32 (what compress uses) stays close on this well-conditioned problem
    inv32 = mfac.BlockFisherInverse(g.float(), block, lam)
    torch.testing.assert_close(inv32.diag().double(), dense_inv.diagonal(), rtol=1e-4, atol=0)


def test_obs_saliency_and_single_weight_update_match_the_dense_formulas():
    torch.manual_seed(1)
    w = torch.randn(8, 16, dtype=torch.float64)  # a small linear layer, flattened row-major: d = 128
    g = torch.randn(24, 128, dtype=torch.float64) * 0.05
    lam, block = 1e-2, 32
    inv = mfac.BlockFisherInverse(g, block, lam, dtype=torch.float64)
    h = torch.linalg.inv(dense_fisher(g, lam, block))
    flat = w.reshape(-1)
    rho = mfac.obs_saliency(w, inv.diag())
    torch.testing.assert_close(rho, flat**2 / (2 * h.diagonal()), rtol=1e-9, atol=0)
    j = int(rho.argmin())
    new = mfac.obs_update(w, torch.tensor([j]), inv).reshape(-1)
    want = flat - flat[j] / h[j, j] * h[:, j]  # delta_w = -(w_j / [H^-1]_jj) H^-1 e_j
    assert new[j] == 0 and abs(want[j]) < 1e-9  # OBS's own update already zeroes w_j
    torch.testing.assert_close(new, want, rtol=1e-9, atol=1e-12)
    # only j's block moves (the Fisher is block-diagonal)
    outside = torch.ones(128, dtype=torch.bool)
    outside[j // block * block: (j // block + 1) * block] = False
    assert torch.equal(new[outside], flat[outside])
    # the quadratic model's loss increase of that update is rho_j: 1/2 dw^T F dw
    dw = new - flat
    assert float(0.5 * dw @ torch.linalg.solve(h, dw)) == pytest.approx(float(rho[j]), rel=1e-8)


def test_several_weights_get_the_sum_of_their_obs_updates_then_exact_zeros():
    torch.manual_seed(2)
    w = torch.randn(4, 32, dtype=torch.float64)
    g = torch.randn(16, 128, dtype=torch.float64) * 0.05
    inv = mfac.BlockFisherInverse(g, 64, 1e-2, dtype=torch.float64)
    h = torch.linalg.inv(dense_fisher(g, 1e-2, 64))
    flat = w.reshape(-1)
    drop = torch.tensor([3, 40, 70, 127])
    want = flat.clone()
    for j in drop.tolist():
        want -= flat[j] / h[j, j] * h[:, j]
    want[drop] = 0
    torch.testing.assert_close(mfac.obs_update(w, drop, inv).reshape(-1), want, rtol=1e-9, atol=1e-12)


def test_relative_damp_is_a_fraction_of_the_mean_fisher_diagonal():
    g = torch.tensor([[1.0, 2.0], [3.0, 0.0]])  # diag of (1/m) G^T G: (1+9)/2, (4+0)/2 -> mean 3.5
    assert mfac.relative_damp(g, 0.1) == pytest.approx(0.35)
    assert mfac.relative_damp(torch.zeros(2, 2), 0.1) == 0.1


def _tiny(tiny_path, n=4):
    from aligntool import models
    from aligntool.compress import calibration, layers
    from aligntool.compress.recipe import load_compress_recipe

    recipe = load_compress_recipe("compress_sparsity", SMALL)
    model = models.load_model(str(tiny_path)).eval()
    calib, _ = calibration.load_windows(recipe.calibration, models.load_tokenizer(str(tiny_path)))
    return model, layers.compressible_layers(model, None), calib[:n]


def test_layer_gradients_are_each_windows_own_gradient(tiny_path):
    model, selected, windows = _tiny(tiny_path)
    flags = [p.requires_grad for p in model.parameters()]
    with torch.enable_grad():
        grads = mfac.layer_gradients(model, selected, windows)
    assert [p.requires_grad for p in model.parameters()] == flags and all(p.grad is None for p in model.parameters())
    name, layer = next(iter(selected.items()))
    ids = windows[2:3]
    model.zero_grad()
    with torch.enable_grad():
        model(input_ids=ids, labels=ids).loss.backward()
    want = layer.module.weight.grad.reshape(-1)  # nn.Linear: [out, in] as stored
    assert grads[name].shape == (4, layer.numel)
    torch.testing.assert_close(grads[name][2], want)
    assert not torch.allclose(grads[name][1], want)  # another window, another gradient
    model.zero_grad()


def test_mfac_space_prunes_by_obs_saliency_and_stores_each_levels_obs_weights(tiny_path):
    from aligntool.compress.levels import SparsitySpace

    model, selected, windows = _tiny(tiny_path, n=8)
    with torch.enable_grad():
        grads = mfac.layer_gradients(model, selected, windows)
    space = mfac.MFACSparsitySpace(selected, dict(grads), 0.5, 2, None, None, block=64, damp=1e-2, update=True)
    plain = mfac.MFACSparsitySpace(selected, dict(grads), 0.5, 2, None, None, block=64, damp=1e-2, update=False)
    i, unit = 3, space.units[3]
    w = space.dense[unit.name][0].double()
    g = grads[unit.name].double()
    lam = 1e-2 * float((g**2).mean())
    # dense reference: the inverse's diagonal block by block, torch.linalg.inv per block
    diag = torch.cat([torch.linalg.inv(dense_fisher(g[:, s: s + 64], lam, 64)).diagonal()
                      for s in range(0, g.shape[1], 64)])
    rho = w.reshape(-1) ** 2 / (2 * diag)
    level = space.hi[i]
    k = space.pruned(i, level)
    pruned = ~space.mask(i, level).reshape(-1)
    assert int(pruned.sum()) == k
    # every pruned weight's saliency is at most every kept one's (float32 ties aside)
    assert float(rho[pruned].max()) <= float(rho[~pruned].min()) * (1 + 1e-4)
    new = space.weights(i, level)[unit.name].double().reshape(-1)
    assert bool((new[pruned] == 0).all())
    want = w.reshape(-1).clone()
    for s in range(0, want.numel(), 64):  # the summed OBS update of the pruned set, block by block
        h = torch.linalg.inv(dense_fisher(g[:, s: s + 64], lam, 64))
        p = pruned[s: s + 64]
        want[s: s + 64] -= h[:, p] @ (w.reshape(-1)[s: s + 64][p] / h.diagonal()[p])
    want[pruned] = 0
    torch.testing.assert_close(new, want, rtol=2e-3, atol=2e-3 * float(want.abs().max()))
    assert not torch.equal(new[~pruned], w.reshape(-1)[~pruned])  # the kept weights moved
    # without the update: the same mask, the dense weights masked
    assert torch.equal(plain.mask(i, level), space.mask(i, level))
    torch.testing.assert_close(plain.weights(i, level)[unit.name], space.dense[unit.name][0] * space.mask(i, level))
    # and a different order than Wanda's
    wanda = SparsitySpace(selected, {n: torch.ones(x.shape[1]) for n, x in selected.items()}, 0.5, 2, None)
    assert not torch.equal(wanda.mask(i, level), space.mask(i, level))


@pytest.mark.slow
def test_compress_with_mfac_saliency_writes_a_model_and_a_report(tmp_path, tiny_path, capsys):
    out = tmp_path / "mfac"
    report = run_compress(capsys, out, "compress_sparsity", "compress.sparsity=0.5", "compress.saliency=mfac",
                          "compress.mfac_gradients=8", "compress.mfac_block=64")
    weights = check_folder(out)  # loads, generates, and the packed form rebuilds the OBS-updated weights exactly
    assert report["saliency"] == {"kind": "mfac", "gradients": 8, "block": 64, "damp": 1e-2, "obs_update": True}
    zeros = sum(int((weights[r["name"] + ".weight"] == 0).sum()) for r in report["layers"])
    assert zeros == report["budget"]["pruned_weights"] == sum(round(0.5 * r["weights"]) for r in report["layers"])
    assert report["heldout"]["kl"] > 0 and len(report["search"]["history"]) == 3
    # the uniform baseline with the same saliency, without the OBS update: kept weights are the dense ones
    from transformers import AutoModelForCausalLM

    from aligntool import models

    base = run_compress(capsys, tmp_path / "u", "compress_sparsity", "compress.method=uniform",
                        "compress.saliency=mfac", "compress.mfac_gradients=8", "compress.mfac_update=false")
    assert base["saliency"]["obs_update"] is False
    dense = AutoModelForCausalLM.from_pretrained(models.resolve("tiny", log=lambda m: None)).state_dict()
    pruned = AutoModelForCausalLM.from_pretrained(tmp_path / "u").state_dict()
    for r in base["layers"]:
        key = r["name"] + ".weight"
        keep = pruned[key] != 0
        assert torch.equal(pruned[key][keep], dense[key][keep]) and r["sparsity"] == pytest.approx(0.5, abs=1e-3)


@pytest.mark.parametrize("overrides,needles", [
    (["compress.mfac_block=0"], ["compress.mfac_block", "greater than 0"]),
    (["compress.mfac_damp=0"], ["compress.mfac_damp", "greater than 0"]),
    (["compress.saliency=obd"], ["compress.saliency", "wanda", "mfac"]),
    (["compress.mfac_gradients=64"], ["compress.mfac_gradients", "num_sequences is 32"]),
])
def test_bad_mfac_settings_are_one_line_errors(capsys, tmp_path, tiny_path, overrides, needles):
    expect_error(capsys, ["compress", "--recipe", "compress_sparsity", f"output_dir={tmp_path / 'x'}", *SMALL,
                          "compress.saliency=mfac", *overrides], *needles)
    assert not (tmp_path / "x").exists()


def test_mfac_outside_sparsity_is_a_one_line_error(capsys, tmp_path):
    expect_error(capsys, ["compress", "--recipe", "compress_quant", f"output_dir={tmp_path / 'x'}", *SMALL,
                          "compress.saliency=mfac"], "saliency mfac", "mode sparsity", "mode quant")
    expect_error(capsys, ["compress", "--recipe", "compress_depth", "compress.saliency=mfac"], "mode depth")


def test_example_recipe_loads_with_mfac(tmp_path):
    from aligntool.compress.recipe import load_compress_recipe

    r = load_compress_recipe("compress_sparsity_mfac")
    assert r.compress.saliency == "mfac" and r.compress.mode == "sparsity"
    assert json.loads(r.model_dump_json())["compress"]["mfac_update"] is True
