"""Per-rank peak memory of DeepSpeed ZeRO-3 vs DDP: the same SFT job on 2 processes, side by side.

Each side is `aligntool train --recipe recipes/sft.yaml` under torchrun with 2 ranks, ``distributed.backend`` ddp or
deepspeed with ``zero_stage: 3``; same model, data, batch, steps and seed. Each rank measures the peak resident memory
that training adds: VmHWM, reset through /proc/self/clear_refs after the libraries are imported, minus the resident
memory at that moment (model, gradients, optimizer state, activations, DeepSpeed buffers). The model is a random-init
widened copy of the tiny model (``--hidden-size``, ``--layers``; default ~28 M parameters), so that model states
dominate over the runtime. Prints each rank, then the ratio ZeRO-3 / DDP of the mean per-rank figure (target <= 0.55).
On CPU the ranks share one machine's RAM; the figure is per process, as it would be per GPU.

    python scripts/bench_zero3_memory.py [--hidden-size 512] [--layers 8] [--steps 6] [--batch-size 4]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BACKENDS = {"ddp": ["distributed.backend=ddp"], "zero3": ["distributed.backend=deepspeed", "distributed.zero_stage=3"]}


def rss_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(field)


def worker(a) -> None:
    import deepspeed  # noqa: F401 - libraries first: they are the same for both sides
    import torch  # noqa: F401
    import transformers  # noqa: F401
    import trl  # noqa: F401

    from aligntool.recipe.loader import load_recipe
    from aligntool.train import train

    loaded = load_recipe(REPO / "recipes" / "sft.yaml", [
        f"output_dir={a.out}/run", f"model.name_or_path={a.model}", f"train.max_steps={a.steps}",
        f"train.per_device_train_batch_size={a.batch_size}", "train.eval_strategy=no", "train.save_steps=100000",
        "train.logging_steps=1", "dataset.toy.eval_size=0", *BACKENDS[a.worker]])
    baseline = rss_mb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    train(loaded)
    rank = int(os.environ.get("RANK", "0"))
    Path(a.out, f"rank{rank}.json").write_text(json.dumps({"rank": rank, "train_mb": rss_mb("VmHWM") - baseline,
                                                           "process_mb": rss_mb("VmHWM")}))


def side(name: str, a, model: str) -> list[dict]:
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__,
               "--worker", name, "--out", out, "--model", model, "--steps", str(a.steps), "--batch-size", str(a.batch_size)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
        if proc.returncode != 0:
            sys.exit(f"{name} failed:\n{proc.stderr[-3000:]}")
        return [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(2)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden-size", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--worker", choices=list(BACKENDS), help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        worker(a)
        return
    from aligntool import models
    from aligntool.toy.tiny import widened_copy

    with tempfile.TemporaryDirectory() as tmp:
        model = widened_copy(str(models.resolve("tiny")), a.hidden_size, a.layers, tmp)
        rows = {name: side(name, a, model) for name in BACKENDS}
    print(f"SFT, 2 ranks, batch {a.batch_size} per rank, {a.steps} steps")
    print(f"{'side':>6} {'rank':>4} {'training +MB':>13} {'process peak MB':>16}")
    for name, ranks in rows.items():
        for r in ranks:
            print(f"{name:>6} {r['rank']:>4} {r['train_mb']:>13.0f} {r['process_mb']:>16.0f}")
    mean = {n: sum(r["train_mb"] for r in rs) / len(rs) for n, rs in rows.items()}
    ratio = mean["zero3"] / mean["ddp"]
    print(f"per-rank training memory ZeRO-3/DDP = {ratio:.3f}  (target <= 0.55: {'met' if ratio <= 0.55 else 'NOT met'})")


if __name__ == "__main__":
    main()
