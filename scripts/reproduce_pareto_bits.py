"""Is the Pareto-optimal quantized language model mostly 4-bit? A post-training transplant, at toy scale, of
"Pareto-Optimal Quantized ResNet Is Mostly 4-bit" (Abdolrashidi, Wang, Agrawal, Malmaud, Rybakov, Leichner, Lew;
CVPR Workshops 2021, arXiv 2105.03536; code: google/aqt, the AQT library used there). The paper's claim: across model
sizes, at equal model size in bits, 4-bit models Pareto-dominate 8-bit (and bf16) ones, while lower bit-widths fall off.

Differences from the paper, on purpose: their ResNets were trained quantization-aware; here every model is quantized
POST-TRAINING (no finetune after quantization), with aligntool's own compressors, and the models are toy Llamas
pretrained on the toy corpus (``aligntool.toy.tiny.toy_model_path``; all share the tiny model's tokenizer).

The default sizes (64x4, 96x4, 160x4: hidden x layers, 0.25 / 0.54 / 1.44 M parameters) are toy models of one
recipe (``aligntool.toy.tiny.toy_model_path``: the same corpus, tokenizer, optimiser, 300 steps), so that size is the
only thing that changes. The built-in tiny model (``tiny``, 128x4) was pretrained with another recipe (more steps, a
higher learning rate), so it is not in the default family; ask for it with --sizes.

For each model size: the checkpoint is rounded to bf16 (its safetensors file is the bf16 point), then compressed to
8, 4, 3 and 2 bits by ``aligntool compress`` (in process, ``aligntool.compress.run.compress``) with

* RTN: ``compress.method: uniform, mode: quant`` (asymmetric min-max round-to-nearest, one fp16 scale and zero per
  ``--group-size`` weights of a row; by default the hidden size: a pair per row, three per row of down_proj);
* JLCM: ``compress.method: jlcm`` (a 2^bits-entry fp16 codebook per row group, learned jointly with the mapping).

Every linear layer inside the decoder blocks is quantized; the embeddings (tied with the output head) and the norms
stay bf16. Bytes are REAL bytes on disk: for a compressed model, ``packed/packed.safetensors`` + ``packed/
manifest.json`` (bit-packed codes, scales / zeros or codebooks and row permutations, and the bf16 tensors that were not
quantized: everything ``aligntool.compress.packed.load_packed`` needs besides config and tokenizer); for bf16,
``model.safetensors``. The compressor runs on the bf16-rounded weights loaded as float32 (fast on CPUs without bf16
units), so its packed folder stores the unquantized tensors as float32; they are bf16-exact, and the script rewrites
them as bf16 losslessly (checked) and checks that the folder still loads.

Held-out loss: mean next-token NLL (nats / token) of ``--heldout-docs`` documents drawn after the pretraining ones from
the pretraining corpus's own stream (same distribution, never trained on), each scored from position 0 and ended by
EOS exactly as in pretraining, with the model rebuilt from its packed folder (``load_packed``; bf16 for the bf16 point)
and run in float32. Not the compress report's perplexity: its windows (``calibration.seq_len`` tokens cut across
documents of ~26 tokens) reach positions the toy models never saw, and on them the larger toy models score a HIGHER
loss than the smaller ones (64x4 2.30 vs 160x4 2.79 nats at seq_len 64), the opposite of their pretraining loss. The
KL column is the report's held-out KL(bf16 || compressed) on its own windows; JLCM fits on ``--calib`` windows of
``--calib-docs`` other documents of the same stream.

Prints one row per point, the Pareto frontier (lowest loss at each byte budget) with its bit-widths, and which 8-bit,
bf16 and 2/3-bit points a 4-bit point dominates (no more bytes, no higher loss); writes pareto_bits.png (loss vs
bytes, log x) when matplotlib is installed.

    python scripts/reproduce_pareto_bits.py [--sizes 64x4,96x4,160x4] [--bits 8 4 3 2] [--quick] [--out DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RECIPES = REPO / "aligntool" / "recipes"
sys.path.insert(0, str(REPO))

METHODS = {"rtn": ["compress.method=uniform", "compress.mode=quant"], "jlcm": ["compress.method=jlcm"]}


def model_path(size: str, steps: int, log) -> Path:
    """``tiny`` (the built-in model) or ``<hidden>x<layers>`` (a toy model pretrained like it, built once)."""
    from aligntool.toy.tiny import build_threads, tiny_model_path, toy_model_path

    with build_threads(log):
        if size == "tiny":
            return tiny_model_path(log=log)
        hidden, layers = (int(v) for v in size.split("x"))
        return toy_model_path(hidden, layers, steps, log=log)


def bf16_checkpoint(src: Path, out: Path) -> tuple[int, int]:
    """Save ``src`` rounded to bf16 to ``out``; returns (parameters, bytes of model.safetensors)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
    model.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(src).save_pretrained(out)
    params = sum(p.numel() for p in model.parameters())  # tied embeddings / head counted once
    return params, (out / "model.safetensors").stat().st_size


def packed_as_bf16(folder: Path) -> int:
    """Rewrite the float32 tensors of a packed folder that were not quantized as bf16 (lossless: they hold bf16 values;
    checked), re-sign its manifest, check it loads; returns bytes of packed.safetensors + manifest.json."""
    import torch
    from safetensors.torch import load_file, save_file

    from aligntool.compress import packed

    blob, man = folder / "packed.safetensors", folder / "manifest.json"
    tensors = load_file(str(blob))
    for key, t in tensors.items():
        if "::" not in key and t.dtype == torch.float32:
            half = t.to(torch.bfloat16)
            if not torch.equal(half.float(), t):
                raise RuntimeError(f"{folder}: {key} is not bf16-exact; the conversion would change the model")
            tensors[key] = half
    save_file(tensors, str(blob))
    manifest = json.loads(man.read_text())
    manifest["dtype"] = "bfloat16"
    manifest["sha256"] = packed._digest(folder, manifest)
    man.write_text(json.dumps(manifest, indent=1) + "\n")
    packed.load_packed(folder)  # a format error here is an error of the study, not a point
    return blob.stat().st_size + man.stat().st_size


def fresh_documents(n: int) -> list[str]:
    """``n`` documents drawn after the pretraining ones from the pretraining corpus's own stream (``world.corpus``,
    seed 0: the same prompts and completion distribution, never trained on)."""
    from aligntool.toy import tiny, world

    skip = tiny.PRETRAIN["documents"]
    return [(p + c).replace("\n", " ") for p, c in world.corpus(skip + n, seed=tiny.PRETRAIN["seed"])[skip:]]


def document_loss(model, tokenizer, docs: list[str], batch_size: int = 64) -> float:
    """Mean next-token NLL (nats) of ``docs``, each one from position 0 and ended by EOS, exactly as the models were
    pretrained (``aligntool.toy.tiny.pretrain``), in float32."""
    import torch

    model = model.float().eval()
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    encoded = [ids + [eos] for ids in tokenizer(docs, add_special_tokens=False)["input_ids"]]
    nll, tokens = 0.0, 0
    with torch.no_grad():
        for b in range(0, len(encoded), batch_size):
            batch = encoded[b: b + batch_size]
            ids = torch.full((len(batch), max(map(len, batch))), pad)
            mask = torch.zeros_like(ids)
            for row, seq in enumerate(batch):
                ids[row, : len(seq)] = torch.tensor(seq)
                mask[row, : len(seq)] = 1
            logp = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float().log_softmax(-1)
            picked = logp.gather(-1, ids[:, 1:, None])[..., 0] * mask[:, 1:]
            nll -= float(picked.sum())
            tokens += int(mask[:, 1:].sum())
    return nll / tokens


def compress_point(model: Path, method: str, bits: int, out: Path, group: int, a) -> dict:
    from aligntool.compress.recipe import load_compress_recipe
    from aligntool.compress.run import compress

    recipe = load_compress_recipe(RECIPES / "compress_jlcm.yaml", [
        f"model.name_or_path={model}", "model.dtype=float32", f"output_dir={out}", f"calibration.path={a.text_path}",
        f"calibration.seq_len={a.seq_len}", f"calibration.num_sequences={a.calib}",
        f"calibration.heldout_sequences={a.heldout}", *METHODS[method], f"compress.bits={bits}",
        f"compress.group_size={group}", f"compress.jlcm_steps={a.jlcm_steps}",
        f"compress.jlcm_tokens={a.calib * a.seq_len}", *([f"compress.layers={a.layers}"] if a.layers else [])])
    with contextlib.redirect_stderr(io.StringIO()):
        report = compress(recipe, progress=False, overwrite=True)  # a point redone with new settings
    return report


def pareto(points: list[dict]) -> list[dict]:
    """The points no other point dominates: sorted by bytes, each with a lower loss than every smaller one."""
    front, best = [], math.inf
    for p in sorted(points, key=lambda p: (p["bytes"], p["loss"])):
        if p["loss"] < best:
            front.append(p)
            best = p["loss"]
    return front


def dominated_by_4bit(p: dict, points: list[dict]) -> dict | None:
    """A 4-bit point with no more bytes and no higher loss than ``p`` (the smallest such), or None."""
    fours = [q for q in points
             if q["bits"] == "4" and q is not p and q["bytes"] <= p["bytes"] and q["loss"] <= p["loss"]]
    return min(fours, key=lambda q: q["bytes"]) if fours else None


def plot(points: list[dict], path: Path, title: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib is not installed; the PNG is skipped (pip install 'aligntool[plots]')")
        return False
    colors = {"bf16": "black", "8": "tab:blue", "4": "tab:green", "3": "tab:orange", "2": "tab:red"}
    fig, ax = plt.subplots(figsize=(7, 4.5))
    curves: dict[tuple, list] = {}
    for p in points:
        curves.setdefault((p["method"], p["bits"]), []).append(p)
    for (method, bits), ps in sorted(curves.items()):
        ps.sort(key=lambda p: p["bytes"])
        label = "bf16" if bits == "bf16" else f"{method} {bits}-bit"
        ax.plot([p["bytes"] for p in ps], [p["loss"] for p in ps], marker="o" if method != "jlcm" else "s",
                linestyle="--" if method == "jlcm" else "-", color=colors[bits], label=label, markersize=4)
    front = pareto(points)
    ax.plot([p["bytes"] for p in front], [p["loss"] for p in front], color="grey", alpha=0.4, linewidth=6,
            label="Pareto frontier", zorder=0)
    ax.set_xscale("log")
    ax.set_xlabel("bytes on disk (packed weights)")
    ax.set_ylabel("held-out loss (nats / token)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="64x4,96x4,160x4", help="comma-separated: tiny (128x4) or "
                    "<hidden>x<layers> toy models (built once, cached)")
    ap.add_argument("--bits", type=int, nargs="+", default=[8, 4, 3, 2])
    ap.add_argument("--methods", default="rtn,jlcm", help="rtn, jlcm or both")
    ap.add_argument("--pretrain-steps", type=int, default=300, help="pretraining steps of the <hidden>x<layers> models")
    ap.add_argument("--seq-len", type=int, default=16, help="calibration window length (the documents are ~26 "
                    "tokens: longer windows reach positions the models never saw in pretraining)")
    ap.add_argument("--calib", type=int, default=16, help="calibration windows (JLCM's layer inputs)")
    ap.add_argument("--heldout", type=int, default=32, help="compress's own held-out windows (the KL column)")
    ap.add_argument("--heldout-docs", type=int, default=1000, help="held-out documents (the loss)")
    ap.add_argument("--calib-docs", type=int, default=1000, help="documents of the calibration text")
    ap.add_argument("--group-size", type=int, default=0, help="RTN: weights per fp16 (scale, zero); 0: the model's "
                    "hidden size (one pair per row, three per row of down_proj; the paper's per-channel scales)")
    ap.add_argument("--jlcm-steps", type=int, default=20)
    ap.add_argument("--layers", default=None, help="regex (compress.layers) of the layers to quantize; default: "
                    "every linear layer of the decoder blocks")
    ap.add_argument("--quick", action="store_true", help="a smoke run: the tiny model's first block only, 4/2 bits, "
                    "a few short windows")
    ap.add_argument("--out", default=None, help="keep the runs and the PNG here (default: a temporary folder)")
    a = ap.parse_args()
    if a.quick:
        a.sizes, a.bits, a.seq_len, a.calib, a.heldout, a.jlcm_steps = "tiny", [4, 2], 16, 4, 4, 2
        a.calib_docs, a.heldout_docs = 100, 64
        a.layers = a.layers or r"model\.layers\.0\.(self_attn|mlp)\..*"
    methods = a.methods.split(",")
    for m in methods:
        if m not in METHODS:
            sys.exit(f"--methods: unknown method {m!r}; expected rtn, jlcm")
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    root = Path(a.out) if a.out else Path(tempfile.mkdtemp(prefix="pareto-bits-"))
    root.mkdir(parents=True, exist_ok=True)
    start = time.time()
    points = []
    common = {k: getattr(a, k) for k in ("pretrain_steps", "seq_len", "calib", "heldout", "jlcm_steps", "layers",
                                         "calib_docs", "heldout_docs")}
    docs = fresh_documents(a.calib_docs + a.heldout_docs)
    a.text_path = root / "calibration.txt"  # JLCM's layer inputs (and the report's KL windows): the first documents
    a.text_path.write_text("\n".join(docs[: a.calib_docs]) + "\n")
    heldout = docs[a.calib_docs:]  # the loss: the other documents, never seen by the compressor
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from aligntool.compress.packed import load_packed
    for size in a.sizes.split(","):
        src = model_path(size, a.pretrain_steps, log)
        bf16 = root / size / "bf16"
        params, nbytes = bf16_checkpoint(src, bf16)
        hidden = json.loads((bf16 / "config.json").read_text())["hidden_size"]
        settings = {**common, "group_size": a.group_size or hidden}
        tokenizer = AutoTokenizer.from_pretrained(bf16)
        dense_loss = document_loss(AutoModelForCausalLM.from_pretrained(bf16), tokenizer, heldout)
        for method in methods:
            for bits in a.bits:
                folder = root / size / f"{method}-{bits}"
                done = folder / "point.json"
                if done.is_file() and json.loads(done.read_text())["settings"] == settings:
                    point = json.loads(done.read_text())["point"]  # this point of an earlier run, same settings
                else:
                    t = time.time()
                    report = compress_point(bf16, method, bits, folder, settings["group_size"], a)
                    point = {"size": size, "params": params, "method": method, "bits": str(bits),
                             "bytes": packed_as_bf16(folder / "packed"),
                             "loss": document_loss(load_packed(folder / "packed"), tokenizer, heldout),
                             "kl": report["heldout"]["kl"], "time": time.time() - t}
                    done.write_text(json.dumps({"settings": settings, "point": point}))
                points.append(point)
                log(f"{size} {method} {bits}-bit: {point['bytes']} bytes, loss {point['loss']:.4f} "
                    f"({point['time']:.0f}s)")
        points.append({"size": size, "params": params, "method": "-", "bits": "bf16", "bytes": nbytes,
                       "loss": dense_loss, "kl": 0.0, "time": 0.0})

    print(f"\nPost-training quantization of toy Llamas: held-out loss ({a.heldout_docs} held-out documents) vs bytes "
          f"on disk; RTN group {a.group_size or 'hidden size'}; JLCM {a.jlcm_steps} steps on {a.calib} x {a.seq_len} "
          "tokens; KL on compress's held-out windows")
    print(f"{'size':>7} {'params':>9} {'method':>6} {'bits':>5} {'bytes':>10} {'loss':>8} {'KL':>8}")
    for p in sorted(points, key=lambda p: p["bytes"]):
        print(f"{p['size']:>7} {p['params']:>9} {p['method']:>6} {p['bits']:>5} {p['bytes']:>10} {p['loss']:>8.4f} "
              f"{p['kl']:>8.4f}")
    front = pareto(points)
    print("\nPareto frontier (each point: the lowest loss at its byte budget and above, up to the next one):")
    for p in front:
        print(f"  {p['bytes']:>10} bytes  {p['size']:>7} {p['method']:>5} {p['bits']:>4}-bit  loss {p['loss']:.4f}")
    counts = {}
    for p in front:
        counts[p["bits"]] = counts.get(p["bits"], 0) + 1
    share = counts.get("4", 0) / len(front)
    print("frontier bit-widths: " + ", ".join(f"{b}: {n}" for b, n in sorted(counts.items())) +
          f"; 4-bit share {share:.2f}")
    for group, label in ((("8", "bf16"), "8-bit and bf16"), (("3", "2"), "3- and 2-bit")):
        others = [p for p in points if p["bits"] in group]
        beaten = [p for p in others if dominated_by_4bit(p, points)]
        print(f"{label} points dominated by a 4-bit point (no more bytes, no higher loss): {len(beaten)}/{len(others)}")
        for p in others:
            if p not in beaten:
                print(f"  not dominated: {p['size']} {p['method']} {p['bits']} ({p['bytes']} bytes, loss "
                      f"{p['loss']:.4f})")
    high = [p for p in points if p["bits"] in ("8", "bf16")]
    low = [p for p in points if p["bits"] in ("4", "3", "2")]
    beaten = [p for p in high if any(q["bytes"] <= p["bytes"] and q["loss"] <= p["loss"] for q in low)]
    print(f"8-bit and bf16 points dominated by a point of 4 bits or fewer (any size): {len(beaten)}/{len(high)}")
    holds = all(dominated_by_4bit(p, points) for p in high) and counts.get("4", 0) >= max(counts.values())
    print(f"claim (4-bit Pareto-dominates 8-bit and bf16; the frontier is mostly 4-bit): "
          f"{'holds' if holds else 'does not hold'} on these models")
    png = root / "pareto_bits.png"
    if plot(points, png, f"toy Llamas {a.sizes}: post-training RTN / JLCM vs bf16"):
        print(f"plot: {png}")
    print(f"runs kept in {root}; total {time.time() - start:.0f}s")


if __name__ == "__main__":
    main()
