"""EvoPress vs uniform compression at the same budget, and JLCM vs round-to-nearest at the same bits, side by side.

For each model (the built-in tiny one and a ~28 M-parameter toy model pretrained the same way, built once and cached):

* sparsity: EvoPress (per-layer levels searched) vs uniform (every layer at the target), same average sparsity;
* quantization: EvoPress bit-widths vs uniform round-to-nearest at the same average bits (same group size);
* codebooks: JLCM vs uniform round-to-nearest at the same code bits.

Each line is one `aligntool compress` run (in process) on the same calibration and held-out windows; the ratios are
EvoPress / uniform and JLCM / RTN of the held-out KL(dense || compressed) and perplexity (below 1: the first is
better). Prints the wall time of every run.

    python scripts/bench_compress.py [--models tiny,large] [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

SETTINGS = {  # per model: calibration and search sizes that fit a 2-core CPU
    "tiny": dict(seq_len=128, calib=128, heldout=32, generations=40, offspring=16, tokens=[1024, 8192],
                 survivors=[4, 1], jlcm_steps=200),
    "large": dict(seq_len=128, calib=64, heldout=16, generations=16, offspring=8, tokens=[512, 2048],
                  survivors=[2, 1], jlcm_steps=100),
    "quick": dict(seq_len=64, calib=32, heldout=8, generations=3, offspring=4, tokens=[256, 1024],
                  survivors=[2, 1], jlcm_steps=10),
}


def run(model: str, s: dict, out: Path, recipe: str, *overrides: str) -> tuple[dict, float]:
    from aligntool.compress.recipe import load_compress_recipe
    from aligntool.compress.run import compress

    loaded = load_compress_recipe(recipe, [
        f"model.name_or_path={model}", f"output_dir={out}", f"calibration.seq_len={s['seq_len']}",
        f"calibration.num_sequences={s['calib']}", f"calibration.heldout_sequences={s['heldout']}",
        f"compress.evopress.generations={s['generations']}", f"compress.evopress.offspring={s['offspring']}",
        f"compress.evopress.tokens={s['tokens']}", f"compress.evopress.survivors={s['survivors']}",
        f"compress.jlcm_steps={s['jlcm_steps']}", *overrides])
    start = time.time()
    with contextlib.redirect_stderr(io.StringIO()):
        report = compress(loaded, progress=False)
    return report, time.time() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="tiny,large", help="tiny, large (28 M toy model), or both")
    ap.add_argument("--quick", action="store_true", help="tiny sizes everywhere (a smoke run)")
    ap.add_argument("--sparsity", type=float, default=0.6)
    ap.add_argument("--bits", type=int, default=3)
    a = ap.parse_args()
    from aligntool import models
    from aligntool.toy.tiny import toy_model_path

    paths = {"tiny": str(models.resolve("tiny", log=lambda m: None))}
    if "large" in a.models:
        paths["large"] = str(toy_model_path(512, 8, 300))
    comparisons = [
        ("sparsity", "compress_sparsity", ["compress.method=evopress", f"compress.sparsity={a.sparsity}"],
         ["compress.method=uniform", f"compress.sparsity={a.sparsity}"]),
        ("quant", "compress_quant", ["compress.method=evopress", f"compress.bits={a.bits}"],
         ["compress.method=uniform", f"compress.bits={a.bits}"]),
        ("codebook", "compress_jlcm", ["compress.method=jlcm", f"compress.bits={a.bits}"],
         ["compress.method=uniform", "compress.mode=quant", f"compress.bits={a.bits}"]),
    ]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in a.models.split(","):
            s = SETTINGS["quick" if a.quick else name]
            for what, recipe, first, second in comparisons:
                r1, t1 = run(paths[name], s, Path(tmp, f"{name}-{what}-1"), recipe, *first)
                r2, t2 = run(paths[name], s, Path(tmp, f"{name}-{what}-2"), recipe, *second)
                rows.append((name, what, r1, t1, r2, t2))
                print(f"done: {name} {what}", file=sys.stderr, flush=True)
    labels = {"sparsity": ("EvoPress", "uniform"), "quant": ("EvoPress", "uniform RTN"), "codebook": ("JLCM", "RTN")}
    print(f"held-out KL(dense||compressed) and perplexity; sparsity {a.sparsity}, {a.bits} bits")
    print(f"{'model':>5} {'budget':>8} {'method':>11} {'KL':>8} {'ppl':>8} {'dense ppl':>9} {'layer bytes':>11} "
          f"{'bits/w':>6} {'time s':>7}")
    for name, what, r1, t1, r2, t2 in rows:
        for label, r, t in ((labels[what][0], r1, t1), (labels[what][1], r2, t2)):
            b = r["bytes"]
            weights = sum(x["weights"] for x in r["layers"])
            print(f"{name:>5} {what:>8} {label:>11} {r['heldout']['kl']:>8.4f} {r['heldout']['ppl']:>8.3f} "
                  f"{r['heldout']['ppl_dense']:>9.3f} {b['compressed_layers_packed']:>11} "
                  f"{8 * b['compressed_layers_packed'] / weights:>6.2f} {t:>7.1f}")
    print("ratios (first / second; below 1: the first is better)")
    for name, what, r1, _, r2, _ in rows:
        kl = r1["heldout"]["kl"] / r2["heldout"]["kl"]
        ppl = r1["heldout"]["ppl"] / r2["heldout"]["ppl"]
        print(f"{name:>5} {labels[what][0]}/{labels[what][1]} ({what}): KL ratio {kl:.3f}, ppl ratio {ppl:.3f}")


if __name__ == "__main__":
    main()
