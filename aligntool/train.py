"""`aligntool train`: recipe -> registry -> models + data -> TRL trainer -> outputs.

Everything a run makes goes under ``output_dir``:

    recipe.yaml      the fully resolved recipe (every default filled in)
    metrics.jsonl    one JSON object per logging (and eval) step
    summary.json     final metrics, wall time, samples/s, peak memory
    tensorboard/     TensorBoard event files
    checkpoints/     checkpoint-<step>/ folders; only those marked COMPLETE are resumed from
    model.safetensors, config.json, tokenizer files: the final model
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import yaml

from aligntool import data as data_mod
from aligntool import models
from aligntool.errors import UserError
from aligntool.recipe.loader import LoadedRecipe

COMPLETE_MARKER = "COMPLETE"


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def log(msg: str) -> None:
    if is_main_process():
        print(msg, file=sys.stderr, flush=True)


def prepare_output_dir(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise UserError(f"output_dir: {path}: cannot write there ({exc.strerror or exc})") from None


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def latest_checkpoint(checkpoints: Path) -> Path | None:
    """The newest checkpoint that finished writing; a run killed mid-save leaves one without the marker."""
    done = [p for p in checkpoints.glob("checkpoint-*") if (p / COMPLETE_MARKER).is_file() and p.name[11:].isdigit()]
    return max(done, key=lambda p: int(p.name[11:]), default=None)


def peak_memory_mb() -> float:
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _callbacks(metrics_file: Path, stage: str | None):
    from transformers import TrainerCallback

    class MetricsJsonl(TrainerCallback):
        """Appends every logged dict, with its step, epoch (and pipeline stage), to the run's metrics.jsonl."""

        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.is_world_process_zero and logs:
                row = {"step": state.global_step, "epoch": state.epoch, **({"stage": stage} if stage else {}), **logs}
                with metrics_file.open("a") as fh:
                    fh.write(json.dumps(row) + "\n")

    class MarkComplete(TrainerCallback):
        """Trainer writes trainer_state.json last; on_save runs after it, so the marker means 'fully written'."""

        def on_save(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
                if ckpt.is_dir():
                    write_atomic(ckpt / COMPLETE_MARKER, f"{state.global_step}\n")

    from aligntool.launch import preemption

    return [MetricsJsonl(), MarkComplete(), preemption.callback()]


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _bf16_supported() -> bool:
    import torch

    return _cuda() and torch.cuda.is_bf16_supported()


def _cpu_fsdp_state(config) -> None:
    """accelerate's CPU mode (MULTI_CPU) has no FSDP, though PyTorch's FSDP2 shards over gloo on CPUs: start the CPU
    state, then switch it to FSDP with the plugin the TrainingArguments describe; the Trainer reuses that state."""
    from accelerate import Accelerator, PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    precision = "bf16" if config.bf16 else "fp16" if config.fp16 else "no"
    state = Accelerator(cpu=True, mixed_precision=precision).state
    if state.distributed_type != DistributedType.FSDP:
        state.fsdp_plugin = FullyShardedDataParallelPlugin(**config.fsdp_plugin_args)
        state.distributed_type = PartialState().distributed_type = DistributedType.FSDP


@dataclass
class Run:
    """What a trainer module's ``build(run)`` gets: the validated recipe and the loaders it may call."""

    loaded: LoadedRecipe
    output_dir: Path
    train_dataset: object = None
    eval_dataset: object = None
    tokenizer: object = None
    model_path: str = ""
    ref_path: str | None = None  # set when the reference is built (e.g. a soup)
    _zero3_args: object = None  # TrainingArguments kept alive while ZeRO-3 models load (see policy())
    resume: bool = False

    @property
    def recipe(self):
        return self.loaded.recipe

    @property
    def algo(self):
        return self.loaded.algo

    def trl_config(self, **overrides):
        """The algorithm's TRL config from ``train.*`` + ``algo.*``; checkpoints go to output_dir/checkpoints."""
        cls = self.loaded.spec.trl_config_class()
        kwargs = self.recipe.trl_kwargs(self.algo)
        kwargs["output_dir"] = str(self.output_dir / "checkpoints")
        from aligntool.launch.configs import training_kwargs

        kwargs.update(training_kwargs(self.recipe.distributed, self.output_dir, write=is_main_process()))
        os.environ["TENSORBOARD_LOGGING_DIR"] = str(self.output_dir / "tensorboard")  # read when the trainer is built
        kwargs.update(overrides)
        report_to = kwargs.get("report_to") or []
        report_to = [report_to] if isinstance(report_to, str) else list(report_to)
        kwargs["report_to"] = sorted({*report_to, "tensorboard"} - {"none"})
        if _cuda() and not _bf16_supported() and kwargs.get("bf16"):
            raise UserError(f"{self.loaded.source}: train.bf16: this GPU has no bf16 support")
        if not _cuda() and kwargs.get("bf16"):
            # an explicit train.bf16=true on a CPU is honoured (torch's CPU autocast): slow, but a GPU run's memory;
            # transformers only accepts it when told this is a CPU run
            kwargs["use_cpu"] = True
        elif not _bf16_supported():
            kwargs["bf16"] = False  # TRL turns bf16 on by default; where the hardware lacks it, say fp32 rather than fail
        backend = self.recipe.distributed.backend
        multi_cpu = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not _cuda()
        if multi_cpu:
            # accelerate only starts a CPU process group in its MULTI_CPU mode, which has neither DeepSpeed nor FSDP;
            # so aligntool configures the shared state itself (gloo + DeepSpeed's CPU accelerator, or gloo + FSDP2,
            # switched over in _cpu_fsdp_state once the config exists) and the Trainer reuses it
            from accelerate import PartialState

            if backend == "deepspeed":
                os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
                PartialState(backend="gloo")
            else:
                kwargs.setdefault("use_cpu", True)  # without it accelerate sees no GPUs and skips the gloo group
                if backend == "fsdp":
                    PartialState(cpu=True)
            if backend != "ddp":
                kwargs["accelerator_config"] = {**(kwargs.get("accelerator_config") or {}), "use_configured_state": True}
        try:
            config = cls(**kwargs)
        except (ValueError, TypeError) as exc:
            raise UserError(f"{self.loaded.source}: train/algo: {str(exc).strip().splitlines()[0]}") from None
        if multi_cpu and backend == "fsdp":
            _cpu_fsdp_state(config)
        return config

    def policy(self, head: str = "causal_lm"):
        m, peft = self.recipe.model, self.recipe.peft
        quant = None
        if peft is not None and peft.load_in_4bit:
            quant = models.four_bit_config(peft)
        d = self.recipe.distributed
        if d.backend == "deepspeed" and d.zero_stage == 3 and quant is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            # while a TrainingArguments with the ZeRO-3 config is alive, transformers builds the model inside
            # deepspeed.zero.Init: each rank only ever holds its shard of the weights, never the whole model
            self._zero3_args = self.trl_config()
        model = models.load_model(self.model_path, m.dtype, m.trust_remote_code, m.revision, head=head,
                                  pad_token_id=self.tokenizer.pad_token_id, quantization_config=quant)
        if self._zero3_args is not None and is_main_process():
            sharded = all(hasattr(p, "ds_id") for p in model.parameters())
            log(f"ZeRO-3: {'weights loaded sharded (deepspeed.zero.Init)' if sharded else 'weights loaded whole'}")
        if peft is not None:
            models.check_target_modules(peft, model)
            if quant is not None:
                from peft import prepare_model_for_kbit_training

                model = prepare_model_for_kbit_training(model)
        return model

    def peft_config(self, head: str = "causal_lm"):
        """The LoRA config TRL wraps the policy with (``peft_config=``), or None without a ``peft`` section."""
        peft = self.recipe.peft
        if peft is None:
            return None
        from peft import LoraConfig

        return LoraConfig(r=peft.r, lora_alpha=peft.lora_alpha, lora_dropout=peft.lora_dropout,
                          target_modules=peft.target_modules,
                          task_type="SEQ_CLS" if head == "reward" else "CAUSAL_LM")

    def stage(self, name: str, **changes) -> "Run":
        """The same run, writing into ``output_dir/name`` (a pipeline stage or iteration)."""
        sub = replace(self, output_dir=self.output_dir / name, **changes)
        if is_main_process():
            sub.output_dir.mkdir(parents=True, exist_ok=True)
        return sub

    def fit(self, trainer) -> dict:
        """Train ``trainer`` to the end (resuming from this folder's latest complete checkpoint with --resume), save
        the model and tokenizer into ``output_dir`` and return the run summary."""
        out = self.output_dir
        checkpoint = latest_checkpoint(out / "checkpoints") if self.resume else None
        if checkpoint:
            log(f"Resuming from {checkpoint}")
        root = self.loaded.recipe.output_dir
        stage = str(out.relative_to(Path(root).expanduser())) if out != Path(root).expanduser() else None
        for cb in _callbacks(Path(root).expanduser() / "metrics.jsonl", stage):
            trainer.add_callback(cb)
        log(f"Training {self.loaded.spec.name} on {len(trainer.train_dataset)} rows -> {out}")
        start = time.time()
        result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
        wall = time.time() - start
        if getattr(trainer, "is_fsdp_enabled", False):
            placements = getattr(next(trainer.model_wrapped.parameters()), "placements", None)
            log(f"FSDP: parameters sharded over {trainer.args.world_size} processes ({placements})")
        from aligntool.launch import preemption

        if preemption.requested():  # the callback saved a checkpoint at the step end; no final model, no summary
            trainer.accelerator.wait_for_everyone()
            raise preemption.Preempted(trainer.state.global_step, latest_checkpoint(out / "checkpoints"))
        metrics = dict(result.metrics)
        if trainer.eval_dataset is not None:
            metrics.update(trainer.evaluate())
        trainer.save_model(str(out))
        trainer.accelerator.wait_for_everyone()  # the next pipeline stage may load what the main process just wrote
        return {
            "algorithm": self.loaded.spec.name,
            "global_step": trainer.state.global_step,
            "train_time_s": round(wall, 2),
            "train_samples_per_second": metrics.get("train_samples_per_second"),
            "peak_memory_mb": round(peak_memory_mb(), 1),
            "world_size": trainer.args.world_size,
            "resumed_from": str(checkpoint) if checkpoint else None,
            "final_metrics": metrics,
            "last_log": next((h for h in reversed(trainer.state.log_history) if "loss" in h), {}),
        }

    def reference(self):
        """The explicit reference model, or None (TRL then makes a frozen copy of the policy)."""
        ref = self.recipe.ref_model
        d = self.recipe.distributed
        if self.ref_path is None and (ref is None or ref.name_or_path is None):
            if d.backend == "deepspeed" and d.zero_stage == 3 and self.recipe.peft is None:
                # TRL would build the copy inside ZeRO-3's init context, which fails before DeepSpeed's own process
                # group exists; a copy loaded here is sharded by TRL's DeepSpeed preparation instead
                m = self.recipe.model
                return models.load_model(self.model_path, m.dtype, m.trust_remote_code, m.revision)
            return None
        path = self.ref_path or models.resolve(ref.name_or_path, key="ref_model.name_or_path", log=log)
        m = self.recipe.model
        return models.load_model(path, ref.dtype, m.trust_remote_code, key="ref_model.name_or_path")


def train(loaded: LoadedRecipe, resume: bool = False) -> dict:
    """Run the recipe to the end; returns the summary written to summary.json."""
    from aligntool.launch import preemption

    recipe, spec = loaded.recipe, loaded.spec
    out = Path(recipe.output_dir).expanduser()
    preemption.reset()
    preemption.install()
    if is_main_process():
        prepare_output_dir(out)
    module = spec.load()
    pipeline = getattr(module, "pipeline", None)
    if resume and pipeline is None and latest_checkpoint(out / "checkpoints") is None:
        raise UserError(f"--resume: no complete checkpoint under {out / 'checkpoints'}")
    if not resume and is_main_process() and latest_checkpoint(out / "checkpoints"):
        log(f"note: {out} already holds checkpoints; starting over (pass --resume to continue instead)")
    if is_main_process():
        write_atomic(out / "recipe.yaml", yaml.safe_dump(loaded.resolved(), sort_keys=False))
        if not resume:
            (out / "metrics.jsonl").write_text("")

    run = Run(loaded, out, resume=resume)
    run.model_path = models.resolve(recipe.model.name_or_path, log=log)
    if recipe.ref_model is not None and recipe.ref_model.soup:
        from accelerate import PartialState

        soup_dir = out / "soup"
        with PartialState(cpu=not _cuda()).main_process_first():
            if is_main_process():
                models.make_soup(recipe.ref_model.soup, recipe.ref_model.soup_weights, soup_dir, log=log)
                log(f"Reference: soup of {len(recipe.ref_model.soup)} models -> {soup_dir}")
        run.ref_path = str(soup_dir)
        if recipe.ref_model.policy_from_soup:
            run.model_path = str(soup_dir)
    run.tokenizer = models.load_tokenizer(run.model_path, recipe.model.trust_remote_code, recipe.model.revision)
    run.train_dataset, run.eval_dataset = data_mod.load_for_recipe(recipe, spec.data)
    start = time.time()
    if pipeline is not None:  # multi-stage methods (sample -> score -> select -> train, iterations) drive run.fit
        summary = pipeline(run)
    else:
        summary = run.fit(module.build(run))
    summary["wall_time_s"] = round(time.time() - start, 2)
    if is_main_process():
        write_atomic(out / "summary.json", json.dumps(summary, indent=2) + "\n")
        log(f"Done in {summary['wall_time_s']:.1f}s; model, metrics.jsonl and summary.json are in {out}")
    return summary
