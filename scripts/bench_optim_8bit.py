"""8-bit vs 32-bit AdamW (Dettmers et al. 2022, bitsandbytes block-wise quantization) on the same model and steps.

Both runs are `aligntool train --recipe sft` with the same seed, data, lr and steps; only ``train.optim``
differs (``adamw_torch`` vs ``AdamW8bit``; ``--optim`` picks another 8-bit one, e.g. Lion8bit or PagedAdamW8bit).
Measured:
- optimizer-state bytes: every tensor in the saved optimizer state (checkpoint ``optimizer.pt``): for 8-bit AdamW the
  two moments in uint8 plus one float32 absmax per 256-value block and the 256-entry code maps; bitsandbytes keeps
  tensors under 4096 values (norm weights) in 32 bits, and transformers keeps embeddings in 32 bits (its
  GlobalOptimManager override, for stability). Target ratio <= 0.27. The tiny model's embedding is ~9% of its
  weights; ``--hidden-size H --layers L`` benchmarks a random-init widened copy where it weighs less.
- the final training loss of each run, and their difference.

    python scripts/bench_optim_8bit.py [--steps 60] [--optim AdamW8bit] [--hidden-size 256 --layers 4]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RECIPES = REPO / "aligntool" / "recipes"


def state_bytes(checkpoint: Path) -> tuple[int, int]:
    """(bytes of all optimizer-state tensors, number of parameters with state)."""
    import torch

    state = torch.load(checkpoint / "optimizer.pt", weights_only=False)["state"]

    def tensors(obj):  # bitsandbytes nests its quantized state under '__bnb_optimizer_quant_state__'
        if torch.is_tensor(obj):
            yield obj
        elif isinstance(obj, dict):
            for v in obj.values():
                yield from tensors(v)

    total = sum(t.numel() * t.element_size() for s in state.values() for t in tensors(s) if t.dim() > 0)
    return total, len(state)


def run(optim: str, a, out: Path) -> dict:
    from aligntool.recipe.loader import load_recipe
    from aligntool.train import train

    summary = train(load_recipe(RECIPES / "sft.yaml", [
        f"output_dir={out}", f"model.name_or_path={a.model}", f"train.optim={optim}", f"train.max_steps={a.steps}",
        f"train.save_steps={a.steps}", "train.eval_strategy=no", "train.logging_steps=1", "train.seed=0"]))
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    nbytes, tensors = state_bytes(out / "checkpoints" / f"checkpoint-{a.steps}")
    return {"state_bytes": nbytes, "params_with_state": tensors, "final_loss": sum(losses[-5:]) / len(losses[-5:]),
            "train_time_s": summary.get("train_time_s") or summary.get("final_metrics", {}).get("train_runtime")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--optim", default="AdamW8bit")
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--hidden-size", type=int)
    ap.add_argument("--layers", type=int, default=8)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if a.hidden_size:
            from aligntool import models
            from aligntool.toy.tiny import widened_copy

            a.model = widened_copy(str(models.resolve(a.model)), a.hidden_size, a.layers, str(Path(tmp) / "model"))
        full = run("adamw_torch", a, Path(tmp) / "adamw32")
        low = run(a.optim, a, Path(tmp) / "adamw8")
    print(f"SFT on {a.model}, {a.steps} steps, same seed and data")
    print(f"{'optimizer':>12} {'state bytes':>12} {'final loss':>11}")
    for name, r in (("adamw_torch", full), (a.optim, low)):
        print(f"{name:>12} {r['state_bytes']:>12,} {r['final_loss']:>11.6f}")
    ratio = low["state_bytes"] / full["state_bytes"]
    print(f"state bytes {a.optim}/AdamW-32 = {ratio:.3f}  (target <= 0.27: {'met' if ratio <= 0.27 else 'NOT met'})")
    print(f"final loss difference (mean of the last 5 logged steps) = {low['final_loss'] - full['final_loss']:+.6f}")


if __name__ == "__main__":
    main()
