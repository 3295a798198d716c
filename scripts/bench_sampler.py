"""Reproducible per-row sampling (aligntool.sampling.RowSampler) vs plain sampling: ms per generated token.

The model: the tiny model widened to hidden 512 x 8 layers (27.6 M parameters at its own vocabulary, as
bench_remax_vs_ppo.py --hidden-size 512 and validate_memory_plan.py build it; random init), with its vocabulary set to
each ``--vocab`` (32,000 as Llama 2 / Mistral, 151,936 as Qwen2), float32 on the CPU (bfloat16 on a GPU). Random
prompts of ``--prompt-len`` tokens, ``--batch`` rows, exactly ``--new-tokens`` generated per row (no stop token), all
with ``model.generate`` and the KV cache at temperature 1, top_p 1. Sides:

- plain: ``generate(do_sample=True)``, transformers' own sampling (softmax, then ``torch.multinomial``): one shared
  random stream, so a row's tokens depend on the batch it is in;
- old:   the former RowSampler (float64 Gumbel noise over the whole vocabulary, drawn row by row in Python from a
  torch.Generator per row), copied here as it was;
- new:   aligntool.sampling.RowSampler (one SplitMix64 uniform per row and step, keyed by the row's seed, and a
  two-level inverse CDF, all rows at once), as the online engine and evaluation call it.

Each vocabulary x batch runs every side ``--repeats`` times, alternating the order (A B C, C B A, ...) in one process
on one model, after an untimed warm-up of each. Prints per run the ms per generated token of the whole ``generate``
call, and per side the medians, the ratios to plain, the sampling step alone (the processor, or softmax +
multinomial, on random (batch, vocab) scores: what the model's forward does not dilute) and the model FLOP/s of the
call (prompt and generated tokens, forward only) as a fraction of this machine's measured matmul peak (benchlib).

    python scripts/bench_sampler.py [--quick] [--vocab 32000,151936] [--batch 64,256] [--new-tokens 32]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib as B  # noqa: E402

SIDES = ("plain", "old", "new")


class OldRowSampler:
    """aligntool.sampling.RowSampler before issue 30 (float64 Gumbel-max noise, one row at a time), for comparison."""

    def __init__(self, seeds, greedy_rows, temperature, top_k, top_p, device):
        import torch

        self.generators = [None if g else torch.Generator(device).manual_seed(int(s) % 2**63)
                           for s, g in zip(seeds, greedy_rows)]

    def __call__(self, input_ids, scores):
        import torch

        noise = torch.zeros_like(scores)
        for i, gen in enumerate(self.generators):
            if gen is not None:
                u = torch.rand(scores.shape[-1], generator=gen, device=scores.device, dtype=torch.float64)
                noise[i] = -torch.log(-torch.log(u.clamp(min=1e-300)))
        return scores + noise


def build_model(vocab: int, hidden: int, layers: int, device: str, dtype):
    """The widened tiny model (``aligntool.toy.tiny.widened_copy``'s shape) with ``vocab`` tokens, random init."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from aligntool.toy.tiny import tiny_model_path

    cfg = AutoConfig.from_pretrained(tiny_model_path())
    cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers = hidden, 3 * hidden, layers
    cfg.num_attention_heads = cfg.num_key_value_heads = hidden // cfg.head_dim
    cfg.vocab_size = vocab
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).to(device=device, dtype=dtype).eval()
    model.generation_config.eos_token_id = None  # every row generates exactly --new-tokens
    model.generation_config.pad_token_id = 0
    return model


def side_kwargs(side: str, seeds: list[int], device) -> dict:
    from transformers import LogitsProcessorList

    from aligntool.sampling import RowSampler

    if side == "plain":
        return dict(do_sample=True, temperature=1.0, top_p=1.0, top_k=0)
    cls = RowSampler if side == "new" else OldRowSampler
    return dict(do_sample=False, logits_processor=LogitsProcessorList(
        [cls(seeds, [False] * len(seeds), 1.0, 0, 1.0, device)]))


def time_generate(model, ids, side: str, new_tokens: int, sync) -> float:
    import torch

    seeds = list(range(1000, 1000 + ids.shape[0]))
    torch.manual_seed(0)
    sync()
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             min_new_tokens=0, **side_kwargs(side, seeds, ids.device))
    sync()
    assert out.shape[1] == ids.shape[1] + new_tokens
    return time.perf_counter() - t0


def time_step(side: str, batch: int, vocab: int, device, calls: int, sync) -> float:
    """Median seconds of the sampling step alone on random scores (plain: softmax + multinomial, as generate's
    sampling does; old / new: the processor, then the argmax that greedy generate takes)."""
    import torch

    torch.manual_seed(1)
    scores = 3 * torch.randn(batch, vocab, device=device)
    proc = None if side == "plain" else side_kwargs(side, list(range(batch)), device)["logits_processor"][0]
    times = []
    for i in range(calls + 1):
        sync()
        t0 = time.perf_counter()
        if proc is None:
            torch.multinomial(torch.softmax(scores, -1), 1)
        else:
            proc(None, scores).argmax(-1)
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def compare(a, vocab: int, batch: int, device, dtype, sync, peak: tuple) -> dict:
    import torch

    model = build_model(vocab, a.hidden_size, a.layers, device, dtype)
    n = B.matmul_params(model)
    print(f"\nvocab {vocab}, batch {batch}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters, "
          f"N = {n / 1e6:.1f} M in matmuls, prompt {a.prompt_len} + {a.new_tokens} new tokens per row", flush=True)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, vocab, (batch, a.prompt_len), generator=g).to(device)
    for side in a.sides:  # warm-up
        time_generate(model, ids, side, 2, sync)
    runs: dict[str, list[float]] = {s: [] for s in a.sides}
    print(f"{'run':>4} {'side':>6} {'load':>5} {'ms/token':>9}")
    for i in range(a.repeats):
        for side in (a.sides if i % 2 == 0 else a.sides[::-1]):
            load = os.getloadavg()[0]
            runs[side].append(time_generate(model, ids, side, a.new_tokens, sync))
            print(f"{i + 1:>4} {side:>6} {load:>5.2f} {1000 * runs[side][-1] / (batch * a.new_tokens):>9.3f}",
                  flush=True)
    med = {s: statistics.median(runs[s]) for s in a.sides}
    step = {s: time_step(s, batch, vocab, device, a.step_calls, sync) for s in a.sides}
    flops = 2 * n * batch * (a.prompt_len + a.new_tokens)  # forward only: generation
    peak = B.matmul_peak_flops(peak[0], peak[1], again=True)  # the best of this and every earlier measurement
    for s in a.sides:
        ratio = f"{med[s] / med['plain']:.3f}" if "plain" in med else "n/a"
        sratio = f"{step[s] / step['plain']:.2f}" if "plain" in step else "n/a"
        print(f"median {s:>6}: {1000 * med[s] / (batch * a.new_tokens):.3f} ms/generated token, x{ratio} of plain; "
              f"sampling step alone {1000 * step[s]:.2f} ms (x{sratio}); {B.flops_text(flops, med[s], peak)}")
    return {"vocab": vocab, "batch": batch, **{f"{s}_ms_token": 1000 * med[s] / (batch * a.new_tokens)
                                               for s in a.sides}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="16 new tokens, 2 repeats, 3 step calls")
    ap.add_argument("--vocab", default="32000,151936")
    ap.add_argument("--batch", default="64", help="comma-separated batch sizes (rows), e.g. 64,256")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--sides", default=",".join(SIDES))
    ap.add_argument("--hidden-size", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--step-calls", type=int, default=5, help="timed calls of the sampling step alone")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    a = ap.parse_args()
    if a.quick:
        a.new_tokens, a.repeats, a.step_calls = 16, 2, 3
    a.sides = [s for s in a.sides.split(",") if s]
    if not set(a.sides) <= set(SIDES) or not a.sides:
        ap.error(f"--sides: a comma-separated subset of {','.join(SIDES)}")
    import torch

    if a.threads:
        torch.set_num_threads(a.threads)
    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    peak = B.matmul_peak_flops(str(dtype).removeprefix("torch."), device)
    print(f"{'GPU ' + torch.cuda.get_device_name() if cuda else 'CPU'}, {dtype}, torch threads "
          f"{torch.get_num_threads()}, load average {os.getloadavg()[0]:.2f}; measured matmul peak "
          f"{peak / 1e9:.1f} GFLOP/s (measured again after each comparison, the best kept)\n{B.FLOPS_NOTE}")
    for vocab in map(int, a.vocab.split(",")):
        for batch in map(int, a.batch.split(",")):
            compare(a, vocab, batch, device, dtype, sync, (str(dtype).removeprefix("torch."), device))
    B.print_end_load()


if __name__ == "__main__":
    main()
