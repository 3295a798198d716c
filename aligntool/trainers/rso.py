"""RSO: Statistical Rejection Sampling Optimization (Liu et al. 2023, arXiv 2309.06657), as a four-stage pipeline.

    1. sample   ``num_candidates`` completions per prompt from the SFT policy (temperature, top-k)  -> candidates.jsonl
    2. score    each with the recipe's reward source (gold, a reward-model folder, an ensemble, module:function)
                                                                                                    -> scored.jsonl
    3. select   ``num_samples`` per prompt with Algorithm 1 (accept with prob exp((r - r_max)/beta), r_max over the
                remaining candidates; aligntool.losses.preference.rso_rejection_sample), then build labelled pairs:
                first-round-rank (n/2 random pairs) or tournament-rank (n - 1 knock-out games)   -> pairs.jsonl
    4. train    on the pairs with sigmoid-norm  -log sigmoid(gamma * [lr(y_w) - lr(y_l)])
                               or hinge-norm    max(0, 1 - gamma * [lr(y_w) - lr(y_l)])
                (TRL's DPO ``sigmoid`` / ``hinge`` losses with beta = gamma; the paper decouples gamma from the
                sampling beta). Note: RSO's "sigmoid-norm" is *not* TRL's ``sigmoid_norm`` (length-normalised).

Every stage file is reused on a rerun when its settings (and those before it) are unchanged; ``start_from`` forces
a stage and everything after it to be redone. Paper defaults: 64 -> 8 samples, beta 0.5, gamma 0.05, temperature 0.7,
top-k 40; the recipe uses fewer candidates so that it runs in minutes on a CPU.
"""

from __future__ import annotations

import random
from typing import Literal

from pydantic import Field, model_validator

from aligntool.recipe.base import Sampling

STAGES = ("sample", "score", "select", "train")


class AlgoConfig(Sampling(temperature=0.7, top_k=40, seed=0)):  # the paper's sampling: temperature 0.7, top-k 40
    num_candidates: int = Field(16, ge=2, description="Completions sampled per prompt from the SFT policy (paper: 64).")
    num_samples: int = Field(8, ge=2, description="Completions kept per prompt by the rejection sampler (paper: 8).")
    sample_beta: float = Field(0.5, gt=0, description="beta of the sampler: acceptance exp((r - r_max)/beta).")
    pairing: Literal["first_round", "tournament"] = Field(
        "first_round", description="first_round: num_samples/2 random pairs per prompt; tournament: the n - 1 games of "
        "a knock-out (RSO section 3.3).")
    loss: Literal["sigmoid_norm", "hinge_norm"] = Field(
        "sigmoid_norm", description="-log sigmoid(gamma * margin) or max(0, 1 - gamma * margin) on the pairs.")
    gamma: float = Field(0.05, gt=0, description="gamma of the loss (DPO's beta), decoupled from sample_beta.")
    start_from: Literal["auto", "sample", "score", "select", "train"] = Field(
        "auto", description="auto = reuse every saved stage whose settings match; else redo from this stage."
    )

    @model_validator(mode="after")
    def _check(self):
        if self.num_samples > self.num_candidates:
            raise ValueError(f"num_samples ({self.num_samples}) must not exceed num_candidates ({self.num_candidates})")
        if self.pairing == "first_round" and self.num_samples % 2:
            raise ValueError("first_round pairing needs an even num_samples")
        return self

    def trl_extra(self) -> dict:
        return {"loss_type": "sigmoid" if self.loss == "sigmoid_norm" else "hinge", "beta": self.gamma}


def select_pairs(prompt: str, candidates: list[str], rewards: list[float], cfg: AlgoConfig, rng: random.Random):
    from aligntool.losses import preference as L

    kept = L.rso_rejection_sample(rewards, cfg.sample_beta, cfg.num_samples, rng)
    make = L.rso_first_round_pairs if cfg.pairing == "first_round" else L.rso_tournament_pairs
    return [
        {"prompt": prompt, "chosen": candidates[c], "rejected": candidates[r],
         "score_chosen": rewards[c], "score_rejected": rewards[r]}
        for c, r in make(kept, rewards, rng)
        if rewards[c] != rewards[r]  # a tie carries no preference
    ]


def pipeline(run) -> dict:
    import datasets

    from aligntool import models, rewards
    from aligntool.outputs import log
    from aligntool.recipe.schema import RewardConfig
    from aligntool.sampling import sample

    cfg: AlgoConfig = run.algo
    folder = run.output_dir
    prompts = list(dict.fromkeys(run.train_dataset["prompt"]))  # unique, in order
    force = {s: cfg.start_from != "auto" and STAGES.index(s) >= STAGES.index(cfg.start_from) for s in STAGES}
    from aligntool.trainers.base.stages import cached_stage, note_completions

    sample_settings = {"model": run.model_path, "prompts": prompts, "n": cfg.num_candidates, "t": cfg.temperature,
                       "k": cfg.top_k, "len": cfg.max_new_tokens, "seed": cfg.seed,
                       **({"p": cfg.top_p} if cfg.top_p < 1 else {})}  # unchanged hash for the default

    def do_sample():
        m = run.recipe.model
        policy = models.load_model(run.model_path, **models.options(m, revision=True)).to(models.run_device()).eval()
        repeated = [p for p in prompts for _ in range(cfg.num_candidates)]
        texts, _ = sample(policy, run.tokenizer, repeated, cfg.max_new_tokens, cfg.temperature, seed=cfg.seed,
                          top_k=cfg.top_k, top_p=cfg.top_p)
        n = cfg.num_candidates
        return [{"prompt": p, "candidates": texts[i * n : (i + 1) * n]} for i, p in enumerate(prompts)]

    candidates = cached_stage(folder, "candidates", sample_settings, do_sample, force["sample"], log)

    reward_cfg = run.recipe.reward or RewardConfig()
    score_settings = {"upstream": sample_settings, "reward": reward_cfg.model_dump()}

    def do_score():
        scorer = rewards.load(reward_cfg)
        flat_p = [row["prompt"] for row in candidates for _ in row["candidates"]]
        flat_c = [c for row in candidates for c in row["candidates"]]
        scores = scorer(flat_p, flat_c)
        n = cfg.num_candidates
        return [{**row, "rewards": scores[i * n : (i + 1) * n]} for i, row in enumerate(candidates)]

    scored = cached_stage(folder, "scored", score_settings, do_score, force["score"] or force["sample"], log)

    select_settings = {"upstream": score_settings,
                       **cfg.model_dump(include={"num_samples", "sample_beta", "pairing", "seed"})}

    def do_select():
        rng = random.Random(cfg.seed)
        return note_completions(run, [pair for row in scored for pair in
                                      select_pairs(row["prompt"], row["candidates"], row["rewards"], cfg, rng)],
                                0, "rso/pairs")

    redo = force["select"] or force["score"] or force["sample"]
    pairs = cached_stage(folder, "pairs", select_settings, do_select, redo, log)
    if not pairs:
        from aligntool.errors import UserError

        raise UserError("rso: every selected pair was a tie under the reward source; nothing to train on")
    log(f"rso: {len(pairs)} pairs from {len(prompts)} prompts; mean reward chosen "
        f"{sum(p['score_chosen'] for p in pairs) / len(pairs):.3f} vs rejected "
        f"{sum(p['score_rejected'] for p in pairs) / len(pairs):.3f}")

    from trl import DPOTrainer

    run.train_dataset, run.eval_dataset = datasets.Dataset.from_list(pairs), None  # the recipe's eval rows are prompts
    trainer = DPOTrainer(model=run.policy(), ref_model=run.reference(), args=run.trl_config(),
                         train_dataset=run.train_dataset, processing_class=run.tokenizer,
                         peft_config=run.peft_config())
    summary = run.fit(trainer)
    summary["pairs"] = len(pairs)
    return summary
