"""The DeepSpeed / FSDP settings of a recipe's ``distributed`` section, as TrainingArguments keywords, plus the
equivalent accelerate config file (written beside them for users who launch with ``accelerate launch``)."""

from __future__ import annotations

import json
from pathlib import Path


def deepspeed_config(d) -> dict:
    zero = {"stage": d.zero_stage, "overlap_comm": False, "contiguous_gradients": True}
    if d.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
    if d.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": False}
    if d.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True  # save_pretrained gets whole weights
        # bucket sizes from the model's hidden size (transformers fills "auto"); DeepSpeed's defaults (5e8 elements)
        # are sized for billion-parameter models and would dominate the memory of smaller ones
        zero.update(reduce_bucket_size="auto", stage3_prefetch_bucket_size="auto",
                    stage3_param_persistence_threshold="auto")
    # "auto" values are filled by transformers from the TrainingArguments, so the two never disagree
    return {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto", "train_batch_size": "auto",
            "gradient_clipping": "auto", "zero_optimization": zero, "bf16": {"enabled": "auto"},
            "fp16": {"enabled": "auto"}}


def training_kwargs(d, out: Path, write: bool, launcher_config: dict | None = None) -> dict:
    """TrainingArguments keywords for the backend; writes deepspeed.json / accelerate_config.yaml when ``write``.
    ``launcher_config``: the DeepSpeed JSON ``accelerate launch`` named (distributed.launcher_deepspeed_config), used
    instead of the one built from the recipe.

    The DeepSpeed config goes to TrainingArguments as a dict, not as the path of deepspeed.json: every rank has it at
    once (a rank reading the file the main process is still writing failed the run), and the file is a record."""
    if d.backend == "ddp":
        return {}
    import yaml

    from aligntool.outputs import write_atomic

    acc = {"compute_environment": "LOCAL_MACHINE", "machine_rank": 0, "num_machines": 1, "num_processes": 1,
           "mixed_precision": "no", "main_training_function": "main"}
    if d.backend == "deepspeed":
        path = out / "deepspeed.json"
        config = launcher_config or deepspeed_config(d)
        if write:
            write_atomic(path, json.dumps(config, indent=2) + "\n")
        acc.update(distributed_type="DEEPSPEED", deepspeed_config={"deepspeed_config_file": str(path)})
        kwargs = {"deepspeed": config}
    else:
        # FSDP2 (per-parameter sharding, PyTorch's fully_shard): transformers' default, and the one that runs on CPUs
        reshard = d.fsdp_sharding == "full_shard"
        kwargs = {"fsdp": True, "fsdp_config": {"version": 2, "reshard_after_forward": reshard,
                                                "auto_wrap_policy": "TRANSFORMER_BASED_WRAP"}}
        acc.update(distributed_type="FSDP", fsdp_config={
            "fsdp_version": 2, "fsdp_reshard_after_forward": reshard,
            "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP"})
    if write:
        write_atomic(out / "accelerate_config.yaml",
                     "# accelerate launch --config_file THIS --num_processes N -m aligntool.cli train --recipe ...\n"
                     + yaml.safe_dump(acc, sort_keys=False))
    return kwargs
