"""``aligntool compress``: load the model and calibration text, compress (EvoPress search, uniform levels or JLCM),
score the result, write the output folder in one piece.

The output folder is a model folder transformers loads (compressed weights stored dense in safetensors), plus
``packed/`` (the real compressed form, see ``packed.py``), ``compression_report.json`` and ``levels.png``. It is
assembled beside its final place and renamed into it at the end, so an interrupted run never leaves half of one; the
search state lives in ``.<output>.search.json`` beside it until the run ends (``--resume`` continues from it).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from aligntool import models
from aligntool.compress import calibration, evopress, export, layers, levels, mfac, packed, quantizers
from aligntool.errors import UserError


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _check_weights(path: str) -> None:
    local = Path(path)
    if local.is_dir() and not any(local.glob("*.safetensors")) and not any(local.glob("*.bin")):
        raise UserError(f"model.name_or_path: {path} has no weights (expected model.safetensors or pytorch_model.bin)")


@torch.no_grad()
def log_probs(model, windows: torch.Tensor, batch_size: int) -> torch.Tensor:
    # above 1 GiB keep fp16 (EvoPress also caches the dense logits), converted batch by batch
    half = windows.numel() * model.config.vocab_size > 2**28
    out = []
    for b in range(0, len(windows), batch_size):
        lp = model(input_ids=windows[b: b + batch_size]).logits.float().log_softmax(-1)
        out.append(lp.half() if half else lp)
    return torch.cat(out)


def _nll(log_probs: torch.Tensor, ids: torch.Tensor) -> float:
    """Summed next-token negative log-likelihood of ``ids`` under per-position ``log_probs``."""
    return -float(log_probs[:, :-1].float().gather(-1, ids[:, 1:, None]).sum())


def _ppl(nll: float, windows: torch.Tensor) -> float:
    return math.exp(nll / (windows.shape[0] * (windows.shape[1] - 1)))


@torch.no_grad()
def scores(model, windows: torch.Tensor, dense: torch.Tensor | None, batch_size: int) -> dict:
    """Mean per-token KL(dense || model) over the vocabulary (if ``dense`` log-probs are given) and perplexity of
    next-token prediction."""
    kl = nll = 0.0
    for b in range(0, len(windows), batch_size):
        ids = windows[b: b + batch_size]
        lq = model(input_ids=ids).logits.float().log_softmax(-1)
        if dense is not None:
            lp = dense[b: b + batch_size].float()
            kl += float((lp.exp() * (lp - lq)).sum())
        nll += _nll(lq, ids)
    out = {"ppl": _ppl(nll, windows)}
    if dense is not None:
        out["kl"] = kl / windows.numel()
    return out


def _space(model, cfg, selected, norms, grads=None):
    if cfg.mode == "depth":
        space = levels.DepthSpace(model, cfg.drop, cfg.drop_unit)
    elif cfg.mode == "sparsity" and cfg.saliency == "mfac":
        space = mfac.MFACSparsitySpace(selected, grads, cfg.sparsity, cfg.sparsity_levels, cfg.sparsity_step,
                                       getattr(model.config, "hidden_size", None), cfg.mfac_block, cfg.mfac_damp,
                                       cfg.mfac_update)
    elif cfg.mode == "sparsity":
        space = levels.SparsitySpace(selected, norms, cfg.sparsity, cfg.sparsity_levels, cfg.sparsity_step,
                                     getattr(model.config, "hidden_size", None))
    else:
        space = levels.QuantSpace(selected, cfg.bits, cfg.bits_min, cfg.bits_max, cfg.group_size)
    space.n_initial = cfg.evopress.initial_candidates
    return space


def _encode(space, chosen) -> tuple[dict, list[dict]]:
    """Packed encodings of the chosen levels and the per-unit rows of the report."""
    encoded, rows = {}, []
    for i, (unit, level) in enumerate(zip(space.units, chosen)):
        packed_bytes = 0
        for name, layer in unit.layers.items():
            w = space.dense[name][0]
            if space.mode == "sparsity":  # the level's weights: M-FAC's OBS update moves the kept ones
                w = space.weights(i, level)[name] if getattr(space, "update", False) else w
                kind, parts, meta = ("sparse", *packed.encode_sparse(w, space.mask(i, level)))
            elif space.mode == "quant":
                kind, parts, meta = ("rtn", *packed.encode_rtn(space.rtn(i, level)))
            elif level:
                kind, parts, meta = "dropped", {}, {}
            else:
                packed_bytes += w.numel() * w.element_size()
                continue
            packed.add(encoded, layer, kind, parts, meta)
            packed_bytes += sum(p.numel() * p.element_size() for p in parts.values())
        dense_bytes = sum(x.numel * x.weight().element_size() for x in unit.layers.values())
        rows.append({"name": unit.name, "weights": unit.numel, **space.describe(i, level),
                     "bytes_dense": dense_bytes, "bytes_packed": packed_bytes})
    return encoded, rows


def _jlcm(cfg, selected, inputs) -> tuple[dict, list[dict]]:
    """JLCM codebooks for every selected layer, fitted on its calibration inputs (an expert no calibration token was
    routed to: on the weight error)."""
    from tqdm import tqdm

    encoded, rows = {}, []
    bits = int(cfg.bits)
    for name, layer in tqdm(selected.items(), desc="JLCM", unit="layer"):
        w = layer.weight().detach()
        x = inputs.get(name)
        try:
            res = quantizers.jlcm_quantize(w, bits, groups=min(cfg.jlcm_groups, w.shape[0]),
                                           inputs=x if x is not None and len(x) else None, steps=cfg.jlcm_steps,
                                           lr=cfg.jlcm_lr, seed=cfg.seed)
        except ValueError as exc:
            raise UserError(f"compress: {name} ({layer.kind}): {exc}") from None
        layer.set_weight(res.dequantize().to(w.dtype))
        packed.add(encoded, layer, "jlcm", *packed.encode_jlcm(res))
        rows.append({"name": name, "weights": w.numel(), "level": bits, "bits": bits,
                     "bits_per_weight": res.bits_per_weight(), "bytes_dense": w.numel() * w.element_size(),
                     "bytes_packed": res.nbytes()})
    return encoded, rows


def _plot(rows: list[dict], mode: str, method: str, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("note: matplotlib is not installed; levels.png skipped (pip install 'aligntool[plots]')")
        return False
    key = {"sparsity": "sparsity", "quant": "bits", "depth": "dropped"}[mode]
    values = [float(r[key]) for r in rows]
    fig, ax = plt.subplots(figsize=(max(6, 0.18 * len(rows)), 3.2))
    ax.bar(range(len(rows)), values, color="tab:blue")
    ax.set_xticks(range(len(rows)))
    short = [re.sub(r"^(.*\.)?(layers|h|blocks)\.(\d+)\.", r"L\3.", r["name"]).replace("self_attn.", "")
             .replace("mlp.", "") for r in rows]
    ax.set_xticklabels(short, rotation=90, fontsize=6)
    ax.set_ylabel(key)
    ax.set_title(f"{method} {mode}: per-layer levels")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def _fingerprint(recipe, model_path: str) -> str:
    data = recipe.model_dump(mode="json")
    data.pop("output_dir", None)
    data["compress"]["evopress"].pop("generations", None)  # more generations continue the same search
    return hashlib.sha256(json.dumps([data, model_path], sort_keys=True).encode()).hexdigest()[:16]


def _replace_dir(tmp: Path, out: Path) -> None:
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    if out.exists():
        os.rename(out, old)
    os.rename(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def compress(recipe, resume: bool = False, progress: bool = True, overwrite: bool = False) -> dict:
    """Run a compress recipe end to end; returns the report (also written to compression_report.json). An output_dir
    that already holds something (an earlier compress output, a training run) is replaced only with ``overwrite``."""
    from aligntool.outputs import check_output

    cfg = recipe.compress
    out = Path(recipe.output_dir).expanduser()
    check_output(out, overwrite, key="output_dir")
    export.check_choice(cfg.export)
    state_path = out.with_name(f".{out.name}.search.json")
    if resume and not state_path.is_file():
        raise UserError(f"--resume: no search state at {state_path}")
    path, tokenizer, model = _load(recipe.model)
    # the dense size of what is compressed: the model as loaded (a LoRA adapter folder: its base with the adapter
    # merged), not the files of ``path``
    dense_bytes = packed.tensor_bytes(model)
    # the layers first: a pattern that selects nothing (or a module compress cannot handle) fails before any pass
    selected = None if cfg.mode == "depth" else layers.compressible_layers(model, cfg.layers)
    export.check_layers(cfg.export, selected)
    torch.manual_seed(cfg.seed)
    calib, heldout = calibration.load_windows(recipe.calibration, tokenizer)
    bs = cfg.eval_batch_size
    start = time.time()
    dense_calib = log_probs(model, calib, bs)
    dense_heldout = log_probs(model, heldout, bs)
    dense_ppl = _ppl(_nll(dense_heldout, heldout), heldout)  # from the cached log-probs: no second pass
    log(f"Compressing {path} ({cfg.method}, {cfg.mode}) on {calib.shape[0]} x {calib.shape[1]} calibration tokens")
    if cfg.method == "jlcm":
        encoded, rows, achieved, search_info = _compress_jlcm(model, cfg, selected, calib)
    else:
        search = _Search(state_path, resume, _fingerprint(recipe, path), progress)
        encoded, rows, achieved, search_info = _compress_levels(model, cfg, selected, calib, dense_calib, search)
    compress_time = time.time() - start

    calib_scores = scores(model, calib, dense_calib, bs)
    held_scores = scores(model, heldout, dense_heldout, bs)

    def make_report(packed_bytes: int) -> dict:
        layer_dense = sum(r["bytes_dense"] for r in rows)
        layer_packed = sum(r["bytes_packed"] for r in rows)
        return {
            "model": path, "method": cfg.method, "mode": cfg.mode, "budget": achieved,
            **({"saliency": {"kind": "mfac", "gradients": cfg.mfac_gradients, "block": cfg.mfac_block,
                             "damp": cfg.mfac_damp, "obs_update": cfg.mfac_update}} if cfg.saliency == "mfac" else {}),
            "bytes": {"model_dense": dense_bytes, "packed": packed_bytes,
                      "ratio": round(packed_bytes / dense_bytes, 4),
                      "compressed_layers_dense": layer_dense, "compressed_layers_packed": layer_packed,
                      "compressed_layers_ratio": round(layer_packed / layer_dense, 4)},
            "calibration": {"windows": calib.shape[0], "seq_len": calib.shape[1], "kl": calib_scores["kl"]},
            "heldout": {"windows": heldout.shape[0], "kl": held_scores["kl"], "ppl": held_scores["ppl"],
                        "ppl_dense": dense_ppl},
            "search": search_info, "compress_time_s": round(compress_time, 2), "layers": rows,
        }

    report = _write_output(out, model, tokenizer, encoded, make_report, cfg.export)
    state_path.unlink(missing_ok=True)
    log(f"held-out ppl {dense_ppl:.3f} -> {held_scores['ppl']:.3f}, KL {held_scores['kl']:.4f}; "
        f"model {dense_bytes} -> {report['bytes']['packed']} bytes packed; written to {out}")
    return report


def _load(m):
    """(resolved path, tokenizer, model in eval mode) of the recipe's ``model`` section."""
    path = models.resolve(m.name_or_path, log=log)
    _check_weights(path)
    tokenizer = models.load_tokenizer(path, m.trust_remote_code, m.revision, chat_template=m.chat_template)
    model = models.load_model(path, **models.options(m, revision=True)).eval()
    return path, tokenizer, model


def _compress_jlcm(model, cfg, selected, calib):
    """JLCM: codebooks fitted on each layer's calibration inputs. Returns (encoded, rows, achieved, search info)."""
    _, inputs = layers.input_stats(model, selected, calib, cfg.eval_batch_size,
                                   keep_tokens=min(cfg.jlcm_tokens, calib.numel()), seed=cfg.seed)
    encoded, rows = _jlcm(cfg, selected, inputs)
    achieved = {"bits": cfg.bits, "bits_per_weight": 8 * sum(r["bytes_packed"] for r in rows)
                / sum(r["weights"] for r in rows), "groups": cfg.jlcm_groups}
    return encoded, rows, achieved, None


@dataclass
class _Search:
    """Where an EvoPress search keeps its state, and how it runs."""

    state_path: Path
    resume: bool
    fingerprint: str
    progress: bool


def _compress_levels(model, cfg, selected, calib, dense_calib, search: _Search):
    """Per-unit levels (sparsity, bits or dropped blocks): chosen by the EvoPress search or uniform, then applied.
    Returns (encoded, rows, achieved, search info)."""
    bs = cfg.eval_batch_size
    space = _space(model, cfg, selected, *_saliency(model, cfg, selected, calib))
    search_info = None
    if cfg.method == "evopress":
        def fitness(candidate, idx):
            space.apply(candidate)
            ids = calib[idx]
            return scores(model, ids, dense_calib[idx] if cfg.evopress.fitness == "kl" else None, bs)[
                cfg.evopress.fitness]

        search.state_path.parent.mkdir(parents=True, exist_ok=True)
        state = evopress.search(space, fitness, len(calib), calib.shape[1], cfg.evopress, cfg.seed, search.state_path,
                                search.resume, search.fingerprint, log=log, progress=search.progress)
        chosen = tuple(state["parent"])
        search_info = {"generations": state["generation"], "history": state["history"]}
    else:
        chosen = space.uniform()
    space.check(chosen)
    space.apply(chosen)
    encoded, rows = _encode(space, chosen)
    return encoded, rows, space.achieved(chosen), search_info


def _saliency(model, cfg, selected, calib) -> tuple[dict, dict | None]:
    """(input norms, M-FAC gradients) for the sparsity levels; empty for the other modes."""
    norms, grads = {}, None
    if cfg.mode == "sparsity" and cfg.saliency == "mfac":
        weights = sum(x.numel for x in selected.values())
        need = 4 * cfg.mfac_gradients * weights * (2 if cfg.mfac_update else 1) / 2**30
        log(f"M-FAC: {cfg.mfac_gradients} per-window gradients of {weights:,} weights, blocks of "
            f"{cfg.mfac_block} (about {need:.2f} GiB of gradients{' and inverses' if cfg.mfac_update else ''})")
        with torch.enable_grad():
            grads = mfac.layer_gradients(model, selected, calib[: cfg.mfac_gradients])
    elif cfg.mode == "sparsity":
        norms, _ = layers.input_stats(model, selected, calib, cfg.eval_batch_size)
    return norms, grads


def _write_output(out: Path, model, tokenizer, encoded: dict, make_report, export_choice: str = "none") -> dict:
    """The output folder, assembled beside its place and renamed into it: the model, ``packed/``, the
    ``compressed-tensors/`` export (``compress.export``), the report (``make_report(packed bytes)``) and levels.png.
    Returns the report."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        report = make_report(packed.write_packed(model, tokenizer, encoded, tmp / "packed"))
        report["export"] = export.for_compress(export_choice, tmp / "packed", tmp / export.FOLDER, log)
        (tmp / "compression_report.json").write_text(json.dumps(report, indent=2) + "\n")
        _plot(report["layers"], report["mode"], report["method"], tmp / "levels.png")
        _replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return report
