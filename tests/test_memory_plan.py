"""The memory plan (aligntool/plan/memory.py): its model-state figures against DeepSpeed's own ZeRO estimators, and
its terms against counts made here by hand."""

from __future__ import annotations

import pytest

pytest.importorskip("deepspeed")

GiB = 2**30


def _configs(tiny_path):
    from transformers import AutoConfig, LlamaConfig, Qwen2Config

    qwen = Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                       num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True)  # Qwen2.5-0.5B
    llama = LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                        num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False)  # Llama-3-8B
    return {"tiny": AutoConfig.from_pretrained(tiny_path), "qwen2.5-0.5b": qwen, "llama-3-8b": llama}


def _deepspeed_counts(config):
    """total_params and largest_layer_params as DeepSpeed's estimate_zero3_model_states_mem_needs_all_live takes them
    from a live model (parameters once; the largest sum of one module's own parameters), here on the meta device."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    total = sum(p.numel() for p in model.parameters())
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    return total, largest


def _deepspeed_gpu_bytes(stage, total, largest, gpus, offload_optimizer, offload_params):
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    if stage == 2:  # what estimate_zero2_model_states_mem_needs_all_cold prints, per GPU
        return estimate_zero2_model_states_mem_needs(total, num_gpus_per_node=gpus, num_nodes=1,
                                                     cpu_offload=offload_optimizer, additional_buffer_factor=1.0)[1]
    return estimate_zero3_model_states_mem_needs(total, largest, num_gpus_per_node=gpus, num_nodes=1,
                                                 cpu_offload=offload_optimizer, cpu_offload_params=offload_params,
                                                 zero_init=True, additional_buffer_factor=1.0)[1]


MODEL_STATES = ("weights", "gradients", "optimizer state", "gathered layer")
CASES = [(2, False, False), (2, True, False), (3, False, False), (3, True, False), (3, True, True)]


def test_model_states_equal_deepspeeds_estimators(tiny_path):
    """For the tiny model, a Qwen2.5-0.5B- and a Llama-3-8B-shaped config, ZeRO-2 and -3 with and without offload, on
    1 and 8 GPUs: the plan's weights + gradients + optimizer state (+ ZeRO-3's gathered layer) per GPU within 2% of
    DeepSpeed's estimators (additional_buffer_factor=1.0)."""
    from aligntool.plan.memory import memory_plan
    from aligntool.recipe.loader import load_recipe

    worst = 0.0
    for name, config in _configs(tiny_path).items():
        total, largest = _deepspeed_counts(config)
        for stage, off_opt, off_params in CASES:
            loaded = load_recipe("dpo", ["train.bf16=true", "distributed.backend=deepspeed",
                                         f"distributed.zero_stage={stage}", f"distributed.offload_optimizer={off_opt}",
                                         f"distributed.offload_params={off_params}"])
            for gpus in (1, 8):
                plan = memory_plan(loaded, config, world_size=gpus)
                ours = sum(c.bytes for c in plan.components if c.name in MODEL_STATES)
                theirs = _deepspeed_gpu_bytes(stage, total, largest, gpus, off_opt, off_params)
                error = abs(ours - theirs) / theirs
                worst = max(worst, error)
                assert error <= 0.02, (name, stage, off_opt, off_params, gpus, ours, theirs)
    print(f"largest relative error against DeepSpeed's estimators: {worst:.2e}")
