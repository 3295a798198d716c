"""aligntool's critic-free online RL (ReMax, REINFORCE++) vs TRL's GRPOTrainer and RLOOTrainer: same model, prompts,
completions per prompt, max new tokens, reward, KL weight, optimizer and optimizer steps.

Sides, each run in a fresh subprocess (so peak memory is per run), alternating A B C D, D C B A, ... so that machine
noise and drift hit all alike:
- remax: the ``remax`` recipe in-process (``train(load_recipe(path, overrides))``): per prompt one sampled and one
  greedy response (the baseline), generated in one call;
- reinforce_pp: the ``reinforce_pp`` recipe likewise, ``--generations`` samples per prompt, the group-mean baseline
  (REINFORCE++-baseline; ``baseline: none`` with 1 generation), k1 KL in the token rewards, one update per rollout;
- grpo / rloo: plain ``trl.GRPOTrainer`` / ``trl.RLOOTrainer`` scripts with ``reward_funcs`` = aligntool's toy gold
  reward (aligntool.rewards.gold, what ``reward.source: gold`` scores with).

Made equal: the model (the built-in tiny model, or ``--hidden-size`` / ``--layers``: a random-init widened copy of it),
loaded fp32, with a frozen reference copy (aligntool loads it again from disk, TRL from the same path: ``beta`` > 0 on
both TRL sides) and dropout off; the prompts, prompt by prompt: the TRL sides are fed, through their sequential
repeat sampler (``shuffle_dataset=False``), the exact batches aligntool's engine draws (Engine.batch_prompts),
encoded alike (plain-text prompts, no chat template); prompts per iteration; completions per prompt (TRL
``num_generations`` = REINFORCE++ ``samples_per_prompt``; ReMax always generates 2, one of them greedy);
max new tokens, temperature, top_p 1, top_k off, EOS as the only stop token; the KL weight (``--kl-coef``: ReMax's and
REINFORCE++'s kl_coef, GRPO's and RLOO's beta); AdamW (torch) with the same learning rate, betas, eps, weight decay 0,
linear schedule without warm-up, gradient clipping at 1.0; one optimizer step per iteration on every side (TRL:
``per_device_train_batch_size`` = prompts x generations, gradient_accumulation_steps 1, steps_per_generation 1,
num_iterations 1); seed 0; no eval, no checkpoints, no gradient checkpointing, no mixed precision; TensorBoard
logging on all sides every 1000 iterations (so not during the timed iterations but aligntool's always-logged first).

Not equal (cannot be made equal from the outside; each is part of what the sides are):
- the algorithms' own work per iteration: ReMax scores and trains on its sampled responses only (its greedy ones are
  generated, counted in the generated tokens, and scored); RLOO runs one more no-grad policy forward (old log-probs
  for its KL-in-reward) than REINFORCE++ and GRPO, which reuse the forward of the update when there is one update
  per rollout; GRPO puts the KL (k3) in the loss, RLOO and REINFORCE++ (k1) in the reward; the losses' arithmetic
  differs (negligible next to the forwards);
- the random streams: aligntool samples each row from its own seeded stream (aligntool.sampling.RowSampler: one
  counter-based uniform per row and step, an inverse CDF, a logits processor on a greedy generate), TRL by
  ``generate(do_sample=True)``; so the samples and their lengths differ. Seconds per
  generated token (every generated response, EOS included, greedy ones too) corrects the time for the lengths;
- aligntool computes logits on the response positions only (``logits_to_keep``), as TRL does;
- the loop around an iteration: the Trainer's (dataloader, collator, callbacks, its metrics) vs aligntool's engine
  (its prompt draw, per-iteration rollout statistics computed every iteration, logged every 1000);
- after training aligntool writes the final model, summary.json and metrics.jsonl; the TRL scripts save the model
  (outside the timed iterations on all sides).

Measured per run (scripts/benchlib.py, as in scripts/bench_online_dpo_vs_trl.py):
- seconds per iteration: the median over iterations after the first 2 of the wall time between consecutive
  iteration ends (TRL: on_step_end of a TrainerCallback; aligntool: the return of Engine._iteration);
- of it, seconds of generation (aligntool: Engine.samples; TRL: the trainer's ``_generate``), median likewise;
- seconds per generated token: the same iterations' total time / the tokens they generated;
- peak resident memory that training adds (VmHWM reset once the libraries are imported, minus the resident memory
  then) and that of the whole process (ru_maxrss).
Prints every run, the load average before each, each side's medians, then the ratios aligntool / TRL for every pair,
and each side's generation FLOP/s as a fraction of the measured matmul peak (benchlib.print_generation_flops).
Each run uses ``--threads`` torch threads (default 1; see bench_online_dpo_vs_trl.py for why).

    python scripts/bench_online_vs_trl.py [--iterations 8] [--batch-size 16] [--generations 2] [--max-new-tokens 32]
                                          [--repeats 2] [--model tiny | --hidden-size 512 --layers 8]
                                          [--learning-rate 1e-4] [--kl-coef 0.05] [--temperature 1.0] [--threads 1]
                                          [--sides remax,reinforce_pp,grpo,rloo]
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import benchlib as B

REPO = Path(__file__).resolve().parent.parent
RECIPES = REPO / "aligntool" / "recipes"
OURS = ("remax", "reinforce_pp")
THEIRS = ("grpo", "rloo")
SIDES = OURS + THEIRS
WARMUP = 2  # iterations left out of the figures
TOY_ROWS = 2000
SEED = 0
QUIET = 1000  # logging_steps: no logging during the timed iterations


def _recipe(side: str, a, out: str):
    """The side's recipe (remax or reinforce_pp) with this benchmark's settings; the TRL sides read their prompts from
    the REINFORCE++ one (the same dataset, seed and batch: the same draw)."""
    from aligntool.recipe.loader import load_recipe

    overrides = [f"output_dir={out}", f"model.name_or_path={a.model}", "model.dtype=float32",
                 f"dataset.toy.size={TOY_ROWS}", "reward.source=gold", f"train.max_steps={a.iterations}",
                 f"train.per_device_train_batch_size={a.batch_size}", f"train.learning_rate={a.learning_rate}",
                 "train.optim=adamw_torch", "train.weight_decay=0.0", "train.lr_scheduler_type=linear",
                 "train.warmup_steps=0", "train.max_grad_norm=1.0", f"train.seed={SEED}",
                 f"train.logging_steps={QUIET}", f"train.save_steps={QUIET * 1000}",
                 "train.gradient_checkpointing=false",
                 f"algo.kl_coef={a.kl_coef}", f"algo.temperature={a.temperature}", "algo.top_p=1.0",
                 f"algo.max_new_tokens={a.max_new_tokens}"]
    if side == "reinforce_pp":
        overrides += [f"algo.samples_per_prompt={a.generations}",
                      f"algo.baseline={'group' if a.generations > 1 else 'none'}", "algo.kl_in=reward",
                      "algo.kl_estimator=k1", "algo.gamma=1.0", "algo.ppo_epochs=1", "algo.num_minibatches=1"]
    return load_recipe(RECIPES / f"{side}.yaml", overrides)


def _import_libraries() -> None:
    """Imported before the memory baseline: the same for every side."""
    import accelerate  # noqa: F401
    import datasets  # noqa: F401
    import torch.utils.tensorboard  # noqa: F401
    import transformers  # noqa: F401
    import trl  # noqa: F401

    from aligntool import models, rewards  # noqa: F401
    from aligntool.online import engine, reinforce_pp, remax  # noqa: F401


def worker_aligntool(side: str, a, out: str) -> tuple[list[float], list[int], list[float]]:
    from aligntool.train import train

    ends, tokens, gen = B.time_engine_iterations()
    loaded = _recipe(side, a, out)
    ends.append(time.perf_counter())  # "end of iteration 0": the clock of the first iteration (a warm-up one)
    train(loaded)
    return ends, tokens, gen


def worker_trl(side: str, a, out: str) -> tuple[list[float], list[int], list[float]]:
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

    from aligntool import models
    from aligntool.rewards import gold

    def gold_reward(prompts, completions, **kwargs):
        return gold(prompts, completions)

    path = str(models.resolve(a.model))
    prompts = B.engine_prompt_order(_recipe("reinforce_pp", a, out), a.iterations, a.batch_size, SEED)
    train_set = datasets.Dataset.from_list([{"prompt": p} for p in prompts])
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype="float32")
    config, trainer_cls = (GRPOConfig, GRPOTrainer) if side == "grpo" else (RLOOConfig, RLOOTrainer)
    args = config(
        output_dir=out, max_steps=a.iterations, per_device_train_batch_size=a.batch_size * a.generations,
        gradient_accumulation_steps=1, steps_per_generation=1, num_iterations=1, num_generations=a.generations,
        learning_rate=a.learning_rate, optim="adamw_torch", weight_decay=0.0, lr_scheduler_type="linear",
        warmup_steps=0, max_grad_norm=1.0, seed=SEED, logging_steps=QUIET, save_strategy="no", eval_strategy="no",
        report_to=["tensorboard"], bf16=False, gradient_checkpointing=False, shuffle_dataset=False, beta=a.kl_coef,
        max_completion_length=a.max_new_tokens, temperature=a.temperature, top_p=1.0, top_k=0, disable_dropout=True)

    trainer, ends, tokens, gen = B.time_trainer_iterations(
        lambda callback: trainer_cls(model=model, reward_funcs=gold_reward, args=args, train_dataset=train_set,
                                     processing_class=tokenizer, callbacks=[callback]),
        lambda result: sum(len(ids) for ids in result[1]))  # completion ids: through the first EOS
    trainer.train()
    trainer.save_model(out)
    return ends, tokens, gen


def worker(side: str, a, out: str) -> dict:
    work = worker_aligntool if side in OURS else worker_trl
    return B.timed_worker(side, a, _import_libraries, lambda: work(side, a, out), WARMUP)


def run_side(side: str, a) -> dict:
    return B.run_worker(__file__, side, "--iterations", str(a.iterations), "--batch-size", str(a.batch_size),
                        "--generations", str(a.generations), "--max-new-tokens", str(a.max_new_tokens), "--model",
                        a.model, "--learning-rate", str(a.learning_rate), "--kl-coef", str(a.kl_coef), "--temperature",
                        str(a.temperature), "--threads", str(a.threads))


def compare(a) -> None:
    load, model = os.getloadavg(), getattr(a, "label", a.model)
    sides = a.sides
    print(f"critic-free online RL, aligntool (ReMax, REINFORCE++) vs TRL (GRPOTrainer, RLOOTrainer), model {model}, "
          f"{a.batch_size} prompts/iteration, {a.generations} completions/prompt (ReMax: 1 sampled + 1 greedy), "
          f"{a.max_new_tokens} new tokens, temperature {a.temperature}, lr {a.learning_rate}, KL weight "
          f"{a.kl_coef}, {a.iterations} iterations (first {WARMUP} not counted), {a.repeats} alternating repeats, "
          f"fp32, {os.cpu_count()} CPUs, torch threads {a.threads or 'default'}, "
          f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    med = B.alternate_runs(sides, a.repeats, lambda side: run_side(side, a), 13)
    for ours in (s for s in sides if s in OURS):
        for theirs in (s for s in sides if s in THEIRS):
            ratio = B.ratios(med, ours, theirs)
            print(f"{ours}/{theirs:<5} time per generated token {ratio['token_s']:.3f}   time per iteration "
                  f"{ratio['iteration_s']:.3f}   {B.memory_ratios_text(ratio)}")
    B.print_generation_flops(med, sides, a.model, a.threads)
    B.print_end_load()


def main() -> None:
    ap = B.online_parser(__doc__, "prompts per iteration", SIDES)
    ap.set_defaults(iterations=8, batch_size=16, max_new_tokens=32)  # ~10 minutes for 2 repeats on a loaded 2-core box
    ap.add_argument("--generations", type=int, default=2, help="completions per prompt: TRL num_generations = "
                    "REINFORCE++ samples_per_prompt (ReMax: always 1 sampled + 1 greedy)")
    ap.add_argument("--learning-rate", type=float, default=1e-4)
    ap.add_argument("--kl-coef", type=float, default=0.05, help="KL weight: kl_coef (aligntool), beta (TRL)")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per run (0: torch's default, one per core)")
    ap.add_argument("--sides", default=",".join(SIDES), help="comma-separated subset of " + ", ".join(SIDES))
    a = B.parse_online(ap, WARMUP)
    if a.generations < 1 or (a.generations < 2 and any(s in a.sides for s in THEIRS)):
        ap.error("--generations must be >= 1, and >= 2 with grpo or rloo (a group; RLOO leaves one out)")
    if a.worker:
        print(json.dumps(worker(a.worker, a, a.out)))
        return
    a.sides = [s.strip() for s in a.sides.split(",") if s.strip()]
    unknown = [s for s in a.sides if s not in SIDES]
    if unknown or not a.sides:
        ap.error(f"--sides: unknown {unknown}; choose from {', '.join(SIDES)}")
    B.run_on_benchmark_model(a, compare)


if __name__ == "__main__":
    main()
