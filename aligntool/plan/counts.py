"""Parameter counts of a model built from its config on the meta device: no memory, no weights read.

The same approach as Step Law's ``steplaw.non_embedding_params`` (``AutoModelForCausalLM.from_config`` under
``torch.device("meta")``), extended with what the memory plan needs: the total (tied weights once), the embeddings,
the largest module's own parameters (DeepSpeed's "largest layer": ``estimate_zero3_model_states_mem_needs_all_live``
takes the max over modules of ``sum(p.numel() for p in module.parameters(recurse=False))``), the largest decoder block
(FSDP's wrapping unit), the shapes of the trainable tensors (8-bit and COSMOS states depend on them) and, with LoRA,
the adapter's parameters as peft builds them (on the meta device too).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ModelCounts:
    total: int  # every parameter, tied ones once
    embedding: int  # input embeddings + a separate output head (0 for it when tied)
    largest_layer: int  # DeepSpeed's largest layer: the most parameters one module holds itself
    largest_block: int  # the largest repeated block (decoder layer): FSDP's wrapping unit
    linear: int  # parameters of the Linear layers but the output head (the ones QLoRA stores in 4 bits)
    trainable: int  # what gets gradients and optimizer state: total, or the LoRA adapter's parameters
    trainable_shapes: tuple[tuple[int, ...], ...] = field(default=(), repr=False)
    lora: bool = False
    lora_modules: int = 0  # adapted Linear layers
    lora_inputs: int = 0  # the sum of their input widths (each keeps its own dropped-out copy of its input)
    # the parameters of nn.Embedding modules, each tied one once: transformers' Trainer keeps their bitsandbytes 8-bit
    # optimizer state in 32 bits (Trainer.create_optimizer registers optim_bits=32 for every nn.Embedding)
    embedding_modules: int = 0


def _build(config, head: str, trust_remote_code: bool):
    import torch
    import transformers

    auto = {"causal": transformers.AutoModelForCausalLM,
            "score": transformers.AutoModelForSequenceClassification}[head]
    if head == "score":  # a reward model: one score per sequence, as aligntool and TRL load it (num_labels=1)
        config = config.__class__.from_dict({**config.to_dict(), "num_labels": 1})
    with torch.device("meta"):
        return auto.from_config(config, trust_remote_code=trust_remote_code)


def _largest_block(model) -> int:
    """The largest module that appears in an nn.ModuleList (a transformer's decoder layers)."""
    import torch

    best = 0
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList):
            for child in module:
                best = max(best, sum(p.numel() for p in child.parameters()))
    return best


def _lora(model, peft_cfg):
    from peft import LoraConfig, get_peft_model

    target = peft_cfg.target_modules
    cfg = LoraConfig(r=peft_cfg.r, lora_alpha=peft_cfg.lora_alpha, lora_dropout=peft_cfg.lora_dropout,
                     target_modules=target, task_type="CAUSAL_LM")
    import torch

    with torch.device("meta"):
        return get_peft_model(model, cfg)


def count(config, *, head: str = "causal", peft=None, trust_remote_code: bool = False) -> ModelCounts:
    """The counts of ``config``'s model (``head``: causal LM, or ``score``, a sequence classifier: a reward model),
    with ``peft`` (the recipe's PeftConfig) the trainable part is the LoRA adapter."""
    key = (config.to_json_string(use_diff=False), head, None if peft is None else peft.model_dump_json(),
           trust_remote_code)
    return _count_cached(key, config, head, peft, trust_remote_code)


_CACHE: dict = {}  # the suggestions re-run the plan: each model is built once per process


def _count_cached(key, config, head, peft, trust_remote_code) -> ModelCounts:
    if key not in _CACHE:
        _CACHE[key] = _count(config, head, peft, trust_remote_code)
    return _CACHE[key]


def _count(config, head, peft, trust_remote_code) -> ModelCounts:
    import torch

    model = _build(config, head, trust_remote_code)
    params = dict((id(p), p) for p in model.parameters())  # tied parameters once
    total = sum(p.numel() for p in params.values())
    emb_ids = set()
    for module in (model.get_input_embeddings(), model.get_output_embeddings()):
        if module is not None:
            emb_ids.update(id(p) for p in module.parameters())
    embedding = sum(params[i].numel() for i in emb_ids if i in params)
    largest_layer = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    out_head = model.get_output_embeddings()
    linear = sum(m.weight.numel() for m in model.modules()
                 if isinstance(m, torch.nn.Linear) and m is not out_head and m.weight.ndim == 2)
    block = _largest_block(model)
    embedded = {id(p): p.numel() for m in model.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()}
    if peft is None:
        shapes = tuple(tuple(p.shape) for p in params.values())
        return ModelCounts(total, embedding, largest_layer, block, linear, total, shapes,
                           embedding_modules=sum(embedded.values()))
    wrapped = _lora(model, peft)
    trainable = [p for p in wrapped.parameters() if p.requires_grad]
    adapted = [m for m in wrapped.modules() if hasattr(m, "lora_A") and isinstance(getattr(m, "base_layer", None),
                                                                                    torch.nn.Linear)]
    return ModelCounts(total, embedding, largest_layer, block, linear, sum(p.numel() for p in trainable),
                       tuple(tuple(p.shape) for p in trainable), lora=True, lora_modules=len(adapted),
                       lora_inputs=sum(m.base_layer.in_features for m in adapted))
