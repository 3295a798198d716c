"""The memory plan (aligntool/plan/memory.py) against measured peak memory: DPO and PPO, DDP and ZeRO-3, 2 processes.

Each case is `aligntool train` under torchrun with 2 ranks on this machine's CPU, measured as
scripts/bench_zero3_memory.py measures (its worker runs here unchanged): per rank, the peak resident memory that
training adds (VmHWM reset through /proc/self/clear_refs after the libraries are imported, minus the resident memory
at that moment) and the peak of live torch tensors around each optimizer step. The model is the bench's random-init
widened copy of the tiny model (``--hidden-size``, ``--layers``), so that model states dominate over the runtime.

What is predicted: ``memory_plan`` for the same recipe, overrides and model config on ``world_size=2``, in fp32
(``train.bf16=false``, as the bench runs on CPU) with recomputation off (aligntool's CPU default, set explicitly), and
the prompt length measured from the toy prompts. The plan's "runtime allowance" (CUDA context, NCCL) has no CPU
counterpart and is left out; everything else it lists is counted. Compared: the plan's total against the mean
per-rank training high-water (RSS), and the plan's model states (weights, gradients, DDP buckets, optimizer state,
gathered layer, reference, value head) against the peak live tensors.

    python scripts/validate_memory_plan.py [--hidden-size 512] [--layers 8] [--steps 4] [--batch-size 4]
                                           [--cases dpo-ddp,dpo-zero3,ppo-ddp,ppo-zero3] [--json out.json]
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
sys.path.insert(0, str(REPO / "scripts"))
import bench_zero3_memory as bench  # noqa: E402 - the bench's measurement, reused as it is

CASES = ("dpo-ddp", "dpo-zero3", "ppo-ddp", "ppo-zero3")
# the plan's model states that are torch tensors Python sees (DDP's buckets live in its C++ reducer: RSS only)
STATES = ("weights", "gradients", "optimizer state", "reference model", "value head")
# glibc returns freed tensor memory to the system at once (every block over 64 KiB is its own mapping, the heap is
# trimmed to zero): the resident high-water then follows the peak of live allocations, as a GPU allocator's peak of
# allocated memory does, instead of glibc's retained free lists (fragmentation a GPU caching allocator handles apart)
RETURN_FREED = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
PPO_EXTRA = ["algo.max_new_tokens=32", "algo.ppo_epochs=1", "algo.num_minibatches=1"]  # the bench's PPO settings


def overrides(recipe: str, backend: str, a, model: str) -> list[str]:
    """The recipe overrides of both the plan and the run: the bench's worker's (bench_zero3_memory.worker), and for
    DPO train.max_length set to the longest pair in the data (nothing is cut; the plan's sequence length is then the
    longest batch's, not the recipe's cap)."""
    extra = PPO_EXTRA if recipe == "ppo" else ["train.eval_strategy=no", "dataset.toy.eval_size=0",
                                               f"train.max_length={a.max_length}"]
    return [f"model.name_or_path={model}", f"train.max_steps={a.steps}",
            f"train.per_device_train_batch_size={a.batch_size}", "train.save_steps=100000", "train.logging_steps=1",
            "train.bf16=false", "train.gradient_checkpointing=false", *extra, *bench.BACKENDS[backend]]


def longest_pair(model: str) -> int:
    """Tokens of the longest prompt + response of the toy preference data (BOS / EOS included)."""
    from transformers import AutoTokenizer

    from aligntool import data
    from aligntool.recipe.loader import load_recipe

    tok = AutoTokenizer.from_pretrained(model)
    loaded = load_recipe(REPO / "aligntool" / "recipes" / "dpo.yaml", ["dataset.toy.eval_size=0"])
    rows, _ = data.load_for_recipe(loaded.recipe, loaded.spec.data, log=lambda m: None)
    return 2 + max(len(tok(r["prompt"] + r[side])["input_ids"]) for r in rows for side in ("chosen", "rejected"))


def predict(recipe: str, backend: str, a, model: str, seq: int) -> dict:
    """The plan of the case, given the longest sequence the run forwarded (``seq``, measured): DPO's
    train.max_length, PPO's prompt length (``seq`` - max_new_tokens)."""
    from transformers import AutoConfig

    from aligntool.plan.memory import memory_plan
    from aligntool.recipe.loader import load_recipe

    over = overrides(recipe, backend, a, model)
    if recipe == "dpo":
        over.append(f"train.max_length={seq}")
    loaded = load_recipe(REPO / "aligntool" / "recipes" / f"{recipe}.yaml", over)
    prompt = seq - loaded.algo.max_new_tokens if recipe == "ppo" else None
    plan = memory_plan(loaded, AutoConfig.from_pretrained(model), world_size=2, prompt_tokens=prompt)
    parts = {c.name: c.bytes for c in plan.components if c.counted and c.name != "runtime allowance"}
    states = sum(v for k, v in parts.items() if k in STATES)
    return {"total_mb": sum(parts.values()) / 2**20, "states_mb": states / 2**20,
            "parts_mb": {k: round(v / 2**20, 1) for k, v in parts.items()}}


def measure(recipe: str, backend: str, a, model: str) -> list[dict]:
    """Two ranks under torchrun, each running the bench's worker."""
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__,
               "--worker", backend, "--recipe", recipe, "--out", out, "--model", model, "--steps", str(a.steps),
               "--batch-size", str(a.batch_size), "--max-length", str(a.max_length)]
        env = dict(os.environ, OMP_NUM_THREADS="1", **({} if a.glibc_default else RETURN_FREED))
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            sys.exit(f"{recipe} {backend} failed:\n{proc.stderr[-3000:]}")
        return [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(2)]


def worker(a) -> None:
    """bench_zero3_memory's worker, with its measurement (``TensorBytes``, ``measure_engine``, ``rss_mb``) hooked into
    the run's callbacks as ``train.run_callbacks`` gives them now (the bench patches ``train._callbacks``, a name
    train.py no longer has), and this script's settings (fp32, no recomputation)."""
    import importlib

    import deepspeed  # noqa: F401 - libraries first: they are the same for every case
    import torch  # noqa: F401
    import transformers  # noqa: F401
    import trl  # noqa: F401

    from aligntool.recipe.loader import load_recipe

    train_mod = importlib.import_module("aligntool.train")  # the module (the package's `aligntool.train` is the API)

    tensors = bench.TensorBytes()
    callbacks = train_mod.run_callbacks

    def with_measure(*args):
        found, divergence = callbacks(*args)
        return [*found, tensors], divergence

    train_mod.run_callbacks = with_measure
    if a.recipe == "ppo":
        bench.measure_engine(tensors)
    seen = watch(tensors)
    loaded = load_recipe(REPO / "aligntool" / "recipes" / f"{a.recipe}.yaml",
                         [f"output_dir={a.out}/run", *overrides(a.recipe, a.worker, a, a.model)])
    baseline = bench.rss_mb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    train_mod.train(loaded)
    rank = int(os.environ.get("RANK", "0"))
    Path(a.out, f"rank{rank}.json").write_text(json.dumps({
        "rank": rank, "train_mb": bench.rss_mb("VmHWM") - baseline, "process_mb": bench.rss_mb("VmHWM"),
        "state_mb": tensors.peak_mb, "live_peak_mb": seen["live"] - seen["live0"], "seq": seen["seq"]}))


def watch(tensors) -> dict:
    """The longest sequence any embedding layer sees (the longest forward), and the peak of live tensors
    (``bench.live_tensor_mb``) read at the end of every model's last decoder layer and of its whole forward (when its
    activations, ZeRO-3's gathered parameters and the logits are alive), besides the bench's reading around each
    optimizer step. Read on the training thread: a reading from another thread (gc.get_objects) breaks CPython's
    tuple building."""
    import torch

    seen = {"seq": 0, "live0": bench.live_tensor_mb(), "live": 0.0}
    forward = torch.nn.Embedding.forward

    def recorded(self, ids):
        seen["seq"] = max(seen["seq"], ids.shape[-1])
        return forward(self, ids)

    def read(module, args, kwargs, output):
        name = type(module).__name__
        attn = getattr(module, "self_attn", None)
        last = (name.endswith("DecoderLayer") and attn is not None
                and attn.layer_idx == attn.config.num_hidden_layers - 1)
        first = args[0] if args else kwargs.get("hidden_states", kwargs.get("input_ids"))
        if (last or name.endswith("ForCausalLM")) and getattr(first, "ndim", 0) >= 2 and first.shape[1] > 1:
            seen["live"] = max(seen["live"], bench.live_tensor_mb())  # (not during a decoding step)

    torch.nn.Embedding.forward = recorded
    torch.nn.modules.module.register_module_forward_hook(read, with_kwargs=True)
    return seen


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden-size", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--json", help="also write the table as JSON here")
    ap.add_argument("--measured", help="a JSON this script wrote: predict again against its measurements")
    ap.add_argument("--max-length", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--glibc-default", action="store_true",
                    help="measure with glibc's default allocator settings (RSS keeps freed memory: not comparable)")
    ap.add_argument("--worker", choices=list(bench.BACKENDS), help=argparse.SUPPRESS)
    ap.add_argument("--recipe", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        worker(a)
        return
    from aligntool import models
    from aligntool.toy.tiny import widened_copy

    measured = {r["case"]: r["ranks"] for r in json.loads(Path(a.measured).read_text())} if a.measured else {}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model = widened_copy(str(models.resolve("tiny")), a.hidden_size, a.layers, tmp)
        a.max_length = longest_pair(model)
        for case in a.cases.split(","):
            recipe, backend = case.split("-")
            ranks = measured.get(case) or measure(recipe, backend, a, model)
            pred = predict(recipe, backend, a, model, max(r.get("seq", a.max_length) for r in ranks))
            rows.append(compare(case, pred, ranks))
    report(rows, a)


def compare(case: str, pred: dict, ranks: list[dict]) -> dict:
    train = sum(r["train_mb"] for r in ranks) / 2
    state = sum(r["state_mb"] for r in ranks) / 2
    live = sum(max(r.get("live_peak_mb", 0), r["state_mb"]) for r in ranks) / 2
    return {"case": case, "predicted_mb": pred["total_mb"], "measured_mb": train, "error": pred["total_mb"] / train - 1,
            "live_peak_mb": live, "live_error": pred["total_mb"] / live - 1 if live else None,
            "predicted_states_mb": pred["states_mb"], "live_tensors_mb": state,
            "states_error": pred["states_mb"] / state - 1, "parts_mb": pred["parts_mb"], "ranks": ranks}


def report(rows: list[dict], a) -> None:
    print(f"2 ranks, batch {a.batch_size} per rank, {a.steps} steps, fp32, recomputation off, model hidden "
          f"{a.hidden_size} x {a.layers} layers; per rank (mean of the two), MB")
    print(f"{'case':>10} {'predicted':>10} {'RSS peak':>9} {'error':>7} {'live peak':>10} {'error':>7} "
          f"{'pred. states':>13} {'live at step':>13} {'error':>7}")
    for r in rows:
        live = f"{r['live_peak_mb']:>10.0f} {100 * r['live_error']:>6.1f}%" if r["live_error"] is not None else ""
        print(f"{r['case']:>10} {r['predicted_mb']:>10.0f} {r['measured_mb']:>9.0f} {100 * r['error']:>6.1f}% {live} "
              f"{r['predicted_states_mb']:>13.0f} {r['live_tensors_mb']:>13.0f} {100 * r['states_error']:>6.1f}%")
    for r in rows:
        print(f"  {r['case']}: " + ", ".join(f"{k} {v:.0f}" for k, v in r["parts_mb"].items()))
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
