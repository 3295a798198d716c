"""`aligntool train`: recipe -> registry -> models + data -> TRL trainer -> outputs.

Everything a run makes goes under ``output_dir`` (see aligntool/outputs.py for the files and their rules):
recipe.yaml, metrics.jsonl, summary.json, tensorboard/, checkpoints/ (only those marked COMPLETE, and whose files read
back, are resumed from), and the final model.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path

from aligntool import data as data_mod
from aligntool import models
from aligntool.errors import UserError, first_line
from aligntool.outputs import (
    check_model_saved,
    checkpoint_step,
    is_main_process,
    latest_checkpoint,
    log,
    prepare_output_dir,
    start_metrics,
    summary,
    write_recipe,
    write_run_file,
    write_summary,
)
from aligntool.recipe.loader import LoadedRecipe
from aligntool.train_callbacks import completions_callback, new_learning_rate_callback, run_callbacks
from aligntool.train_checks import (
    check_positions,
    check_train_settings,
    installed_loggers,
    note_steps_and_epochs,
    report_to_list,
)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _bf16_supported() -> bool:
    import torch

    return _cuda() and torch.cuda.is_bf16_supported()


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
    setup: object = None  # aligntool.launch.distributed.Setup, made once by train()
    _eval_off_logged: bool = False

    @property
    def recipe(self):
        return self.loaded.recipe

    @property
    def algo(self):
        return self.loaded.algo

    def trl_config(self, **overrides):
        """The algorithm's TRL config from ``train.*`` + the declared ``algo.*`` fields + the backend's keywords of
        the run's set-up; checkpoints go to output_dir/checkpoints. Builds a config only: no process state."""
        from aligntool.launch.distributed import trainer_kwargs

        cls = self.loaded.spec.trl_config_class()
        kwargs = self.recipe.trl_kwargs(self.algo)
        kwargs["output_dir"] = str(self.output_dir / "checkpoints")
        backend = self.setup.trainer_kwargs if self.setup else trainer_kwargs(self.recipe, self.output_dir)
        for key, value in backend.items():  # the recipe's own accelerator_config keys are kept
            kwargs[key] = {**(kwargs.get(key) or {}), **value} if key == "accelerator_config" else value
        # where the trainer built next logs
        os.environ["TENSORBOARD_LOGGING_DIR"] = str(self.output_dir / "tensorboard")
        # a NaN loss must show (StopOnNonFinite), not be averaged away
        kwargs.setdefault("logging_nan_inf_filter", False)
        if not _cuda() and "gradient_checkpointing" in cls.__dataclass_fields__:
            # TRL turns activation recomputation on by default, for large models on GPUs; on a CPU it costs time
            # (a DPO step of the tiny model: 1.33x) and saves little: off unless train.gradient_checkpointing asks
            kwargs.setdefault("gradient_checkpointing", False)
            # and DDP keeps expecting every parameter in the graph, as it did with recomputation on (SPO's pair and
            # degree-head passes would otherwise mark a weight ready twice)
            kwargs.setdefault("ddp_find_unused_parameters", False)
        kwargs.update(overrides)
        if "chat_template_kwargs" not in cls.__dataclass_fields__:  # the engine's own key (aligntool.online.setup)
            kwargs.pop("chat_template_kwargs", None)
        if kwargs.get("eval_strategy", "no") != "no" and self.eval_dataset is None:
            # the recipe evaluates, but this run (the user's own data, or a pipeline stage) has no eval set
            if not self._eval_off_logged:
                log(f"note: no eval set (dataset.eval_path, dataset.eval_fraction or dataset.toy.eval_size): "
                    f"train.eval_strategy {kwargs['eval_strategy']!r} is switched off")
                self._eval_off_logged = True
            kwargs["eval_strategy"] = "no"
            kwargs.pop("eval_on_start", None)
            kwargs.pop("load_best_model_at_end", None)
        kwargs["report_to"] = installed_loggers(report_to_list(kwargs.get("report_to")),
                                                online=self.loaded.spec.kind == "online")
        from aligntool.online.tracking import project_defaults

        project_defaults(kwargs["report_to"])
        if _cuda() and not _bf16_supported() and kwargs.get("bf16"):
            raise UserError(f"{self.loaded.source}: train.bf16: this GPU has no bf16 support")
        if not _cuda() and kwargs.get("bf16"):
            # an explicit train.bf16=true on a CPU is honoured (torch's CPU autocast): slow, but a GPU run's memory;
            # transformers only accepts it when told this is a CPU run
            kwargs["use_cpu"] = True
        elif not _bf16_supported():
            # TRL turns bf16 on by default; where the hardware lacks it, say fp32 rather than fail
            kwargs["bf16"] = False
        try:
            return cls(**kwargs)
        except (ValueError, TypeError) as exc:
            raise UserError(f"{self.loaded.source}: train/algo: {first_line(exc)}") from None

    def policy(self, head: str = "causal_lm"):
        m, peft = self.recipe.model, self.recipe.peft
        quant = None
        if peft is not None and peft.load_in_4bit:
            quant = models.four_bit_config(peft)
        d = self.recipe.distributed
        if (d.backend == "deepspeed" and d.zero_stage == 3 and quant is None
                and int(os.environ.get("WORLD_SIZE", "1")) > 1):
            # while a TrainingArguments with the ZeRO-3 config is alive, transformers builds the model inside
            # deepspeed.zero.Init: each rank only ever holds its shard of the weights, never the whole model
            self._zero3_args = self.trl_config()
        # weights the checkpoint lacks (a reward model's score head) are drawn now, before the Trainer seeds: seed here
        # too, so that a recipe gives the same model run after run
        from transformers import TrainingArguments, set_seed

        seed = self.recipe.train.seed
        set_seed(TrainingArguments.__dataclass_fields__["seed"].default if seed is None else seed)
        model = models.load_model(self.model_path, **models.options(m, revision=True), head=head,
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
        callbacks, divergence = run_callbacks(Path(root).expanduser() / "metrics.jsonl", stage)
        if checkpoint:
            callbacks.append(new_learning_rate_callback())
        t = self.recipe.train
        sampled = completions_callback(trainer, Path(root).expanduser(), stage,
                                       t.completions_steps or max(1, int(trainer.args.logging_steps)),
                                       t.num_completions_to_log)
        callbacks += [sampled] if sampled else []
        for cb in callbacks:
            trainer.add_callback(cb)
        self._check_rows_left(trainer)
        from aligntool.optim import optimizer_cls_and_kwargs

        # train.optim: lion_kappa | cosmos: our optimizer, which Trainer.create_optimizer builds on its param groups
        ours = optimizer_cls_and_kwargs(self.recipe, trainer.args, trainer.model, where=str(self.loaded.source))
        if ours is not None and trainer.optimizer is None:
            trainer.optimizer_cls_and_kwargs = ours
        rows = len(trainer.train_dataset) if hasattr(trainer.train_dataset, "__len__") else "streamed"
        log(f"Training {self.loaded.spec.name} on {rows} rows -> {out}")
        start = time.time()
        try:
            result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
        except UserError as exc:  # e.g. a reward function failing mid-run (GRPO / RLOO): where to resume from
            for cb in trainer.callback_handler.callbacks:  # the Trainer's progress bar ends before the message
                if getattr(cb, "training_bar", None) is not None:
                    cb.training_bar.close()
                    cb.training_bar = None
            last = latest_checkpoint(out / "checkpoints", log=lambda m: None)
            raise UserError(f"{exc} at step {trainer.state.global_step + 1}; last checkpoint kept: "
                            f"{last or 'none'}") from None
        wall = time.time() - start
        if getattr(trainer, "is_fsdp_enabled", False):
            placements = getattr(next(trainer.model_wrapped.parameters()), "placements", None)
            log(f"FSDP: parameters sharded over {trainer.args.world_size} processes ({placements})")
        from aligntool.launch import preemption

        if divergence.stop():  # collective: every rank raises, none waits for the others at a barrier
            raise divergence.error
        if preemption.requested():  # the callback saved a checkpoint at the step end; no final model, no summary
            trainer.accelerator.wait_for_everyone()
            raise preemption.Preempted(trainer.state.global_step, latest_checkpoint(out / "checkpoints"))
        metrics = dict(result.metrics)
        if trainer.eval_dataset is not None:
            metrics.update(trainer.evaluate())
        trainer.save_model(str(out))
        trainer.accelerator.wait_for_everyone()  # the next pipeline stage may load what the main process just wrote
        steps = trainer.state.global_step - (checkpoint_step(checkpoint) if checkpoint else 0)
        samples = steps * trainer.args.per_device_train_batch_size * trainer.args.gradient_accumulation_steps \
            * trainer.args.world_size
        return summary(self.loaded.spec.name, self.loaded.spec.kind, trainer.state.global_step, wall, samples,
                       trainer.args.world_size, metrics, checkpoint,
                       last_log=next((h for h in reversed(trainer.state.log_history) if "loss" in h), {}))

    def _check_rows_left(self, trainer) -> None:
        """TRL drops rows that truncation leaves without a token in the loss (a completion's, or with SFT's
        assistant-only loss an assistant turn's): say how many, and stop if none is left."""
        args = trainer.args
        packing = getattr(args, "packing", False)
        # packed rows are fewer than the rows given, none dropped (TRL packs the eval set as the training set unless
        # eval_packing says otherwise)
        packed = {"training": packing, "eval": packing if getattr(args, "eval_packing", None) is None
                  else args.eval_packing}
        max_length = getattr(trainer.args, "max_length", None)
        what = "assistant" if getattr(trainer.args, "assistant_only_loss", False) else "completion"
        why = f"no {what} token left within train.max_length={max_length}" if max_length else "TRL's filtering"
        for name, given, kept in (("training", self.train_dataset, trainer.train_dataset),
                                  ("eval", self.eval_dataset, trainer.eval_dataset)):
            if given is None or kept is None or not hasattr(kept, "__len__") or len(kept) == len(given) \
                    or packed[name]:  # a streamed training set (dataset.streaming) has no length
                continue
            if len(kept) == 0:
                raise UserError(f"{self.loaded.source}: train.max_length: all {len(given)} {name} rows were dropped "
                                f"({why}); raise train.max_length or shorten the "
                                f"{'conversations' if what == 'assistant' else 'prompts'}")
            log(f"note: {len(given) - len(kept)} of {len(given)} {name} rows were dropped ({why})")

    def reference(self):
        """The explicit reference model, or None (TRL then makes a frozen copy of the policy)."""
        ref = self.recipe.ref_model
        d = self.recipe.distributed
        if self.ref_path is None and (ref is None or ref.name_or_path is None):
            if d.backend == "deepspeed" and d.zero_stage == 3 and self.recipe.peft is None:
                # TRL would build the copy inside ZeRO-3's init context, which fails before DeepSpeed's own process
                # group exists; a copy loaded here is sharded by TRL's DeepSpeed preparation instead
                m = self.recipe.model
                return models.load_model(self.model_path, **models.options(m, revision=True))
            return None
        path = self.ref_path or models.resolve(ref.name_or_path, key="ref_model.name_or_path", log=log)
        m = self.recipe.model
        return models.load_model(path, **{**models.options(m), "dtype": ref.dtype}, key="ref_model.name_or_path")


def train(loaded: LoadedRecipe, resume: bool = False, overwrite: bool = False, accept_changes: bool = False) -> dict:
    """Run the recipe to the end; returns the summary written to summary.json. A folder holding a previous run is
    refused unless ``resume`` (continue it) or ``overwrite`` (replace it); a folder another run is writing to is
    refused always. ``resume`` compares the recipe with the one the run started with (aligntool/resume.py): changes
    that shape the training are refused unless ``accept_changes``, and a finished run is not trained again (its
    summary is returned)."""
    import contextlib

    from aligntool.outputs import RunLock, check_previous_run, clear_previous_run
    from aligntool.resume import check_flags

    check_flags(resume, overwrite)
    from aligntool.launch.distributed import adopt_launcher

    # an `accelerate launch` backend becomes the recipe's before anything compares or writes it (--resume compares
    # the recipe with the run's recipe.yaml, which records the adopted backend)
    if note := adopt_launcher(loaded.recipe):
        log(note)
    out = Path(loaded.recipe.output_dir).expanduser()
    source = Path(loaded.recipe.model.name_or_path).expanduser()
    if source.is_dir() and out.exists() and source.resolve() == out.resolve():
        raise UserError(f"output_dir: {out} is the model this run starts from (model.name_or_path); a run writes its "
                        "own folder: choose another output_dir")
    if is_main_process():
        prepare_output_dir(out)
    with RunLock(out) if is_main_process() else contextlib.nullcontext():
        if is_main_process():
            previous = check_previous_run(out, resume, overwrite)
            if previous and overwrite:
                log(f"note: --overwrite: replacing {previous} in {out}")
                clear_previous_run(out)
        if resume and _finished(loaded, out, accept_changes):  # every rank decides alike, from the same files
            return json.loads((out / "summary.json").read_text())
        return _train(loaded, out, resume)


def _finished(loaded: LoadedRecipe, out: Path, accept_changes: bool) -> bool:
    """``--resume``: the recipe checked against the run's own (a UserError for unaccepted changes); True when the run
    is finished and nothing is to be trained."""
    from aligntool.resume import check_resume

    return check_resume(out, loaded.resolved(), int(os.environ.get("WORLD_SIZE", "1")), accept_changes, log)


def _train(loaded: LoadedRecipe, out: Path, resume: bool) -> dict:
    from aligntool.launch import preemption
    from aligntool.resume import auto_keys

    spec = loaded.spec
    module = spec.load()
    if resume and spec.kind == "trl" and latest_checkpoint(out / "checkpoints") is None:
        raise UserError(f"--resume: no complete checkpoint under {out / 'checkpoints'}")

    auto = auto_keys(loaded.resolved())  # before Step Law fills them in: recipe.yaml holds the values it chose
    run = prepare(loaded, out, resume)
    if is_main_process():  # written once the inputs are known to be good (and, on --resume, the recipe checked)
        write_recipe(out, loaded.resolved())
        write_run_file(out, int(os.environ.get("WORLD_SIZE", "1")), auto)
        if not resume:
            start_metrics(out)
    # SIGUSR1/SIGTERM from here on mean "checkpoint at the step end and stop"; before, they stop the process at once
    preemption.reset()
    preemption.install()
    start = time.time()
    if spec.kind == "trl":  # a Trainer, fitted here
        result = run.fit(module.build(run))
    elif spec.kind == "pipeline":  # stages (sample -> score -> select -> train, iterations) that drive run.fit
        result = module.pipeline(run)
    else:  # an online method on the rollout engine
        from aligntool.online.engine import Engine

        result = Engine(run, module.method(run)).train()
    result["wall_time_s"] = round(time.time() - start, 2)
    from aligntool.launch.distributed import backend_used

    result["distributed"] = backend_used(loaded.recipe)
    if is_main_process():
        # "Done" only for a model that loads: e.g. ZeRO-3 without gathered weights writes only DeepSpeed's shards
        check_model_saved(out, f" ({result['distributed']['described']})")
        write_summary(out, result)
        log(f"Done in {result['wall_time_s']:.1f}s; model, metrics.jsonl and summary.json are in {out}")
    return result


def prepare(loaded: LoadedRecipe, out: Path, resume: bool = False) -> Run:
    """Everything a run needs before its trainer is built, done once: the distributed set-up, the model path (a
    soup first), the tokenizer and the checked datasets."""
    from aligntool import rewards
    from aligntool.launch.distributed import setup

    recipe, spec = loaded.recipe, loaded.spec
    check_train_settings(loaded)
    rewards.check_functions(recipe.reward)  # a reward function that cannot be imported fails before any model loads
    run = Run(loaded, out, resume=resume, setup=setup(recipe, out))
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
    if models.is_adapter(run.model_path):
        run.model_path = _merged_base(loaded, run.model_path, out)
    run.tokenizer = models.load_tokenizer(run.model_path, recipe.model.trust_remote_code, recipe.model.revision,
                                          chat_template=recipe.model.chat_template, base_dir=loaded.base_dir, log=log)
    check_positions(run)
    # conversational prompts stay messages where the trainer applies the chat template itself (TRL's GRPO / RLOO,
    # the engine's methods that run multi-turn episodes)
    keep_conversations = spec.vllm == "trl" or spec.agent == "engine"
    run.train_dataset, run.eval_dataset = data_mod.load_for_recipe(recipe, spec.data, run.tokenizer, log=log,
                                                                   base_dir=loaded.base_dir, output_dir=out,
                                                                   keep_conversations=keep_conversations)
    _step_law(run)
    note_steps_and_epochs(run)
    return run


MERGED_BASE = "merged_base"



def _merged_base(loaded: LoadedRecipe, adapter: str, out: Path) -> str:
    """A run started from a LoRA adapter folder (``model.name_or_path`` a peft run's output): the policy is the
    adapter's base with that adapter merged. That model is written to ``output_dir/merged_base`` (a plain model
    folder with the tokenizer) and the run starts from there, because two things read the policy's folder again:
    a new LoRA adapter names it as its ``base_model_name_or_path`` (eval, bon, merge-lora and the next stage load the
    adapter on it: on the first base they would drop the earlier stage), and TRL's trainers build the frozen
    reference of full fine-tuning from the policy's ``name_or_path`` (the first base otherwise, not the SFT model)."""
    from accelerate import PartialState

    from aligntool.outputs import atomic_path, write_merged_from
    from aligntool.rewards import is_reward_model

    head = "reward" if is_reward_model(adapter) else "causal_lm"  # a reward model's adapter stays one
    if head == "reward" and loaded.spec.name != "reward":
        raise UserError(f"model.name_or_path: {adapter} is a LoRA adapter of a reward model (task_type SEQ_CLS); "
                        f"{loaded.spec.name} needs a causal language model")
    target = (out / MERGED_BASE).expanduser().resolve()
    with PartialState(cpu=not _cuda()).main_process_first():
        if is_main_process():
            m = loaded.recipe.model
            tokenizer = models.load_tokenizer(adapter, m.trust_remote_code)
            merged = models.load_model(adapter, **models.options(m), head=head, pad_token_id=tokenizer.pad_token_id)
            with atomic_path(target) as tmp:
                merged.save_pretrained(tmp, safe_serialization=True)
                tokenizer.save_pretrained(tmp)
                write_merged_from(tmp, adapter)
            log(f"note: model.name_or_path {adapter} is a LoRA adapter: its base with the adapter merged is written to "
                f"{target}, and the run starts from it")
    return str(target)


def _step_law(run: Run) -> None:
    """``train.learning_rate: auto`` / ``per_device_train_batch_size: auto``: Step Law's values, logged and written
    into the recipe (so recipe.yaml holds what the run used)."""
    from aligntool.recipe import steplaw

    world = int(os.environ.get("WORLD_SIZE", "1"))
    found = steplaw.for_run(run.loaded, run.model_path, run.tokenizer, run.train_dataset, world)
    if found is None:
        return
    suggestion, values = found
    for key, value in values.items():
        setattr(run.recipe.train, key, value)
    log(f"Step Law ({run.recipe.train.step_law_constants} constants): N = {suggestion.params:,} non-embedding "
        f"parameters, D = {suggestion.tokens:,.0f} training tokens ({suggestion.seq_len:.1f} per row) -> "
        + ", ".join(f"train.{k} = {v}" for k, v in values.items())
        + f" (batch {suggestion.batch_tokens:,.0f} tokens); {steplaw.EXTRAPOLATION_NOTE}")
