"""Per-rank peak memory of DeepSpeed ZeRO-3 vs DDP: the same SFT (or PPO) job on 2 processes, side by side.

Each side is `aligntool train --recipe sft` under torchrun with 2 ranks, ``distributed.backend`` ddp or
deepspeed with ``zero_stage: 3``; same model, data, batch, steps and seed. Each rank measures the peak resident memory
that training adds: VmHWM, reset through /proc/self/clear_refs after the libraries are imported, minus the resident
memory at that moment (model, gradients, optimizer state, activations, DeepSpeed buffers). The model is a random-init
widened copy of the tiny model (``--hidden-size``, ``--layers``; default ~28 M parameters), so that model states
dominate over the runtime. Prints each rank, then the ratio ZeRO-3 / DDP of the mean per-rank figure (target <= 0.55),
and FSDP2 / DDP. On CPU the ranks share one machine's RAM; the figure is per process, as it would be per GPU.

``--recipe ppo``: the same for PPO on the rollout engine (shared value head; the reference model is a frozen copy,
partitioned under ZeRO-3 too); live tensors are read after each backward and around each optimizer step.

    python scripts/bench_zero3_memory.py [--recipe sft|ppo] [--hidden-size 512] [--layers 8] [--steps 6]
                                         [--batch-size 4]
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
RECIPES = REPO / "aligntool" / "recipes"
BACKENDS = {"ddp": ["distributed.backend=ddp"], "zero3": ["distributed.backend=deepspeed", "distributed.zero_stage=3"],
            "fsdp": ["distributed.backend=fsdp"]}


def rss_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(field)


def worker(a) -> None:
    import importlib

    import deepspeed  # noqa: F401 - libraries first: they are the same for both sides
    import torch  # noqa: F401
    import transformers  # noqa: F401
    import trl  # noqa: F401

    from aligntool.recipe.loader import load_recipe

    train_mod = importlib.import_module("aligntool.train")  # the module (the package's `aligntool.train` is the API)
    tensors = TensorBytes()
    callbacks = train_mod.run_callbacks

    def measured_callbacks(*args):  # measure inside the real run
        found, divergence = callbacks(*args)
        return [*found, tensors], divergence

    train_mod.run_callbacks = measured_callbacks
    extra = ["train.eval_strategy=no", "dataset.toy.eval_size=0"]
    if a.recipe == "ppo":
        measure_engine(tensors)
        extra = ["algo.max_new_tokens=32", "algo.ppo_epochs=1", "algo.num_minibatches=1"]

    loaded = load_recipe(RECIPES / f"{a.recipe}.yaml", [
        f"output_dir={a.out}/run", f"model.name_or_path={a.model}", f"train.max_steps={a.steps}",
        f"train.per_device_train_batch_size={a.batch_size}", "train.save_steps=100000", "train.logging_steps=1",
        f"train.bf16={str(a.bf16).lower()}", *extra, *BACKENDS[a.worker]])
    baseline = rss_mb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    train_mod.train(loaded)
    rank = int(os.environ.get("RANK", "0"))
    Path(a.out, f"rank{rank}.json").write_text(json.dumps({"rank": rank, "train_mb": rss_mb("VmHWM") - baseline,
                                                           "process_mb": rss_mb("VmHWM"), "state_mb": tensors.peak_mb}))


def live_tensor_mb() -> float:
    """Bytes of every torch storage alive in the process (views counted once): parameters, gradients, optimizer
    state, DDP's gradient buckets, DeepSpeed's flat buffers - what torch.cuda.memory_allocated() counts on a GPU."""
    import gc

    import torch

    seen = {}
    for obj in gc.get_objects():
        try:
            if isinstance(obj, torch.Tensor) and obj.device.type == "cpu":
                st = obj.untyped_storage()
                seen[st.data_ptr()] = st.nbytes()
        except Exception:  # noqa: BLE001 - some tensor subclasses have no plain storage
            continue
    return sum(seen.values()) / 2**20


def TensorBytes():
    from transformers import TrainerCallback

    class _TensorBytes(TrainerCallback):
        peak_mb = 0.0

        def on_pre_optimizer_step(self, args, state, control, **kwargs):  # gradients are alive here
            self.peak_mb = max(self.peak_mb, live_tensor_mb())

        def on_step_end(self, args, state, control, **kwargs):
            self.peak_mb = max(self.peak_mb, live_tensor_mb())

    return _TensorBytes()


def measure_engine(tensors) -> None:
    """The rollout engine's optimizer step, measured like the Trainer's: live tensors after the backward (gradients
    alive) and after the step (optimizer state alive)."""
    from aligntool.online.engine import Engine

    step = Engine.optimizer_step

    def measured(self, loss):
        backward = self.accelerator.backward

        def backward_then_measure(*args, **kwargs):
            out = backward(*args, **kwargs)
            tensors.peak_mb = max(tensors.peak_mb, live_tensor_mb())
            return out

        self.accelerator.backward = backward_then_measure
        try:
            return step(self, loss)
        finally:
            del self.accelerator.backward
            tensors.peak_mb = max(tensors.peak_mb, live_tensor_mb())

    Engine.optimizer_step = measured


def side(name: str, a, model: str) -> list[dict]:
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__,
               "--worker", name, "--out", out, "--model", model, "--steps", str(a.steps),
               "--batch-size", str(a.batch_size), "--recipe", a.recipe, *(["--bf16"] if a.bf16 else [])]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
        if proc.returncode != 0:
            sys.exit(f"{name} failed:\n{proc.stderr[-3000:]}")
        return [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(2)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", choices=["sft", "ppo"], default="sft")
    ap.add_argument("--hidden-size", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--bf16", action="store_true", help="bf16 mixed precision on both sides (the usual GPU setting)")
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
    print(f"{a.recipe.upper()}, 2 ranks, batch {a.batch_size} per rank, {a.steps} steps, "
          f"{'bf16 mixed precision' if a.bf16 else 'fp32'}")
    print(f"{'side':>6} {'rank':>4} {'live tensors MB':>23} {'training +MB (RSS)':>19} {'process peak MB':>16}")
    for name, ranks in rows.items():
        for r in ranks:
            print(f"{name:>6} {r['rank']:>4} {r['state_mb']:>23.0f} {r['train_mb']:>19.0f} {r['process_mb']:>16.0f}")
    for key, what in (("state_mb", "model states (peak live tensors around the optimizer step)"),
                      ("train_mb", "training RSS high-water")):
        mean = {n: sum(r[key] for r in rs) / len(rs) for n, rs in rows.items()}
        ratio = mean["zero3"] / mean["ddp"]
        print(f"per-rank {what} ZeRO-3/DDP = {ratio:.3f}  (target <= 0.55: {'met' if ratio <= 0.55 else 'NOT met'}); "
              f"FSDP2/DDP = {mean['fsdp'] / mean['ddp']:.3f}")


if __name__ == "__main__":
    main()
