"""aligntool online DPO vs TRL's OnlineDPOTrainer (trl.experimental.online_dpo): same model, prompts, batch, sampling,
preference labels, loss, optimizer and iterations.

Sides, each run in a fresh subprocess (so peak memory is per run), alternating A B, B A, ... so that machine noise and
drift hit both alike:
- aligntool: ``aligntool train --recipe online_dpo`` in-process (``train(load_recipe(path, overrides))``);
- trl: a plain OnlineDPOTrainer script with ``reward_funcs`` = aligntool's toy gold reward (aligntool.rewards.gold,
  the score source ``reward.source: gold`` compares pairwise; both sides label a pair by the higher score, a tie
  going to the first sample, as TRL's ``>=``).

Made equal: the model (the built-in tiny model, or ``--hidden-size`` / ``--layers``: a random-init widened copy of it),
loaded fp32 on the CPU, with a frozen copy as the reference (aligntool loads it again from disk, TRL deep-copies the
policy) and dropout off; the prompts, prompt by prompt: the TRL
side is fed, through a sequential sampler, the exact batches aligntool's engine draws (Engine.batch_prompts), encoded
alike (no BOS for the tiny tokenizer, no chat template: plain-text prompts); prompts (= pairs) per iteration,
two samples per prompt, max new tokens, temperature, top_p 1, top_k off, EOS as the only stop token; the sigmoid DPO
loss on summed sequence log-probs with the same beta; AdamW with the same learning rate, weight decay 0, linear
schedule, gradient clipping at 1.0, one optimizer step per iteration; seed 0; no eval, no checkpoints, no gradient
checkpointing (set off on both), no mixed precision; TensorBoard logging on both, every 1000 iterations (so not
during the timed iterations but aligntool's always-logged first one).

Not equal (cannot be made equal from the outside; each is part of what the sides are):
- the random streams: aligntool samples each row from its own seeded stream (aligntool.sampling.RowSampler: an
  inverse CDF at a counter-based uniform per row and step, a logits processor on a greedy generate), TRL by
  ``generate(do_sample=True)``; so the samples, their lengths and their labels differ.
  Seconds per generated token (both samples of every pair, EOS included, counted from the responses' masks on both
  sides) corrects the time for the lengths;
- how the work is split: aligntool generates both samples in one call (as TRL) but runs the policy forward with grad
  once per sample (two forwards of B rows; TRL: one of 2B rows) and the reference twice, and computes logits on the
  response positions only (``logits_to_keep``); TRL's forward keeps all positions and truncates prompt + completion
  to ``max_length`` 512 (never reached here);
- the loop around an iteration: the Trainer's (dataloader, collator, callbacks) vs aligntool's engine (its prompt
  draw, per-iteration rollout statistics: KL, entropy, lengths, computed every iteration, logged every 1000);
- after training aligntool writes the final model, summary.json and metrics.jsonl; the TRL script saves the model
  (outside the timed iterations on both).

Measured per run:
- seconds per iteration: the median over iterations after the first 2 of the wall time between consecutive
  iteration ends (TRL: on_step_end of a TrainerCallback; aligntool: the return of Engine._iteration), so each
  iteration counts everything the loop does: prompts, generation, labels, forwards, backward, optimizer step;
- of it, seconds of generation (aligntool: Engine.samples; TRL: OnlineDPOTrainer._generate), median likewise;
- seconds per generated token: the same iterations' total time / the tokens they generated;
- peak resident memory: that training adds (VmHWM reset through /proc/self/clear_refs once the libraries are imported,
  minus the resident memory then: models, reference, optimizer state, activations, generation caches) and that of
  the whole process (ru_maxrss).
Prints every run, the load average before each, then the median ratios aligntool / TRL and each side's generation
FLOP/s as a fraction of the measured matmul peak (benchlib.print_generation_flops). Each run uses ``--threads``
torch threads (default 1): on a small machine shared with other jobs, torch's default (one thread per core) spins
against them and the timings of one side swung 8x between runs; with 1 thread they held within ~2x under load ~3-4.

    python scripts/bench_online_dpo_vs_trl.py [--iterations 12] [--batch-size 32] [--max-new-tokens 48] [--repeats 2]
                                          [--model tiny | --hidden-size 512 --layers 8] [--learning-rate 2e-4]
                                          [--beta 0.1] [--temperature 0.9] [--threads 1]
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import benchlib as B

REPO = Path(__file__).resolve().parent.parent
RECIPES = REPO / "aligntool" / "recipes"
RECIPE = RECIPES / "online_dpo.yaml"
SIDES = ("aligntool", "trl")
WARMUP = 2  # iterations left out of the figures
TOY_ROWS = 2000
SEED = 0
QUIET = 1000  # logging_steps: no logging during the timed iterations


def _recipe(a, out: str):
    """The online DPO recipe with this benchmark's settings (the TRL side reads its prompts from it too)."""
    from aligntool.recipe.loader import load_recipe

    overrides = [f"output_dir={out}", f"model.name_or_path={a.model}", f"dataset.toy.size={TOY_ROWS}",
                 "reward.source=gold", "reward.bt_temperature=0.0", f"train.max_steps={a.iterations}",
                 f"train.per_device_train_batch_size={a.batch_size}", f"train.learning_rate={a.learning_rate}",
                 f"train.seed={SEED}", f"train.logging_steps={QUIET}", f"train.save_steps={QUIET * 1000}",
                 "train.gradient_checkpointing=false", f"algo.beta={a.beta}", "algo.loss_type=sigmoid",
                 f"algo.temperature={a.temperature}", "algo.top_p=1.0", f"algo.max_new_tokens={a.max_new_tokens}"]
    return load_recipe(RECIPE, overrides)


def _import_libraries() -> None:
    """Imported before the memory baseline: the same for both sides."""
    import accelerate  # noqa: F401
    import datasets  # noqa: F401
    import torch.utils.tensorboard  # noqa: F401
    import transformers  # noqa: F401
    import trl  # noqa: F401
    import trl.experimental.online_dpo  # noqa: F401

    from aligntool import models, rewards  # noqa: F401
    from aligntool.online import engine  # noqa: F401


def worker_aligntool(a, out: str) -> tuple[list[float], list[int], list[float]]:
    from aligntool.train import train

    ends, tokens, gen = B.time_engine_iterations()
    loaded = _recipe(a, out)
    ends.append(time.perf_counter())  # "end of iteration 0": the clock of the first iteration (a warm-up one)
    train(loaded)
    return ends, tokens, gen


def worker_trl(a, out: str) -> tuple[list[float], list[int], list[float]]:
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer

    from aligntool import models
    from aligntool.rewards import gold

    def gold_reward(prompts, completions, **kwargs):
        return gold(prompts, completions)

    path = str(models.resolve(a.model))
    prompts = B.engine_prompt_order(_recipe(a, out), a.iterations, a.batch_size, SEED)
    train_set = datasets.Dataset.from_list([{"prompt": p} for p in prompts])
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype="float32")
    args = OnlineDPOConfig(
        output_dir=out, max_steps=a.iterations, per_device_train_batch_size=a.batch_size,
        learning_rate=a.learning_rate, seed=SEED, logging_steps=QUIET, save_strategy="no", eval_strategy="no",
        report_to=["tensorboard"], bf16=False, gradient_checkpointing=False, train_sampling_strategy="sequential",
        beta=a.beta, loss_type="sigmoid", max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_p=1.0,
        top_k=0, missing_eos_penalty=None, disable_dropout=True)

    trainer, ends, tokens, gen = B.time_trainer_iterations(
        lambda callback: OnlineDPOTrainer(model=model, reward_funcs=gold_reward, args=args, train_dataset=train_set,
                                          processing_class=tokenizer, callbacks=[callback]),
        lambda result: int(result[3].sum()))  # completion_mask: through the first EOS, both samples of every pair
    trainer.train()
    trainer.save_model(out)
    return ends, tokens, gen


def worker(side: str, a, out: str) -> dict:
    work = worker_aligntool if side == "aligntool" else worker_trl
    return B.timed_worker(side, a, _import_libraries, lambda: work(a, out), WARMUP)


def run_side(side: str, a) -> dict:
    return B.run_worker(__file__, side, "--iterations", str(a.iterations), "--batch-size", str(a.batch_size),
                        "--max-new-tokens", str(a.max_new_tokens), "--model", a.model, "--learning-rate",
                        str(a.learning_rate), "--beta", str(a.beta), "--temperature", str(a.temperature), "--threads",
                        str(a.threads))


def compare(a) -> None:
    load, model = os.getloadavg(), getattr(a, "label", a.model)
    print(f"online DPO, aligntool vs TRL OnlineDPOTrainer, model {model}, {a.batch_size} prompts/iteration, "
          f"{a.max_new_tokens} new tokens, temperature {a.temperature}, lr {a.learning_rate}, beta {a.beta}, "
          f"{a.iterations} iterations (first {WARMUP} not counted), {a.repeats} alternating repeats, fp32 CPU, "
          f"{os.cpu_count()} CPUs, torch threads {a.threads or 'default'}, "
          f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    med = B.alternate_runs(SIDES, a.repeats, lambda side: run_side(side, a), 10)
    ratio = B.ratios(med, "aligntool", "trl")
    print(f"aligntool/TRL  time per iteration {ratio['iteration_s']:.3f} (generation {ratio['generation_s']:.3f})   "
          f"time per generated token {ratio['token_s']:.3f}   {B.memory_ratios_text(ratio)}")
    B.print_generation_flops(med, SIDES, a.model, a.threads)
    B.print_end_load()


def main() -> None:
    ap = B.online_parser(__doc__, "prompts (= pairs) per iteration", SIDES)
    ap.add_argument("--learning-rate", type=float, default=2e-4)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--temperature", type=float, default=0.9)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per run (0: torch's default, one per core). "
                    "Default 1: on a 2-core machine other jobs share, torch's default of 2 threads made iterations "
                    "2-17 s and swing 8x between runs of the same side; 1 thread: 0.45-0.51 s")
    a = B.parse_online(ap, WARMUP)
    if a.worker:
        print(json.dumps(worker(a.worker, a, a.out)))
        return

    B.run_on_benchmark_model(a, compare)


if __name__ == "__main__":
    main()
