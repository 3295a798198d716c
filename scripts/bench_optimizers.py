"""AdamW vs AdamW8bit vs Lion vs COSMOS: the same model, data order and steps, each at its best learning rate.

Optimizers (all with weight decay 0, gradient clipping 1.0, linear warm-up over 10% of the steps then cosine decay):
- AdamW (torch, 32-bit);
- AdamW8bit (bitsandbytes block-wise 8-bit states; Dettmers et al. 2022);
- Lion = aligntool's LionKappa with kappa=l1 (Chen et al. 2023/2024; equal to bitsandbytes' 32-bit Lion, see
  tests/test_optimizers.py);
- COSMOS = aligntool's Cosmos (Liu et al. 2025; rank --rank, the authors' betas 0.95/0.95, gamma 0.2, lr_ratio 0.2:
  the learning rate below is the one of the Adam-trained embedding and 1-D weights, hidden matrices get 0.2x).
Each optimizer's learning rate is picked from its own small grid by the final training loss (mean of the last 5
steps); the table shows that run. Measured side by side in one process: final training loss, held-out loss (fresh
documents of the toy corpus), and optimizer-state bytes (every tensor in ``optimizer.state_dict()``).

The model: the cached toy model of ``--hidden-size`` x ``--layers`` when it is there (``toy_model_path``,
pretrained), else a random-init copy of the tiny model widened to that size and trained from scratch on the toy
corpus; the first line says which. The default, hidden 256 x 4 layers (3.6 M parameters), finishes in about 10
minutes on a loaded 2-core CPU; ``--hidden-size 512 --layers 8`` is the 27.6 M-parameter model (on that CPU a COSMOS
step costs ~16 s, most of it Newton-Schulz on 56 matrices, against ~5 s for an AdamW step: budget hours).
``--quick``: the tiny model, a few steps, one learning rate each (a smoke test).

    python scripts/bench_optimizers.py [--steps 40] [--batch-size 8] [--hidden-size 512 --layers 8] [--quick]
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

GRIDS = {  # learning rates tried per optimizer (COSMOS: the Adam part's; the hidden matrices get lr_ratio of it)
    "AdamW": (3e-4, 1e-3, 3e-3, 1e-2),
    "AdamW8bit": (3e-4, 1e-3, 3e-3, 1e-2),
    "Lion": (1e-4, 3e-4, 1e-3, 3e-3),
    "COSMOS": (1e-3, 3e-3, 1e-2, 3e-2),
}
QUICK_LR = {"AdamW": 1e-3, "AdamW8bit": 1e-3, "Lion": 1e-4, "COSMOS": 3e-3}


def make_optimizer(name: str, model, lr: float, rank: int):
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    if name == "AdamW":
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    if name == "AdamW8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=lr, weight_decay=0.0)
    if name == "Lion":
        from aligntool.optim import LionKappa

        return LionKappa(params, lr=lr, weight_decay=0.0, kappa="l1")
    from aligntool.optim import Cosmos

    return Cosmos(params, lr=lr, weight_decay=0.0, rank=rank, vocab_size=model.config.vocab_size)


def state_bytes(opt) -> int:
    """Bytes of every tensor in the optimizer's state (bitsandbytes nests its quantization state in dicts)."""
    import torch

    def tensors(obj):
        if torch.is_tensor(obj):
            yield obj
        elif isinstance(obj, dict):
            for v in obj.values():
                yield from tensors(v)

    return sum(t.numel() * t.element_size() for s in opt.state_dict()["state"].values() for t in tensors(s)
               if t.dim() > 0)


def batches(tokenizer, n_docs: int, batch_size: int, steps: int, seed: int):
    """``steps`` padded batches of toy-corpus documents (ids, mask, labels), in a fixed order."""
    import random

    import torch

    from aligntool.toy import world

    docs = [p + c for p, c in world.corpus(n_docs, seed=seed)]
    eos = tokenizer.eos_token_id
    encoded = [ids[:127] + [eos] for ids in tokenizer(docs, add_special_tokens=False)["input_ids"]]
    rng = random.Random(seed)
    out = []
    for _ in range(steps):
        batch = rng.sample(encoded, batch_size)
        width = max(map(len, batch))
        ids = torch.full((batch_size, width), tokenizer.pad_token_id)
        mask = torch.zeros_like(ids)
        for row, seq in enumerate(batch):
            ids[row, :len(seq)] = torch.tensor(seq)
            mask[row, :len(seq)] = 1
        out.append((ids, mask, ids.masked_fill(mask == 0, -100)))
    return out


def run(name: str, lr: float, a, train_batches, heldout) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from aligntool.toy.tiny import lm_step

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
    model.train()
    opt = make_optimizer(name, model, lr, a.rank)
    warm = max(1, a.steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) * (
        0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, s / a.steps)))))
    losses, start = [], time.time()
    for ids, mask, labels in train_batches:
        losses.append(lm_step(model, opt, sched, ids, mask, labels).item())
    seconds = time.time() - start
    model.eval()
    with torch.no_grad():
        held = sum(model(input_ids=i, attention_mask=m, labels=lab).loss.item() for i, m, lab in heldout) / len(heldout)
    final = losses[-5:]
    return {"lr": lr, "final_loss": sum(final) / len(final), "heldout_loss": held, "state_bytes": state_bytes(opt),
            "seconds": seconds, "finite": all(math.isfinite(x) for x in losses)}


def compare(a) -> None:
    import torch
    from transformers import AutoTokenizer

    torch.set_num_threads(a.threads)
    print(f"model: {a.label}; {a.steps} steps of {a.batch_size} documents, same seed and data order")
    tokenizer = AutoTokenizer.from_pretrained(a.model)
    train_batches = batches(tokenizer, 4000, a.batch_size, a.steps, seed=0)
    heldout = batches(tokenizer, 2000, 16, 4, seed=99)
    results = {}
    for name in GRIDS:
        grid = (QUICK_LR[name],) if a.quick else a.grid.get(name, GRIDS[name])
        tried = [run(name, lr, a, train_batches, heldout) for lr in grid]
        ok = [r for r in tried if r["finite"]] or tried
        results[name] = min(ok, key=lambda r: r["final_loss"])
        grid_text = ", ".join(f"{r['lr']:g}: {r['final_loss']:.4f}" for r in tried)
        print(f"  {name} lr grid (final loss): {grid_text}", flush=True)
    base = results["AdamW"]
    print(f"{'optimizer':<10} {'best lr':>8} {'final loss':>10} {'held-out':>9} {'state bytes':>12} "
          f"{'state/AdamW':>11} {'loss/AdamW':>10} {'s/step':>7}")
    for name, r in results.items():
        print(f"{name:<10} {r['lr']:>8g} {r['final_loss']:>10.4f} {r['heldout_loss']:>9.4f} {r['state_bytes']:>12,} "
              f"{r['state_bytes'] / base['state_bytes']:>11.3f} {r['final_loss'] / base['final_loss']:>10.3f} "
              f"{r['seconds'] / a.steps:>7.2f}")
    from benchlib import FLOPS_NOTE, flops_text, matmul_peak_flops, model_matmul_params

    n, tokens = model_matmul_params(a.model), sum(int(m.sum()) for _, m, _ in train_batches)
    print(f"{FLOPS_NOTE}; N = {n / 1e6:.1f} M; training: 6N per token (forward + backward; the optimizer's own work "
          f"is in the time, not in the FLOPs), {tokens} tokens in {a.steps} steps")
    peak = matmul_peak_flops("float32", again=True)
    for name, r in results.items():
        print(f"{name:<10} {flops_text(6 * n * tokens, r['seconds'], peak)}")


def main() -> None:
    from benchlib import run_on_benchmark_model

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--rank", type=int, default=64, help="COSMOS rank")
    ap.add_argument("--hidden-size", type=int, default=256, help="512 with --layers 8: the 27.6 M-parameter model")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: on a shared, loaded machine "
                    "more threads were 4x slower)")
    ap.add_argument("--quick", action="store_true", help="CI smoke: the tiny model, 6 steps, one lr per optimizer")
    ap.add_argument("--grid", action="append", default=[], metavar="NAME=LR,LR",
                    help="replace an optimizer's learning-rate grid, e.g. --grid COSMOS=0.003,0.01 (names: "
                    f"{', '.join(GRIDS)})")
    a = ap.parse_args()
    grids = {}
    for item in a.grid:
        name, _, lrs = item.partition("=")
        if name not in GRIDS or not lrs:
            ap.error(f"--grid {item!r}: expected NAME=LR,LR with NAME one of {', '.join(GRIDS)}")
        grids[name] = tuple(float(x) for x in lrs.split(","))
    a.grid = grids
    from aligntool import models

    a.model, a.label = str(models.resolve("tiny")), "the built-in tiny model (pretrained)"
    if a.quick:
        a.steps, a.batch_size, a.rank, a.hidden_size = 6, 4, 16, None
    else:
        from aligntool.toy.tiny import BUILD_VERSION, cache_dir

        cached = cache_dir() / f"toy-h{a.hidden_size}-l{a.layers}-s300-v{BUILD_VERSION}"
        if (cached / "model.safetensors").is_file():
            a.model, a.hidden_size = str(cached), None
            a.label = f"the cached {cached.name} toy model (pretrained)"
    run_on_benchmark_model(a, compare)


if __name__ == "__main__":
    main()
