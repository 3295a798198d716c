"""M-FAC vs Wanda saliency for EvoPress's sparsity levels, side by side at the same sparsity budget.

Four `aligntool compress` runs (in process) per model on the same calibration and held-out windows:

* EvoPress levels built from the M-FAC ranking with the OBS update (``compress.saliency=mfac``) vs from Wanda's;
* uniform (no search: every layer at the target) with each saliency -- isolates the saliency from the search;
* with ``--no-update-too``, also M-FAC without the OBS update (ranking only), uniform and searched.

Prints the held-out KL(dense || compressed) and perplexity of every run, its wall time, and the ratios M-FAC / Wanda
(below 1: M-FAC is better). The search and calibration are sized for a 2-core CPU (smaller than the recipe defaults;
see SETTINGS).

    python scripts/bench_mfac.py [--models tiny,large] [--sparsity 0.6] [--quick]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

SETTINGS = {  # per model: calibration and search sizes that fit a loaded 2-core CPU
    "tiny": dict(seq_len=128, calib=48, heldout=16, generations=6, offspring=4, tokens=[256, 1024],
                 survivors=[2, 1], jlcm_steps=0, gradients=32),
    "large": dict(seq_len=128, calib=32, heldout=8, generations=4, offspring=4, tokens=[256, 1024],
                  survivors=[2, 1], jlcm_steps=0, gradients=16),
    "quick": dict(seq_len=32, calib=32, heldout=8, generations=2, offspring=3, tokens=[64, 256],
                  survivors=[2, 1], jlcm_steps=0, gradients=8),
}


def main() -> None:
    from bench_compress import run

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="tiny", help="tiny, large (28 M toy model, ~10 min to build once), or both")
    ap.add_argument("--quick", action="store_true", help="tiny sizes everywhere (a smoke run)")
    ap.add_argument("--sparsity", type=float, default=0.6)
    ap.add_argument("--no-update-too", action="store_true", help="also M-FAC ranking without the OBS update")
    a = ap.parse_args()
    import tempfile

    from aligntool import models
    from aligntool.toy.tiny import toy_model_path

    paths = {"tiny": str(models.resolve("tiny", log=lambda m: None))}
    if "large" in a.models:
        paths["large"] = str(toy_model_path(512, 8, 300))
    variants = [("Wanda", ["compress.saliency=wanda"]), ("M-FAC+OBS", ["compress.saliency=mfac"])]
    if a.no_update_too:
        variants.append(("M-FAC rank", ["compress.saliency=mfac", "compress.mfac_update=false"]))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in a.models.split(","):
            s = SETTINGS["quick" if a.quick else name]
            for method in ("evopress", "uniform"):
                for label, extra in variants:
                    out = Path(tmp, f"{name}-{method}-{len(rows)}")
                    r, t = run(paths[name], s, out, "compress_sparsity", f"compress.method={method}",
                               f"compress.sparsity={a.sparsity}", f"compress.mfac_gradients={s['gradients']}",
                               *extra)
                    rows.append((name, method, label, r, t))
                    print(f"done: {name} {method} {label}", file=sys.stderr, flush=True)
    print(f"held-out KL(dense||compressed) and perplexity at sparsity {a.sparsity}")
    print(f"{'model':>5} {'levels':>8} {'saliency':>10} {'KL':>8} {'ppl':>8} {'dense ppl':>9} {'sparsity':>8} "
          f"{'time s':>7}")
    for name, method, label, r, t in rows:
        print(f"{name:>5} {method:>8} {label:>10} {r['heldout']['kl']:>8.4f} {r['heldout']['ppl']:>8.3f} "
              f"{r['heldout']['ppl_dense']:>9.3f} {r['budget']['sparsity']:>8.4f} {t:>7.1f}")
    print("ratios (M-FAC / Wanda at the same levels method; below 1: M-FAC is better)")
    base = {(n, m): r for n, m, label, r, _ in rows if label == "Wanda"}
    for name, method, label, r, _ in rows:
        if label != "Wanda":
            w = base[name, method]
            print(f"{name:>5} {method:>8} {label}/Wanda: KL ratio {r['heldout']['kl'] / w['heldout']['kl']:.3f}, "
                  f"ppl ratio {r['heldout']['ppl'] / w['heldout']['ppl']:.3f}")


if __name__ == "__main__":
    main()
