"""The one distributed set-up of a run (torchtune's ``setup()``): called once by ``aligntool.train.train`` before any
model loads, never as a side effect of building a config.

It writes the DeepSpeed / accelerate config files the recipe's ``distributed`` section implies (deepspeed.json,
accelerate_config.yaml), and on a multi-process CPU run it starts the process group and accelerate's shared state
itself: accelerate's CPU mode (MULTI_CPU) has neither DeepSpeed nor FSDP, so aligntool configures gloo + DeepSpeed's
CPU accelerator, or gloo + PyTorch's FSDP2, and the Trainer reuses that state (``use_configured_state``). On GPUs and
in single-process runs accelerate's own set-up is used as it is.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


@dataclass
class Setup:
    """What the set-up decided: TrainingArguments keywords of the backend (DeepSpeed config path, FSDP config, CPU
    flags) that every TRL config of the run takes."""

    trainer_kwargs: dict = field(default_factory=dict)


def trainer_kwargs(recipe, out: Path, write: bool = False) -> dict:
    """The backend's TrainingArguments keywords (and, with ``write``, its config files); no process state."""
    from aligntool.launch.configs import training_kwargs

    d = recipe.distributed
    kwargs = training_kwargs(d, out, write=write)
    if world_size() > 1 and not _cuda():
        if d.backend != "deepspeed":
            kwargs["use_cpu"] = True  # without it accelerate sees no GPUs and skips the gloo group
        if d.backend != "ddp":
            kwargs["accelerator_config"] = {"use_configured_state": True}
    return kwargs


def setup(recipe, out: Path) -> Setup:
    """Config files, then (multi-process CPU runs with DeepSpeed or FSDP) the process group and accelerate's state."""
    from aligntool.outputs import is_main_process

    kwargs = trainer_kwargs(recipe, out, write=is_main_process())
    backend = recipe.distributed.backend
    if backend == "deepspeed" and "RANK" not in os.environ:
        # one process started without a launcher: DeepSpeed would look for MPI (mpi4py) to find its rank; give it
        # the one-process rendezvous torchrun would
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR=os.environ.get("MASTER_ADDR", "127.0.0.1"),
                          MASTER_PORT=os.environ.get("MASTER_PORT", str(_free_port())))
    if world_size() > 1 and not _cuda() and backend != "ddp":
        from accelerate import PartialState

        if backend == "deepspeed":
            os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
            PartialState(backend="gloo")
        else:
            _cpu_fsdp_state(recipe, kwargs, out)
    return Setup(kwargs)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _cpu_fsdp_state(recipe, kwargs: dict, out: Path) -> None:
    """Start the CPU state, then switch it to FSDP with the plugin that TrainingArguments derive from the recipe's
    FSDP keywords (a bare TrainingArguments: only its FSDP and precision fields matter here)."""
    from accelerate import Accelerator, PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
    from transformers import TrainingArguments

    PartialState(cpu=True)
    t = recipe.train
    args = TrainingArguments(output_dir=str(out / "checkpoints"), report_to=[], bf16=bool(t.bf16), fp16=bool(t.fp16),
                             **kwargs)
    precision = "bf16" if args.bf16 else "fp16" if args.fp16 else "no"
    state = Accelerator(cpu=True, mixed_precision=precision).state
    if state.distributed_type != DistributedType.FSDP:
        state.fsdp_plugin = FullyShardedDataParallelPlugin(**args.fsdp_plugin_args)
        state.distributed_type = PartialState().distributed_type = DistributedType.FSDP
