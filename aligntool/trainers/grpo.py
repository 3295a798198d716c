"""GRPO and every loss TRL's GRPOTrainer implements (Shao et al. 2024, "DeepSeekMath: Pushing the Limits of
Mathematical Reasoning in Open Language Models", arXiv 2402.03300, eq. 3; TRL: github.com/huggingface/trl).

For each prompt q the policy samples a group of G = ``num_generations`` completions o_1..o_G, scored by the recipe's
``reward`` (r_i); the advantage of every token of o_i is its group-normalised reward, and the policy maximises

    J(theta) = E[ 1/G sum_i 1/|o_i| sum_t ( min(rho_it A_i, clip(rho_it, 1 - epsilon, 1 + epsilon_high) A_i)
                                            - beta KL_t(pi_theta || pi_ref) ) ],
    A_i = (r_i - mean(r)) / std(r),    rho_it = pi_theta(o_it | q, o_i<t) / pi_old(o_it | q, o_i<t),

with the k3 estimator KL_t = pi_ref/pi_theta - log(pi_ref/pi_theta) - 1 (DeepSeekMath eq. 4). ``loss_type`` picks how
token terms are averaged: ``grpo`` is eq. 3 (1/|o_i| per sequence), ``dapo`` (TRL's default) averages over all tokens
of the batch (Yu et al. 2025), ``dr_grpo`` divides by a constant, max_completion_length (Liu et al. 2025, "Understanding
R1-Zero-Like Training"; with ``scale_rewards: none`` for their unscaled advantages), ``bnpo``, ``cispo``, ``sapo``,
``luspo``, ``vespo``: any loss the installed TRL lists is accepted. ``importance_sampling_level: sequence`` is GSPO.
The math is TRL's; this module exposes its knobs under TRL's names and wires aligntool's reward, model and data in.

Batches (TRL's counting, which differs from aligntool's online methods): ``train.per_device_train_batch_size`` counts
*completions*, not prompts. Each generation round samples ``generation_batch_size`` completions (default
per_device_train_batch_size x processes x steps_per_generation, and steps_per_generation defaults to
gradient_accumulation_steps) = generation_batch_size / num_generations prompts; the round must hold whole groups, so
generation_batch_size must be divisible by num_generations (TRL checks it). The round is then consumed by
steps_per_generation micro-batches; ``num_iterations`` (mu) reuses it that many times, which is when the clipping
matters (mu = 1: rho = 1 at every update, the loss is plain policy gradient with group-normalised advantages).

Rewards: the recipe's ``reward`` section as TRL reward functions, one per term, with ``reward_weights`` =
the terms' weights (``reward.functions: [{function, weight}, ...]``); each is checked on every call (one finite number
per completion, else a one-line error naming the function and the row). The dataset's columns other than ``prompt``
reach the functions as keyword arguments (TRL's convention), e.g. an ``answer`` column for a verifier.

Generation: ``generation.backend: vllm`` maps onto TRL's use_vllm / vllm_mode / vllm_gpu_memory_utilization /
vllm_max_model_length / vllm_server_base_url / vllm_enable_sleep_mode / vllm_tensor_parallel_size (set those through
``generation``, not ``train``); other TRL fields (log_completions, sapo_* / vespo_* constants, ...) go in ``train.*``.
``generation.asynchronous: true`` trains with TRL's experimental AsyncGRPOTrainer (aligntool.trainers.grpo_async).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from aligntool.recipe.base import Strict
from aligntool.trainers.base import trl_lists


class SampledRLConfig(Strict):
    """The keys TRL's GRPO and RLOO trainers share (sampling, groups, clipping, reference); defaults are TRL's."""

    num_generations: int = Field(8, ge=2, description="Completions sampled per prompt (the group size G; RLOO's k). "
                                 "The generation batch (completions) must be divisible by it.")
    num_generations_eval: int | None = Field(None, ge=1, description="Completions per prompt when evaluating "
                                             "(default: num_generations).")
    max_completion_length: int = Field(512, gt=0, description="Length limit of each sampled completion, in tokens.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature (1 = the policy's own distribution).")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling: keep the smallest set of tokens holding this "
                         "much probability (1 = off).")
    top_k: int = Field(0, ge=0, description="Keep only the k most likely tokens (0 = off).")
    min_p: float | None = Field(None, ge=0, le=1, description="Drop tokens below min_p x the top token's probability.")
    repetition_penalty: float = Field(1.0, gt=0, description="Penalty on tokens already in the prompt or completion "
                                      "(1 = off).")
    generation_kwargs: dict | None = Field(None, description="Extra keywords for transformers' GenerationConfig (or "
                                           "vLLM's SamplingParams), e.g. {suppress_tokens: [...]}.")
    beta: float = Field(0.0, ge=0, description="KL coefficient toward the reference (the initial policy); 0 loads no "
                        "reference.")
    num_iterations: int = Field(1, ge=1, description="Optimisation passes over each generated batch (mu); above 1 "
                                "the clipping applies.")
    epsilon: float = Field(0.2, ge=0, description="Lower clipping range: rho is clipped below at 1 - epsilon.")
    epsilon_high: float | None = Field(None, ge=0, description="Upper clipping range (default: epsilon; DAPO's "
                                       "clip-higher uses 0.28).")
    mask_truncated_completions: bool = Field(False, description="Leave completions cut at max_completion_length out "
                                             "of the loss (DAPO).")
    disable_dropout: bool = Field(False, description="Turn dropout off in the policy (and reference).")
    sync_ref_model: bool = Field(False, description="TR-DPO-style reference update: pi_ref <- alpha pi + (1 - alpha) "
                                 "pi_ref every ref_model_sync_steps steps (needs beta > 0).")
    ref_model_mixup_alpha: float = Field(0.6, ge=0, le=1, description="alpha of sync_ref_model.")
    ref_model_sync_steps: int = Field(512, ge=1, description="Steps between reference updates (sync_ref_model).")
    generation_batch_size: int | None = Field(None, ge=1, description="Completions sampled per generation round, all "
                                              "processes (default: per_device_train_batch_size x processes x "
                                              "steps_per_generation). Set this or steps_per_generation, not both.")
    steps_per_generation: int | None = Field(None, ge=1, description="Micro-batches each generation round is split "
                                             "into (default: gradient_accumulation_steps).")
    shuffle_dataset: bool = Field(True, description="Shuffle the prompts.")
    log_completions: bool = Field(False, description="Print a sample of (prompt, completion, reward) every "
                                  "logging_steps.")

    trl_fields = ("num_generations", "num_generations_eval", "max_completion_length", "temperature", "top_p", "top_k",
                  "min_p", "repetition_penalty", "generation_kwargs", "beta", "num_iterations", "epsilon",
                  "epsilon_high", "mask_truncated_completions", "disable_dropout", "sync_ref_model",
                  "ref_model_mixup_alpha", "ref_model_sync_steps", "generation_batch_size", "steps_per_generation",
                  "shuffle_dataset", "log_completions")


class AlgoConfig(SampledRLConfig):
    loss_type: str = Field("dapo", description="Any loss type of the installed TRL's GRPOTrainer: grpo (DeepSeekMath "
                           "eq. 3), dapo (default), dr_grpo, bnpo, cispo, sapo, luspo, vespo, ...")
    scale_rewards: Literal["group", "batch", "none"] | bool = Field(
        "group", description="Advantage scaling: group = divide by the group's reward std (GRPO), batch = by the "
        "batch's, none/false = no scaling (Dr. GRPO).")
    importance_sampling_level: Literal["token", "sequence"] = Field(
        "token", description="token: one ratio per token (GRPO); sequence: the length-normalised sequence ratio "
        "(GSPO, Zheng et al. 2025).")
    delta: float | None = Field(None, gt=0, description="Two-sided GRPO: clip rho above at delta when the advantage "
                                "is negative (INTELLECT-2); off by default.")
    multi_objective_aggregation: Literal["sum_then_normalize", "normalize_then_sum"] = Field(
        "sum_then_normalize", description="Several reward terms: weighted sum then normalise (default), or normalise "
        "each term within its group then sum (GDPO).")
    top_entropy_quantile: float = Field(1.0, ge=0, le=1, description="Keep in the policy loss only the tokens in the "
                                        "top rho quantile of entropy (1 = all tokens).")
    entropy_coef: float = Field(0.0, description="Weight of an entropy bonus in the loss (0 = off).")

    trl_fields = (*SampledRLConfig.trl_fields, "loss_type", "scale_rewards", "importance_sampling_level", "delta",
                  "multi_objective_aggregation", "top_entropy_quantile", "entropy_coef")

    @field_validator("loss_type")
    @classmethod
    def _loss_type(cls, v):
        return trl_lists.check(v, trl_lists.grpo_loss_types)


# generation.* -> the TRL config fields it sets; a recipe sets them through `generation`, not `train`
GENERATION_FIELDS = {"backend": "use_vllm", "vllm_mode": "vllm_mode", "gpu_memory_utilization":
                     "vllm_gpu_memory_utilization", "max_model_length": "vllm_max_model_length",
                     "server_base_url": "vllm_server_base_url", "enable_sleep_mode": "vllm_enable_sleep_mode",
                     "tensor_parallel_size": "vllm_tensor_parallel_size"}


def generation_kwargs(run) -> dict:
    """The TRL config fields the recipe's ``generation`` section sets (none for the hf backend)."""
    from aligntool.errors import UserError

    recipe = run.recipe
    extras = recipe.train.model_extra or {}
    for key, trl_key in GENERATION_FIELDS.items():
        if trl_key in extras:
            raise UserError(f"{run.loaded.source}: train.{trl_key}: set generation.{key} instead (aligntool maps the "
                            f"generation section onto TRL's vLLM fields)")
    g = recipe.generation
    if g.backend != "vllm":
        return {}
    out = {"use_vllm": True, "vllm_mode": g.vllm_mode, "vllm_gpu_memory_utilization": g.gpu_memory_utilization}
    if g.max_model_length is not None:
        out["vllm_max_model_length"] = g.max_model_length
    if g.server_base_url is not None:
        out["vllm_server_base_url"] = g.server_base_url
    if g.max_num_seqs is not None:  # TRL sets vLLM's max_num_seqs from its own batch
        raise UserError(f"{run.loaded.source}: generation.max_num_seqs: {run.loaded.spec.name} (TRL) sets vLLM's "
                        "max_num_seqs from its batch; remove it (it applies to the engine's online methods)")
    out.update(vllm_enable_sleep_mode=g.enable_sleep_mode, vllm_tensor_parallel_size=g.tensor_parallel_size)
    return out


def reward_terms(run) -> list:
    """(name, checked function, weight) per term of the recipe's reward (default: the toy gold reward). A function
    may return None for a completion it does not apply to: TRL's trainers skip it (a nan-aware weighted sum)."""
    from aligntool import models, rewards
    from aligntool.recipe.schema import RewardConfig

    if run.recipe.reward is None and run.recipe.agent is not None:
        from aligntool.trainers.grpo_tools import environment_reward

        if environment_reward(run):  # the environment's get_reward is the reward (TRL adds it as a reward source)
            return []
    kwargs = (run.recipe.train.model_extra or {}).get("chat_template_kwargs")  # how reward models render conversations
    return rewards.terms(run.recipe.reward or RewardConfig(), models.run_device(), allow_none=True,
                         chat_template_kwargs=kwargs)


def args(run, terms=None):
    """The TRL config of the run: train.* + algo.* + reward_weights + the generation section's vLLM fields."""
    terms = reward_terms(run) if terms is None else terms
    m = run.recipe.model
    # with beta > 0 TRL loads the reference itself from the policy's folder: with the recipe's revision and remote code
    extra = {"trust_remote_code": m.trust_remote_code}
    if m.revision is not None:
        extra["model_init_kwargs"] = {"revision": m.revision}
    weights = [float(w) for _, _, w in terms] or None  # None: the environment's get_reward only (TRL's weight 1)
    return run.trl_config(reward_weights=weights, **extra, **generation_kwargs(run))


def build_trainer(run, trainer_cls):
    """A TRL GRPO-style trainer (GRPOTrainer, RLOOTrainer) on the run's policy, reward terms, data and LoRA config."""
    import contextlib
    from pathlib import Path

    from aligntool.errors import UserError, first_line

    recipe = run.recipe
    if recipe.train.max_length is not None:
        raise UserError(f"{run.loaded.source}: train.max_length: does not apply to {run.loaded.spec.name}, which "
                        "limits the completions with algo.max_completion_length")
    ref = recipe.ref_model
    if ref is not None and (ref.name_or_path or ref.soup or ref.dtype != "auto"):
        # TRL builds its reference from the policy's own folder; a soup policy (policy_from_soup) is that folder
        if not (ref.soup and ref.policy_from_soup):
            raise UserError(f"{run.loaded.source}: ref_model: {run.loaded.spec.name} uses the initial policy as its "
                            "reference (TRL's trainer); remove ref_model, or start the policy from the model you want "
                            "as reference")
    terms = reward_terms(run)
    config = args(run, terms)
    folder = Path(run.model_path)
    if config.beta > 0 and recipe.peft is None and (folder / "adapter_config.json").is_file() \
            and not (folder / "config.json").is_file():
        # TRL would load the reference from the adapter's base model, not from the merged policy it starts from
        raise UserError(f"{run.loaded.source}: model.name_or_path: {run.model_path} is a LoRA adapter; with "
                        f"algo.beta > 0 {run.loaded.spec.name}'s KL reference would be its base model: merge it first "
                        "(aligntool merge-lora), or set algo.beta: 0")
    agent, counts = {}, None
    if recipe.agent is not None:  # tools / environment (GRPO only: the loader refuses agent elsewhere)
        from aligntool.trainers import grpo_tools

        agent, counts = grpo_tools.trainer_kwargs(run, config)
    policy = run.policy()
    engine = _vllm_engine(run, policy) if config.use_vllm else contextlib.nullcontext()
    try:
        with engine:
            trainer = trainer_cls(model=policy, reward_funcs=[fn for _, fn, _ in terms], args=config,
                                  train_dataset=run.train_dataset, eval_dataset=run.eval_dataset,
                                  processing_class=run.tokenizer, peft_config=run.peft_config(), **agent)
    except ValueError as exc:  # TRL's checks of combined settings (e.g. sync_ref_model with beta 0)
        raise UserError(f"{run.loaded.source}: train/algo: {first_line(exc)}") from None
    if counts is not None:  # before the callbacks that write the logged row
        trainer.callback_handler.callbacks.insert(0, grpo_tools.counts_callback(counts))
    return trainer


def _vllm_engine(run, policy):
    """While TRL builds its colocated vLLM engine: aligntool's checks and CPU options (eager mode, the checkpoint's
    dtype, plain linear layers: aligntool.online.vllm_backend)."""
    import os

    import torch

    from aligntool.online import vllm_backend

    vllm_backend.check_installed()
    vllm_backend.check_scale_options(run.recipe.generation)  # sleep mode / tensor parallelism where they can run
    on_cpu = not torch.cuda.is_available()
    if on_cpu:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of RAM for the KV cache
    g = run.recipe.generation
    eager = on_cpu if g.enforce_eager is None else g.enforce_eager
    return vllm_backend.engine_options(next(policy.parameters()).dtype if on_cpu else "auto", eager)


def build(run):
    if run.recipe.generation.asynchronous:  # TRL's experimental AsyncGRPOTrainer (aligntool.trainers.grpo_async)
        from aligntool.trainers import grpo_async

        return grpo_async.build(run, reward_terms)
    from trl import GRPOTrainer

    return build_trainer(run, GRPOTrainer)
