"""What the memory plan reads from a resolved recipe (``resolve``), and the changes it tries when the plan does not
fit (``CHANGES``): each a function Setup -> Setup (None where it does not apply)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from aligntool import registry

NO_REFERENCE = {"sft", "reward", "cpl", "orpo", "cpo", "simpo"}  # losses without a reference model
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
DEFAULT_PROMPT_TOKENS = 512  # for methods that sample, when the recipe does not bound the prompt

PAIRED_SAMPLES = {"p3o": 2, "online_dpo": 2, "xpo": 2, "remax": 2}  # sequences per prompt of the online methods
ONLINE = set(registry.names(kind="online"))  # the rollout engine's methods
DEFAULT_BATCH = 8  # TrainingArguments' per_device_train_batch_size
DEFAULT_MAX_LENGTH = 1024  # TRL's max_length (DPOConfig, SFTConfig, KTOConfig, RewardConfig)


@dataclass(frozen=True)
class Setup:
    """What the plan reads from a recipe, resolved (suggestions are this with one field changed)."""

    algorithm: str
    world: int
    backend: str  # ddp | deepspeed | fsdp
    zero_stage: int
    offload_optimizer: bool
    offload_params: bool
    fsdp_full: bool
    weight_bytes: int  # the policy's dtype as loaded
    mixed: bool  # bf16 / fp16 autocast
    checkpointing: bool
    optim: str
    peft: object  # the recipe's PeftConfig or None
    rows: int  # sequences in one forward/backward of the policy
    seq: int
    row_unit: int  # rows one example makes (2 for a preference pair)
    logit_seq: int  # positions whose logits are computed (the completion's, for methods that sample)
    gen_rows: int  # sequences generated at once (0: the method does not sample)
    reference: bool
    ref_bytes: int
    critic: str | None  # None, "shared" (a value head) or "separate" (a second LM)
    vllm_share: float  # colocated vLLM's share of the GPU (0: none)
    reward_models: int
    reward_bytes: int
    eager: bool
    cosmos_rank: int
    vocab_size: int | None

    @property
    def qlora(self) -> bool:
        return bool(self.peft is not None and self.peft.load_in_4bit)


def _dtype_bytes(name: str | None, config) -> int:
    if name and name != "auto":
        return DTYPE_BYTES[name]
    own = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    return DTYPE_BYTES.get(str(own).replace("torch.", ""), 4)


def _train(recipe, key: str, default=None):
    value = getattr(recipe.train, key, None)
    if value is None:
        value = (recipe.train.model_extra or {}).get(key)
    return default if value is None else value


def _lengths(loaded, prompt_tokens: int | None) -> tuple[int, int, int, int]:
    """(rows per forward/backward, tokens per row, rows generated at once, positions with logits) of the policy."""
    recipe, spec, algo = loaded.recipe, loaded.spec, loaded.algo
    batch = _train(recipe, "per_device_train_batch_size", DEFAULT_BATCH)
    batch = DEFAULT_BATCH if batch == "auto" else int(batch)
    prompt = prompt_tokens or _train(recipe, "max_prompt_length") or DEFAULT_PROMPT_TOKENS
    if spec.kind == "online":
        per_prompt = getattr(algo, "samples_per_prompt", None) or PAIRED_SAMPLES.get(spec.name, 1)
        seq = prompt + algo.max_new_tokens
        rows = max(1, batch * per_prompt // getattr(algo, "num_minibatches", 1))
        return rows, seq, batch * per_prompt, algo.max_new_tokens + 1  # logits of the response only
    if spec.batch_unit == "completions":  # GRPO / RLOO: the batch counts completions
        completion = getattr(algo, "max_completion_length", 256)
        accum = _train(recipe, "gradient_accumulation_steps", 1)
        return batch, prompt + completion, batch * int(_train(recipe, "steps_per_generation", accum)), completion
    seq = int(_train(recipe, "max_length", DEFAULT_MAX_LENGTH))
    pairs = spec.data == "preference" or spec.kind == "pipeline"
    gen = batch * 2 if spec.samples else 0  # pipelines sample pairs before they train
    if spec.samples and spec.kind == "pipeline":
        seq = max(seq, prompt + getattr(algo, "max_new_tokens", 0))
    return (2 * batch if pairs else batch), seq, gen, seq


def _row_unit(loaded) -> int:
    spec, algo = loaded.spec, loaded.algo
    if spec.kind == "online":
        return getattr(algo, "samples_per_prompt", None) or PAIRED_SAMPLES.get(spec.name, 1)
    return 2 if (spec.data == "preference" or spec.kind == "pipeline") and spec.batch_unit != "completions" else 1


def _reference(loaded) -> bool:
    recipe, spec, algo = loaded.recipe, loaded.spec, loaded.algo
    if spec.name in NO_REFERENCE:
        return False
    if getattr(algo, "beta", None) == 0 and spec.name in ("grpo", "rloo"):  # TRL loads no reference at beta 0
        return False
    explicit = recipe.ref_model is not None and (recipe.ref_model.name_or_path or recipe.ref_model.soup)
    return not (recipe.peft is not None and not explicit)


def _reward_models(recipe, spec) -> int:
    if not spec.samples or spec.preferences and recipe.reward is not None and recipe.reward.judge:
        return 0
    r = recipe.reward
    if r is None:
        return 0
    if r.ensemble:
        return len(r.ensemble)
    if r.functions:
        return sum(1 for t in r.functions if t.source and t.source != "gold")
    return 0 if r.source == "gold" or ":" in r.source or r.function else 1


def _vllm_share(recipe, spec) -> float:
    g = recipe.generation
    if spec.vllm and g.backend == "vllm" and g.vllm_mode == "colocate":
        return g.gpu_memory_utilization
    if spec.vllm == "trl" and _train(recipe, "use_vllm") and _train(recipe, "vllm_mode", "colocate") == "colocate":
        return float(_train(recipe, "vllm_gpu_memory_utilization", 0.3))
    return 0.0


def resolve(loaded, config, world_size: int, reward_config=None, prompt_tokens: int | None = None) -> Setup:
    recipe, spec, algo = loaded.recipe, loaded.spec, loaded.algo
    d = recipe.distributed
    rows, seq, gen, logit_seq = _lengths(loaded, prompt_tokens)
    bf16, fp16 = recipe.train.bf16, recipe.train.fp16
    mixed = bool(bf16 or fp16) if (bf16 is not None or fp16 is not None) else True  # GPU default: bf16 on
    checkpointing = recipe.train.gradient_checkpointing
    optim = recipe.train.optim or "adamw_torch"
    weight_bytes = _dtype_bytes(recipe.model.dtype, config)
    ref_dtype = recipe.ref_model.dtype if recipe.ref_model is not None else "auto"
    reward_dtype = recipe.reward.dtype if recipe.reward is not None else "auto"
    return Setup(
        algorithm=spec.name, world=world_size, backend=d.backend, zero_stage=d.zero_stage,
        offload_optimizer=d.offload_optimizer, offload_params=d.offload_params,
        fsdp_full=d.fsdp_sharding == "full_shard", weight_bytes=weight_bytes, mixed=mixed,
        # the rollout engine recomputes nothing (train.gradient_checkpointing is TRL's / the Trainer's)
        checkpointing=spec.kind != "online" and (True if checkpointing is None else bool(checkpointing)),
        optim=optim, peft=recipe.peft,
        rows=rows, seq=seq, row_unit=_row_unit(loaded), logit_seq=logit_seq, gen_rows=gen if spec.samples else 0,
        reference=_reference(loaded),
        ref_bytes=weight_bytes if ref_dtype == "auto" else DTYPE_BYTES[ref_dtype],
        critic=(getattr(algo, "critic", "shared") if spec.value_head else None),
        vllm_share=_vllm_share(recipe, spec), reward_models=_reward_models(recipe, spec),
        reward_bytes=_dtype_bytes(reward_dtype, reward_config) if reward_config is not None else weight_bytes,
        eager=recipe.model.attn_implementation == "eager",
        cosmos_rank=recipe.optimizer.rank if recipe.optimizer else 64,
        vocab_size=(recipe.optimizer.vocab_size if recipe.optimizer else None) or getattr(config, "vocab_size", None))


def _lora(s: Setup, qlora: bool):
    from aligntool.recipe.schema import PeftConfig

    if s.peft is not None and (s.peft.load_in_4bit or not qlora):
        return None
    return dataclasses.replace(s, peft=PeftConfig(load_in_4bit=qlora), reference=False)


def _zero3(s: Setup):
    if s.backend == "deepspeed" and s.zero_stage == 3 or s.world == 1:
        return None
    return dataclasses.replace(s, backend="deepspeed", zero_stage=3)


def _offload(s: Setup):
    if s.backend != "deepspeed" or s.offload_optimizer and (s.offload_params or s.zero_stage < 3):
        return None
    return dataclasses.replace(s, offload_optimizer=True, offload_params=s.zero_stage == 3)


def _smaller_batch(s: Setup):
    """One example per micro-batch (a pair for the pair methods, a prompt's samples for the online ones)."""
    if s.rows <= s.row_unit:
        return None
    return dataclasses.replace(s, rows=s.row_unit, gen_rows=max(s.row_unit, s.gen_rows * s.row_unit // s.rows))


def _more_gpus(s: Setup):
    if s.backend == "ddp":
        return None
    return dataclasses.replace(s, world=s.world * 2)


CHANGES = [
    ("train.gradient_checkpointing: true", lambda s: None if s.checkpointing or s.algorithm in ONLINE
     else dataclasses.replace(s, checkpointing=True)),
    ("train.optim: adamw_8bit", lambda s: None if "8bit" in s.optim else dataclasses.replace(s, optim="adamw_8bit")),
    ("distributed: deepspeed ZeRO-3", _zero3),
    ("distributed.offload_optimizer (and offload_params)", _offload),
    ("peft: LoRA r=16", lambda s: _lora(s, False)),
    ("peft: QLoRA (load_in_4bit)", lambda s: _lora(s, True)),
    ("train.per_device_train_batch_size: 1 (gradient_accumulation_steps up to keep the batch)", _smaller_batch),
    ("twice the GPUs", _more_gpus),
]
