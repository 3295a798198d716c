"""The one distributed set-up of a run (torchtune's ``setup()``): called once by ``aligntool.train.train`` before any
model loads, never as a side effect of building a config.

It writes the DeepSpeed / accelerate config files the recipe's ``distributed`` section implies (deepspeed.json,
accelerate_config.yaml), and on a multi-process CPU run it starts the process group and accelerate's shared state
itself: accelerate's CPU mode (MULTI_CPU) has neither DeepSpeed nor FSDP, so aligntool configures gloo + DeepSpeed's
CPU accelerator, or gloo + PyTorch's FSDP2, and the Trainer reuses that state (``use_configured_state``). On GPUs and
in single-process runs accelerate's own set-up is used as it is.

Under ``accelerate launch --config_file X`` the launcher's choice of backend (the environment accelerate's launcher
gives each rank: ACCELERATE_USE_DEEPSPEED, ACCELERATE_DEEPSPEED_ZERO_STAGE, ACCELERATE_USE_FSDP, FSDP_VERSION, ...)
becomes the run's ``distributed`` section (``adopt_launcher``, called by ``train`` before anything reads the
recipe), so that the model is built, sharded and saved for
that backend and recipe.yaml says what ran; a recipe that names another backend is refused in one line.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from aligntool.errors import UserError


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


# what the launcher set, read once per process: before setup() sets accelerate's DeepSpeed flag itself (a CPU
# DeepSpeed run) and drops the variables it adopted
_LAUNCHER: dict = {}
# the launcher's DeepSpeed variables that accelerate refuses beside a DeepSpeed config (DeepSpeedPlugin's
# _deepspeed_config_checks); once adopted into the recipe's config they are dropped from this process's environment
_DS_FIELD_VARS = ("ACCELERATE_CONFIG_DS_FIELDS", "ACCELERATE_DEEPSPEED_ZERO_STAGE",
                  "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE", "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE",
                  "ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL", "ACCELERATE_DEEPSPEED_ZERO3_INIT",
                  "ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "ACCELERATE_GRADIENT_CLIPPING")


def _true(value: str | None) -> bool:
    return str(value).strip().lower() in ("1", "true", "yes")


def launcher_backend(env=None) -> dict | None:
    """The backend ``accelerate launch`` configured for this process, as ``distributed`` keys (plus ``described``:
    how to name it in messages, and ``config_file``: a DeepSpeed JSON the launcher named), or None when no launcher
    chose DeepSpeed or FSDP (torchrun, aligntool's own --nproc, accelerate's plain multi-process modes: DDP)."""
    if env is None:
        if "found" not in _LAUNCHER:
            _LAUNCHER["found"] = launcher_backend(dict(os.environ))
        return _LAUNCHER["found"]
    if _true(env.get("ACCELERATE_USE_DEEPSPEED")):
        config_file = env.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
        config_file = None if config_file in (None, "", "none") else config_file
        zero = {}
        if config_file:
            import json

            try:
                zero = json.loads(Path(config_file).read_text()).get("zero_optimization") or {}
            except (OSError, ValueError) as exc:
                raise UserError(f"accelerate launch: deepspeed_config_file {config_file}: cannot be read as a "
                                f"DeepSpeed JSON config ({exc})") from None
            stage = zero.get("stage", 0)
        else:
            stage = env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")
        where = f"deepspeed_config_file {config_file}" if config_file else "deepspeed_config: zero_stage"
        if str(stage) not in ("2", "3"):
            raise UserError(f"accelerate launch: DeepSpeed ZeRO stage {stage} ({where}); aligntool runs ZeRO stages 2 "
                            f"and 3: set zero_stage 2 or 3 in the accelerate config")
        if config_file:
            off_opt = (zero.get("offload_optimizer") or {}).get("device", "none")
            off_par = (zero.get("offload_param") or {}).get("device", "none")
        else:
            off_opt = env.get("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE", "none")
            off_par = env.get("ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE", "none")
        for name, device in (("offload_optimizer_device", off_opt), ("offload_param_device", off_par)):
            if str(device).lower() not in ("none", "cpu"):
                raise UserError(f"accelerate launch: DeepSpeed {name} {device}; aligntool offloads to the CPU only "
                                f"(set it to cpu or none)")
        return {"backend": "deepspeed", "zero_stage": int(stage), "offload_optimizer": str(off_opt).lower() == "cpu",
                "offload_params": str(off_par).lower() == "cpu", "config_file": config_file,
                "described": f"DeepSpeed ZeRO-{stage}", "train": {} if config_file else _deepspeed_train_keys(env)}
    if _true(env.get("ACCELERATE_USE_FSDP")):
        version = env.get("FSDP_VERSION", "1")
        if version != "2":
            raise UserError(f"accelerate launch: FSDP version {version} (fsdp_config: fsdp_version); aligntool runs "
                            f"FSDP2 (PyTorch's fully_shard): set fsdp_version: 2 in the accelerate config")
        if "FSDP_RESHARD_AFTER_FORWARD" in env:
            reshard = _true(env["FSDP_RESHARD_AFTER_FORWARD"])
        else:
            reshard = env.get("FSDP_SHARDING_STRATEGY", "FULL_SHARD").upper() not in ("SHARD_GRAD_OP", "2")
        return {"backend": "fsdp", "fsdp_sharding": "full_shard" if reshard else "shard_grad_op",
                "config_file": None, "described": "FSDP2"}
    return None


def launcher_deepspeed_config(d) -> dict | None:
    """The DeepSpeed JSON that ``accelerate launch`` named (its config's ``deepspeed_config_file``), as the run's
    config: used as written, except that ZeRO-3 gathers whole 16-bit weights when the model is saved (without it only
    DeepSpeed's partitioned checkpoint is written, and output_dir holds no loadable model)."""
    if d.backend != "deepspeed":
        return None
    found = launcher_backend()
    if not found or not found.get("config_file"):
        return None
    import json

    config = json.loads(Path(found["config_file"]).read_text())
    zero = config.setdefault("zero_optimization", {})
    if int(zero.get("stage", 0)) == 3 and not zero.get("stage3_gather_16bit_weights_on_model_save"):
        from aligntool.outputs import log

        log(f"note: {found['config_file']}: stage3_gather_16bit_weights_on_model_save set to true (the final model is "
            "saved whole)")
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    return config


def adopt_launcher(recipe) -> str | None:
    """Make the recipe's ``distributed`` section the launcher's (see launcher_backend), so that everything that reads
    it (the model's loading under ZeRO-3, the reference, the saving, recipe.yaml) follows what actually runs. Keys the
    recipe set itself must agree with the launcher's; a disagreement is refused in one line. Returns a note to log,
    or None when no launcher chose a backend."""
    found = launcher_backend()
    if found is None:
        return None
    d = recipe.distributed
    given = d.model_fields_set
    launcher = {k: v for k, v in found.items() if k not in ("config_file", "described", "train")}
    clashes = [f"distributed.{k}: {getattr(d, k)!r}" for k, v in launcher.items() if k in given and getattr(d, k) != v]
    if clashes:
        raise UserError(f"accelerate launch: the launcher's config runs {found['described']} but the recipe sets "
                        f"{', '.join(clashes)}; remove the key (the launcher then decides) or launch with a config "
                        f"that matches it")
    for key, value in found.get("train", {}).items():  # the launcher's DeepSpeed training keys (gradient_clipping..)
        if getattr(recipe.train, key) is None:
            setattr(recipe.train, key, value)
        elif getattr(recipe.train, key) != value:
            raise UserError(f"accelerate launch: the launcher's deepspeed_config sets {TRAIN_KEYS[key][0]} {value} but "
                            f"the recipe sets train.{key} {getattr(recipe.train, key)}; remove one of them")
    from aligntool.recipe.schema import DistributedConfig

    recipe.distributed = DistributedConfig.model_validate(
        {**{k: getattr(d, k) for k in given if k not in launcher}, **launcher})
    if found["backend"] == "deepspeed":
        for var in _DS_FIELD_VARS:
            os.environ.pop(var, None)
    return f"accelerate launch: {found['described']} from the launcher's config (recipe.yaml records it)"


# train.* keys an accelerate config's deepspeed_config may set: (its name, the variable the launcher sets, type);
# TrainingArguments fill DeepSpeed's "auto" entries from train.*, so the launcher's values go there
TRAIN_KEYS = {"gradient_accumulation_steps": ("gradient_accumulation_steps", "ACCELERATE_GRADIENT_ACCUMULATION_STEPS",
                                              int),
              "max_grad_norm": ("gradient_clipping", "ACCELERATE_GRADIENT_CLIPPING", float)}


def _deepspeed_train_keys(env) -> dict:
    """The train.* values the launcher's ``deepspeed_config`` named (accelerate lists them in
    ACCELERATE_CONFIG_DS_FIELDS)."""
    named, found = env.get("ACCELERATE_CONFIG_DS_FIELDS", "").split(","), {}
    for key, (name, var, cast) in TRAIN_KEYS.items():
        if name in named and var in env:
            try:
                found[key] = cast(env[var])
            except ValueError:
                raise UserError(f"accelerate launch: deepspeed_config: {name}: {env[var]!r} is not a number") from None
    return found


def backend_used(recipe) -> dict:
    """summary.json's record of how the processes shared the work (a launcher's choice is in the recipe by now)."""
    d = recipe.distributed
    world = world_size()
    described = {"ddp": "DDP" if world > 1 else "one process", "fsdp": f"FSDP2 {d.fsdp_sharding}",
                 "deepspeed": f"DeepSpeed ZeRO-{d.zero_stage}"}[d.backend]
    return {"backend": d.backend, "described": described, "world_size": world,
            **({"zero_stage": d.zero_stage} if d.backend == "deepspeed" else {}),
            **({"launcher": "accelerate launch"} if launcher_backend() else {})}


def trainer_kwargs(recipe, out: Path, write: bool = False) -> dict:
    """The backend's TrainingArguments keywords (and, with ``write``, its config files); no process state."""
    from aligntool.launch.configs import training_kwargs

    d = recipe.distributed
    kwargs = training_kwargs(d, out, write=write, launcher_config=launcher_deepspeed_config(d))
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
        # the one-process rendezvous torchrun would. Port 0: the store binds a port of its own choosing (no other
        # process needs to find it), so no probed-free port can be taken in between (EADDRINUSE)
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR=os.environ.get("MASTER_ADDR", "127.0.0.1"),
                          MASTER_PORT=os.environ.get("MASTER_PORT", "0"))
    if world_size() > 1 and not _cuda() and backend != "ddp":
        from accelerate import PartialState

        if backend == "deepspeed":
            os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
            PartialState(backend="gloo")
        else:
            _cpu_fsdp_state(recipe, kwargs, out)
    return Setup(kwargs)


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
