"""The byte formulas of the memory plan, one function per term (docs/MEMORY.md gives each with its source).

Everything here is arithmetic on counts and settings: no torch, no model. ``P`` is the total parameter count, ``T``
the trainable one, ``N`` the processes (GPUs) that shard, ``L`` DeepSpeed's largest layer.

Model states follow DeepSpeed's own estimators (``deepspeed.runtime.zero.stage_1_and_2.
estimate_zero2_model_states_mem_needs`` and ``stage3.estimate_zero3_model_states_mem_needs``) under mixed precision:
16-bit weights (2 P, or 2 P / N under ZeRO-3), 16-bit and fp32 gradients (2 T + 4 T, sharded), the fp32 master
copy (4 T) and Adam's two fp32 moments (8 T), sharded; ZeRO-3 adds the gathered largest layer (4 L); offload moves
what it names to the CPU. DDP and FSDP keep the weights in their loaded dtype, gradients and torch optimizer states in
that dtype too (transformers' Trainer keeps no master copy).
"""

from __future__ import annotations

import math

# bitsandbytes' 8-bit optimizers: 1 byte per state element plus one fp32 absmax per block of 256 (blockwise
# quantisation, Dettmers et al. 2022 "8-bit Optimizers via Block-wise Quantization"); tensors under 4096 elements
# keep 32-bit state (bnb's min_8bit_size)
BNB_BLOCK = 256
BNB_MIN_8BIT = 4096
# QLoRA's NF4 base: 4 bits per weight + the absmax of each 64-element block, itself 8-bit with one fp32 second-level
# constant per 256 blocks (double quantisation: 0.127 bits per weight, Dettmers et al. 2023, Sec. 3)
NF4_BYTES = (4 + 8 / 64 + 32 / (64 * 256)) / 8


def optimizer_states(optim: str, shapes, state_bytes: float, vocab_size: int | None = None,
                     cosmos_rank: int = 64, fp32_embedding: int = 0) -> tuple[float, str]:
    """Bytes of optimizer state for the trainable tensors ``shapes`` (state dtype ``state_bytes`` for the torch
    optimizers: the parameter's), with a note naming what is counted. Unknown names count as Adam.
    ``fp32_embedding``: elements of one of ``shapes`` (the embedding) whose bitsandbytes 8-bit state is kept in 32
    bits, as transformers' Trainer asks for every nn.Embedding."""
    numel = [math.prod(s) for s in shapes]
    total = sum(numel)
    name = optim.lower()
    if "8bit" in name or "bnb_8bit" in name:
        states = 1 if "lion" in name else 2
        small = sum(n for n in numel if n < BNB_MIN_8BIT)
        # per 8-bit tensor and state: the bytes, one fp32 absmax per block, the 256-entry fp32 quantile map
        big = sum(n + 4 * math.ceil(n / BNB_BLOCK) + 4 * 256 for n in numel if n >= BNB_MIN_8BIT)
        n = fp32_embedding
        if n >= BNB_MIN_8BIT:  # that tensor's 8-bit state replaced by 32-bit
            big -= n + 4 * math.ceil(n / BNB_BLOCK) + 4 * 256
            small += n
        return (states * (big + small * 4),
                f"bitsandbytes 8-bit {'Lion: 1' if states == 1 else 'Adam: 2'} state(s) x 1 byte + absmax per "
                f"{BNB_BLOCK}" + (" (embeddings in 32 bits, as the Trainer keeps them)" if n else ""))
    if name in ("lion_32bit", "paged_lion_32bit", "lion"):
        return total * 4, "Lion: 1 fp32 momentum"
    if name == "lion_kappa":
        return total * state_bytes, "Lion-kappa: 1 momentum (aligntool/optim/lion_kappa.py)"
    if name == "sgd":
        return 0, "SGD without momentum: no state"
    if name.startswith("adafactor"):
        b = sum((s[0] + s[1]) * 4 if len(s) == 2 else math.prod(s) * 4 for s in shapes)
        return b, "Adafactor: factored second moment (rows + columns) in fp32"
    if name == "cosmos":
        return _cosmos(shapes, state_bytes, vocab_size, cosmos_rank), (
            f"COSMOS: M (m n) + V (m r) + P (n r) + S (r r) per hidden matrix, r = {cosmos_rank}; Adam elsewhere")
    return 2 * total * state_bytes, "Adam: 2 moments (m, v)"


def _cosmos(shapes, state_bytes: float, vocab_size: int | None, rank: int) -> float:
    """aligntool/optim/cosmos.py's state: hidden matrices in fp32 when the weights are 16-bit (their dtype else),
    the rest Adam's two moments in the parameter's dtype (``cosmos_role`` decides which is which)."""
    total = 0.0
    matrix_bytes = max(state_bytes, 4)
    for s in shapes:
        hidden = len(s) == 2 and min(s) > 1 and not ((vocab_size in s) if vocab_size else s[0] > 10000)
        if hidden:
            m, n = s
            r = min(rank, m, n)
            total += (m * n + m * r + n * r + r * r) * matrix_bytes
        else:
            total += 2 * math.prod(s) * state_bytes
    return total


def deepspeed_states(total: int, trainable: int, largest_layer: int, world: int, stage: int,
                     offload_optimizer: bool, offload_params: bool, wb: int = 2) -> dict[str, float]:
    """Per-GPU bytes of weights, gradients, optimizer (master copy + Adam moments) and the gathered layer under ZeRO
    ``stage``, as DeepSpeed's estimators count them for 16-bit weights (``wb`` = 2): ZeRO-2 2 P (16-bit weights,
    whole) + 18 T / N (2 16-bit gradients + 4 fp32 gradients + 4 fp32 master weights + 8 Adam moments, its comment's
    split); ZeRO-3 4 L + 18 T / N (2 16-bit weights + 4 fp32 gradients + 4 master + 8 moments, the largest layer
    gathered with its 16-bit gradients: 4 L). With fp32 weights (``wb`` = 4, no mixed precision) DeepSpeed still
    keeps its fp32 partition beside the weights (a copy: ``.clone().float()``), so the same terms hold with 4 in
    place of 2."""
    weights = wb * total if stage < 3 else (0 if offload_params else wb * total / world)
    shard = 0 if offload_optimizer else 1
    # ZeRO-2: 16-bit + fp32 gradient partitions; ZeRO-3: the fp32 partition, the 16-bit gradients living in the
    # gathered layer's buffers (its 4 L: 16-bit weights + 16-bit gradients)
    grad_bytes = wb + 4 if stage < 3 else 4
    return {"weights": weights, "gradients": shard * grad_bytes * trainable / world,
            "master": shard * 4 * trainable / world, "moments": shard * 8 * trainable / world,
            "gathered": 2 * wb * largest_layer if stage == 3 else 0}


# DeepSpeed's defaults of stage3_max_live_parameters and stage3_max_reuse_distance (transformers' "auto" leaves them):
# a parameter used again within this many elements is not released after its forward, so a model under 1e9
# parameters stays gathered from its forward until its backward
ZERO3_MAX_LIVE = 10**9


def zero3_live(total: int, wb: int, max_live: int = ZERO3_MAX_LIVE) -> float:
    """Bytes of parameters ZeRO-3 keeps gathered between forward and backward: min(P, max_live) x wb (the partition
    stays beside them)."""
    return min(total, max_live) * wb


def layer_activations(rows: int, seq: int, cfg: dict, dt: int, eager: bool, rb: int | None = None) -> float:
    """Activation bytes one decoder layer keeps for backward (Korthikanti et al. 2022, "Reducing Activation
    Recomputation in Large Transformer Models", Sec. 4.1: per layer s b h (34 + 5 a s / h) for GPT with dropout and
    no flash attention), redone for the Llama-style block every supported family uses (pre-RMSNorm, rotary, GQA,
    gated MLP, no dropout): the two norm inputs (2 h, in the residual stream's dtype ``rb``: fp32 under autocast with
    fp32 weights), their fp32 normalised copies (2 x 4 bytes x h), the projections' input (h), q and the attention
    output (2 h_q), k and v (2 h_kv), the MLP input (h), and in the MLP the gate, its activation, up, and their product
    (4 f); with SDPA / flash attention the s x s scores are not kept, with eager attention they are (softmax in fp32 +
    its 16-bit copy: a s^2 (4 + dt))."""
    h, hq, hkv, f = cfg["hidden"], cfg["q_dim"], cfg["kv_dim"], cfg["ffn"]
    per_token = dt * (2 * h + 2 * hq + 2 * hkv + 4 * f) + (rb or dt) * 2 * h + 8 * h
    scores = cfg["heads"] * seq * seq * rows * (4 + dt) if eager else 0
    return rows * seq * per_token + scores


def activations(rows: int, seq: int, cfg: dict, dt: int, checkpointing: bool, eager: bool = False,
                rb: int | None = None, cast_weights: float = 0, logit_seq: int | None = None) -> float:
    """Activation bytes of one forward+backward of ``rows`` sequences of ``seq`` tokens: every layer's
    (``layer_activations``), or with recomputation each layer's input (rb s b h) plus one layer recomputed at a time;
    plus the embedding output and the logits (``logits``). ``cast_weights``: the 16-bit copies autocast makes of fp32
    weights, kept for backward (all of them, or one layer's with recomputation). ``logit_seq``: the positions whose
    logits are computed (``logits_to_keep``: the completion's, in the methods that sample)."""
    one = layer_activations(rows, seq, cfg, dt, eager, rb)
    layers = cfg["layers"]
    rb = rb or dt
    if checkpointing:
        kept = layers * rb * rows * seq * cfg["hidden"] + one + cast_weights / layers
    else:
        kept = layers * one + cast_weights
    return kept + rb * rows * seq * cfg["hidden"] + logits(rows, logit_seq or seq, cfg, dt)


def lora_activations(rows: int, seq: int, modules: int, inputs: int, r: int, dt: int, dropout: bool) -> float:
    """What LoRA adds to the saved tensors: per adapted Linear its rank-r intermediate (lora_A's output, lora_B's
    input: r dt), and with lora_dropout > 0 its own dropped-out copy of the input plus the dropout mask (in (dt + 1))
    (peft's ``lora.Linear.forward``: ``lora_B(lora_A(dropout(x)))``)."""
    return rows * seq * (modules * r * dt + (inputs * (dt + 1) if dropout else 0))


def logits(rows: int, seq: int, cfg: dict, dt: int) -> float:
    """The output head's logits (rows x seq x vocab in the compute dtype) and the fp32 log-softmax the loss keeps for
    backward: rows x seq x vocab x (dt + 4). At small scale this dominates the activations."""
    return rows * seq * cfg["vocab"] * (dt + 4) if cfg["vocab"] else 0


def kv_cache(rows: int, seq: int, cfg: dict, dt: int) -> float:
    """Generation's key/value cache: 2 (k, v) x layers x rows x seq x h_kv x dt."""
    return 2 * cfg["layers"] * rows * seq * cfg["kv_dim"] * dt


def arch(config) -> dict:
    """The sizes the activation formulas read from a transformers config (text config of a multimodal one)."""
    c = config.get_text_config() if hasattr(config, "get_text_config") else config
    h = c.hidden_size
    heads = c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or h // heads
    kv = getattr(c, "num_key_value_heads", None) or heads
    ffn = getattr(c, "intermediate_size", None) or getattr(c, "ffn_dim", None) or 4 * h
    return {"hidden": h, "heads": heads, "q_dim": heads * head_dim, "kv_dim": kv * head_dim, "ffn": ffn,
            "layers": c.num_hidden_layers, "vocab": getattr(c, "vocab_size", 0) or 0}
