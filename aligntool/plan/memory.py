"""The memory plan per GPU of a resolved recipe: weights, gradients, optimizer state, activations, the reference,
reward and critic models, the vLLM share, under DDP, DeepSpeed ZeRO-2/3 (with offload), FSDP2, LoRA / QLoRA; a
verdict against the GPU's memory and the settings that would make it fit, each with the total it would give.

``memory_plan(loaded, config, world_size=..., gpu_memory=...)`` is the entry point (the dry run calls it). The
formulas are in ``aligntool/plan/terms.py`` and docs/MEMORY.md; the parameter counts come from the model built on the
meta device (``aligntool/plan/counts.py``). The plan is for GPUs: ``train.bf16`` / ``gradient_checkpointing`` unset
mean their GPU defaults (bf16 on, recomputation on).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from aligntool.plan import counts as counting
from aligntool.plan import terms
from aligntool.plan.setup import CHANGES, ONLINE, Setup, resolve

GiB = 2**30
RUNTIME_ALLOWANCE = 1 * GiB  # CUDA context, NCCL, allocator slack: an allowance, not computed


@dataclass
class Component:
    name: str
    bytes: int
    note: str = ""
    counted: bool = True  # False: shown, but not part of the total (another phase's peak is larger)


@dataclass
class MemoryPlan:
    components: list[Component]
    total: int
    gpu_memory: int | None
    fits: bool | None
    suggestions: list[str]
    params: int
    trainable_params: int
    settings: dict = field(default_factory=dict)  # what the plan assumed (backend, dtype, rows, length, ...)

    def to_json(self) -> dict:
        return {"components": [dataclasses.asdict(c) for c in self.components], "total": self.total,
                "gpu_memory": self.gpu_memory, "fits": self.fits, "suggestions": self.suggestions,
                "params": self.params, "trainable_params": self.trainable_params, "settings": self.settings}

    def lines(self) -> list[str]:
        s = self.settings
        out = [f"memory plan per GPU: {s.get('summary', '')}",
               f"parameters: {self.params:,} ({self.trainable_params:,} trainable)"]
        width = max(len(c.name) for c in self.components)
        for c in self.components:
            mark = "" if c.counted else " (not counted)"
            out.append(f"  {c.name:<{width}}  {fmt(c.bytes):>10}  {c.note}{mark}")
        out.append(f"  {'total':<{width}}  {fmt(self.total):>10}")
        if self.gpu_memory is None:
            out.append("verdict: no GPU memory given (--gpu-memory 80GB or the recipe's hardware:)")
        else:
            verdict = "fits" if self.fits else "does NOT fit"
            out.append(f"verdict: {verdict} in {fmt(self.gpu_memory)} per GPU "
                       f"({100 * self.total / self.gpu_memory:.0f}% used)")
        out.extend(f"  would fit: {x}" for x in self.suggestions)
        return out


def fmt(n: float) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB / 10 else f"{n / 2**20:.1f} MiB"


def memory_plan(loaded, config, *, world_size: int, gpu_memory: int | None = None, reward_config=None,
                prompt_tokens: int | None = None) -> MemoryPlan:
    """The plan per GPU of ``loaded`` (a LoadedRecipe) for the policy ``config`` on ``world_size`` processes, judged
    against ``gpu_memory`` bytes (None: no verdict). ``reward_config``: a separate reward model's config.
    ``prompt_tokens``: the prompt length of methods that sample (default: train.max_prompt_length, else 512)."""
    setup = resolve(loaded, config, world_size, reward_config, prompt_tokens)
    plan = compute(setup, config, reward_config, gpu_memory)
    if plan.fits is False:
        plan.suggestions = suggestions(setup, config, reward_config, gpu_memory)
    return plan


def compute(setup: Setup, config, reward_config, gpu_memory: int | None) -> MemoryPlan:
    score = setup.algorithm == "reward"  # a reward model trains a sequence classifier: one score per row, no vocabulary
    c = counting.count(config, head="score" if score else "causal", peft=setup.peft)
    shape = {**terms.arch(config), "vocab": 0} if score else terms.arch(config)
    parts = (_model_states(setup, c) + _activations(setup, shape, c)
             + _others(setup, c, config, reward_config, gpu_memory))
    parts.append(Component("runtime allowance", RUNTIME_ALLOWANCE, "CUDA context, NCCL, allocator slack (fixed)"))
    parts = [dataclasses.replace(p, bytes=int(round(p.bytes))) for p in parts]
    total = sum(p.bytes for p in parts if p.counted)
    fits = None if gpu_memory is None else total <= gpu_memory
    return MemoryPlan(parts, total, gpu_memory, fits, [], c.total, c.trainable, _settings(setup, c))


def _settings(s: Setup, c) -> dict:
    dist = {"ddp": "DDP", "fsdp": "FSDP2 " + ("full_shard" if s.fsdp_full else "shard_grad_op"),
            "deepspeed": f"ZeRO-{s.zero_stage}" + (" + offload optimizer" if s.offload_optimizer else "")
            + (" + offload params" if s.offload_params else "")}[s.backend]
    tune = "QLoRA" if s.qlora else "LoRA" if s.peft is not None else "full"
    summary = (f"{s.algorithm}, {dist}, {s.world} GPU(s), {tune}, {s.optim}, "
               f"{'bf16 mixed' if s.mixed else 'no mixed precision'}, weights {s.weight_bytes * 8}-bit, "
               f"{s.rows} x {s.seq} tokens per micro-batch, recomputation {'on' if s.checkpointing else 'off'}")
    return {"summary": summary, "backend": s.backend, "zero_stage": s.zero_stage if s.backend == "deepspeed" else None,
            "world_size": s.world, "rows": s.rows, "seq": s.seq, "gradient_checkpointing": s.checkpointing,
            "optim": s.optim, "mixed_precision": s.mixed, "lora": s.peft is not None, "qlora": s.qlora,
            "largest_layer_params": c.largest_layer, "embedding_params": c.embedding}


def _weights_bytes(s: Setup, c) -> tuple[float, str]:
    """The policy's weights per GPU before sharding: QLoRA's 4-bit base, else the loaded dtype (16-bit under
    DeepSpeed mixed precision, which casts the model)."""
    if s.qlora:
        rest = c.total - c.linear
        return c.linear * terms.NF4_BYTES + rest * 2 + c.trainable * 2, "NF4 base (4.13 bits) + 16-bit rest + adapter"
    wb = 2 if (s.backend == "deepspeed" and s.mixed) else s.weight_bytes
    return c.total * wb, f"{c.total:,} x {wb} bytes"


def _model_states(s: Setup, c) -> list[Component]:
    if s.backend == "deepspeed" and not s.qlora:
        return _deepspeed_states(s, c)
    n = s.world if s.backend != "ddp" else 1
    weights, wnote = _weights_bytes(s, c)
    # trainable tensors' dtype: the loaded one; QLoRA's adapter in fp32 (peft's default); FSDP2 under mixed precision
    # upcasts the trainable weights to fp32 masters (accelerate's fsdp2_prepare_model), bf16 being the compute dtype
    tb = 4 if s.qlora or (s.backend == "fsdp" and s.mixed) else s.weight_bytes
    if s.backend == "fsdp" and s.mixed and not s.peft:
        weights, wnote = c.total * 4, f"{c.total:,} x 4 bytes (fp32 masters, accelerate's FSDP2 upcast)"
    shard_w = s.backend == "fsdp" or (s.backend == "deepspeed" and s.zero_stage == 3)
    parts = [Component("weights", weights / (n if shard_w else 1), wnote + (f" / {n}" if shard_w and n > 1 else ""))]
    if s.backend == "fsdp":
        cb = 2 if s.mixed else s.weight_bytes
        gathered = 2 * c.largest_block * cb if s.fsdp_full else c.total * cb
        parts.append(Component("gathered weights", gathered, "two decoder blocks unsharded (prefetch)" if s.fsdp_full
                               else "shard_grad_op keeps the forward's weights until backward"))
    parts.append(Component("gradients", c.trainable * tb / n,
                           f"{c.trainable:,} x {tb} bytes" + (f" / {n}" if n > 1 else "")))
    if s.backend == "ddp" and s.world > 1:
        parts.append(Component("DDP gradient buckets", c.trainable * tb, "DDP's flat copy of the gradients for the "
                               "all-reduce (gradient_as_bucket_view off, accelerate's default)"))
    opt, note = terms.optimizer_states(s.optim, c.trainable_shapes, tb, s.vocab_size, s.cosmos_rank,
                                       _fp32_embedding(s, c))
    if s.backend == "deepspeed" and s.offload_optimizer:
        opt, note = 0, "offloaded to CPU (" + note + ")"
    parts.append(Component("optimizer state", opt / n, note + (f" / {n}" if n > 1 else "")))
    return parts


def _fp32_embedding(s: Setup, c) -> int:
    """The embedding elements whose bitsandbytes 8-bit state transformers' Trainer keeps in 32 bits (the methods
    trained by a Trainer, the embeddings trainable); the rollout engine builds its optimizer itself."""
    return 0 if s.algorithm in ONLINE or c.lora else c.embedding_modules


def _deepspeed_states(s: Setup, c) -> list[Component]:
    """DeepSpeed's count (its estimators'), with a non-Adam optimizer's moments put in place of Adam's 8 bytes; under
    ZeRO-3 also the parameters kept gathered between forward and backward (not in the estimators)."""
    wb = 2 if s.mixed else 4
    ds = terms.deepspeed_states(c.total, c.trainable, c.largest_layer, s.world, s.zero_stage,
                                s.offload_optimizer, s.offload_params, wb)
    moments, note = terms.optimizer_states(s.optim, c.trainable_shapes, 4, s.vocab_size, s.cosmos_rank,
                                           _fp32_embedding(s, c))
    if not s.offload_optimizer:
        ds["moments"] = moments / s.world
    n = s.world
    off = " (offloaded: 0 on the GPU)"
    parts = [Component("weights", ds["weights"], f"{c.total:,} x {wb} bytes"
                       + (f" / {n}" if s.zero_stage == 3 else "") + (off if s.offload_params else "")),
             Component("gradients", ds["gradients"], (f"16-bit + fp32: {c.trainable:,} x {wb + 4} bytes / {n}"
                       if s.zero_stage < 3 else f"fp32 partition: {c.trainable:,} x 4 bytes / {n}")
                       + (off if s.offload_optimizer else "")),
             Component("optimizer state", ds["master"] + ds["moments"],
                       f"fp32 master 4 bytes + {note}, / {n}" + (off if s.offload_optimizer else ""))]
    if s.zero_stage == 3:
        parts.append(Component("gathered layer", ds["gathered"], f"largest layer {c.largest_layer:,} x {2 * wb} "
                               "bytes (weights + gradients)"))
        parts.append(Component("ZeRO-3 live parameters", terms.zero3_live(c.total, wb),
                               f"min(P, stage3_max_live_parameters 1e9) x {wb} bytes gathered from forward to "
                               "backward (DeepSpeed's default reuse distance)"))
    return parts


def _compute_bytes(s: Setup) -> int:
    if s.backend == "deepspeed" and not s.qlora:
        return 2 if s.mixed else 4  # DeepSpeed casts the model to its 16-bit dtype
    return 2 if s.mixed or s.qlora else s.weight_bytes


def _activation_bytes(s: Setup, shape: dict, c, checkpointing: bool) -> float:
    """Under DDP autocast with fp32 weights the residual stream stays fp32 and every Linear's 16-bit weight copy is
    kept for backward; elsewhere the weights already are in the compute dtype."""
    dt = _compute_bytes(s)
    autocast = s.backend == "ddp" and s.mixed and s.weight_bytes == 4 and not s.qlora
    cast = 2 * (c.linear + shape["vocab"] * shape["hidden"]) if autocast else 0
    base = terms.activations(s.rows, s.seq, shape, dt, checkpointing, s.eager, rb=4 if autocast else dt,
                             cast_weights=cast, logit_seq=s.logit_seq)
    if s.peft is None:
        return base
    lora = terms.lora_activations(s.rows, s.seq, c.lora_modules, c.lora_inputs, s.peft.r, dt,
                                  s.peft.lora_dropout > 0)
    return base + (lora / shape["layers"] if checkpointing else lora)  # recomputed: one layer's at a time


def _activations(s: Setup, shape: dict, c) -> list[Component]:
    dt = _compute_bytes(s)
    on = _activation_bytes(s, shape, c, s.checkpointing)
    other = _activation_bytes(s, shape, c, not s.checkpointing)
    logit = terms.logits(s.rows, s.logit_seq, shape, dt)
    name = "activations (recomputation on)" if s.checkpointing else "activations (recomputation off)"
    other_note = (f"recomputation {'off' if s.checkpointing else 'on'}: {fmt(other)}" if s.algorithm not in ONLINE
                  else "the rollout engine does not recompute")
    parts = [Component(name, on, f"{s.rows} x {s.seq} tokens, logits {fmt(logit)} of it; {other_note}")]
    if s.critic == "separate":
        parts.append(Component("critic activations", on - logit, "the separate critic's forward (no logits)"))
    if s.gen_rows and not s.vllm_share:
        kv = terms.kv_cache(s.gen_rows, s.seq, shape, dt)
        parts.append(Component("generation KV cache", kv, f"{s.gen_rows} sequences x {s.seq} tokens (transformers "
                               "generate; not at the same time as the activations: the larger counts)",
                               counted=kv > on))
        if kv > on:
            parts[0].counted = False
    return parts


def _others(s: Setup, c, config, reward_config, gpu_memory) -> list[Component]:
    parts = []
    shard = s.world if (s.backend == "deepspeed" and s.zero_stage == 3) or s.backend == "fsdp" else 1
    if s.reference:
        rb = (2 if s.mixed else 4) if s.backend == "deepspeed" else s.ref_bytes
        parts.append(Component("reference model", c.total * rb / shard, f"frozen: {c.total:,} x {rb} bytes"
                               + (f" / {shard}" if shard > 1 else "")))
        if s.backend == "deepspeed" and s.zero_stage == 3:
            online = s.algorithm in ONLINE  # the rollout scores with the reference before the update's forward
            parts.append(Component("reference live parameters", terms.zero3_live(c.total, rb),
                                   "ZeRO-3 gathers the frozen reference whole for its forward" + (
                                       ", in the rollout, before the update's activations exist" if online else
                                       ", while the policy's activations are held"), counted=not online))
    elif s.peft is not None:
        parts.append(Component("reference model", 0, "the base with the adapter disabled: no copy"))
    if s.critic == "shared":
        h = terms.arch(config)["hidden"]
        parts.append(Component("value head", (h + 1) * 16, "one Linear(hidden, 1): weights, gradients, Adam"))
    elif s.critic == "separate":
        states = sum(p.bytes for p in _model_states(dataclasses.replace(s, peft=None), counting.count(config)))
        parts.append(Component("critic model", states, "a second LM trained beside the policy: its weights, "
                               "gradients and optimizer state"))
    if s.reward_models:
        if reward_config is not None:
            rc = counting.count(reward_config, head="score")
            parts.append(Component("reward model", rc.total * s.reward_bytes * s.reward_models,
                                   f"{s.reward_models} x {rc.total:,} x {s.reward_bytes} bytes (frozen, whole)"))
        else:
            parts.append(Component("reward model", 0, "a reward-model folder: give its config to count it"))
    if s.vllm_share:
        share = s.vllm_share * gpu_memory if gpu_memory else 0
        parts.append(Component("vLLM (colocated)", share, f"gpu_memory_utilization {s.vllm_share} of the GPU"
                               + ("" if gpu_memory else " (no GPU memory given: not counted)")))
    return parts


def suggestions(setup: Setup, config, reward_config, gpu_memory: int) -> list[str]:
    """The single changes of the recipe that make the plan fit, each with the total it would give; when none does
    alone, the first combination (in the order below) that does."""
    out, combined, steps = [], setup, []
    for label, change in CHANGES:
        new = change(setup)
        if new is None:
            continue
        total = compute(new, config, reward_config, gpu_memory).total
        if total <= gpu_memory:
            out.append(f"{label}: {fmt(total)}")
        both = change(combined)
        if both is not None:
            combined, steps = both, [*steps, label]
            if not out and compute(combined, config, reward_config, gpu_memory).total <= gpu_memory:
                total = compute(combined, config, reward_config, gpu_memory).total
                return [f"{' + '.join(steps)}: {fmt(total)}"]
    if not out:
        out.append(f"nothing tried fits ({' + '.join(steps)} gives "
                   f"{fmt(compute(combined, config, reward_config, gpu_memory).total)}); more GPUs with ZeRO-3, or "
                   "a smaller model")
    return out
