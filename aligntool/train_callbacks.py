"""The Trainer callbacks of a run (``Run.fit``): metrics.jsonl rows, a stop on a non-finite loss or gradient norm, the
COMPLETE marker of each checkpoint (``outputs.mark_complete``), the preemption checkpoint, on a resume the recipe's
learning rate as the schedule's peak, and for the trainers that sample (GRPO, RLOO) a sample of their completions in
completions.jsonl."""

from __future__ import annotations

from pathlib import Path

from aligntool.errors import UserError
from aligntool.outputs import append_completions, append_metrics, latest_checkpoint, log, mark_complete


def _non_finite(logs: dict) -> str | None:
    import math

    for key in ("loss", "grad_norm", "eval_loss"):
        value = logs.get(key)
        if isinstance(value, (int, float)) and not math.isfinite(value):
            return f"{key} {value}"
    return None


def _finite_weights(model) -> bool:
    import torch

    return all(bool(torch.isfinite(p).all()) for p in model.parameters() if p.numel())


def run_callbacks(metrics_file: Path, stage: str | None):
    from transformers import TrainerCallback

    class MetricsJsonl(TrainerCallback):
        """Appends every logged dict, with its step, epoch (and pipeline stage), to the run's metrics.jsonl."""

        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.is_world_process_zero and logs:
                append_metrics(metrics_file, {"step": state.global_step, "epoch": state.epoch,
                                              **({"stage": stage} if stage else {}), **logs})

    def diverged(args, state, what: str) -> None:
        """Recorded on the main process; StopOnNonFinite stops every rank at the next step end (the Trainer then
        closes its progress bar) and Run.fit reports the error."""
        if divergence.error is None:
            last = latest_checkpoint(Path(args.output_dir), log=lambda m: None)
            divergence.error = UserError(f"training diverged: {what} at step {state.global_step}; last good "
                                         f"checkpoint: {last or 'none'} (lower train.learning_rate, or check the data)")

    class StopOnNonFinite(TrainerCallback):
        """A NaN/inf loss or gradient norm stops the run with the step and the last good checkpoint (the Trainer
        itself would train on and say "Done"; aligntool also turns off its NaN filter of the logged loss). The main
        process judges what it logs; the decision is shared at each step end so that all ranks stop together."""

        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.is_world_process_zero and logs and (what := _non_finite(logs)):
                diverged(args, state, what)

        def on_step_end(self, args, state, control, **kwargs):
            if divergence.stop():
                control.should_training_stop, control.should_save = True, False

    class MarkComplete(TrainerCallback):
        """Trainer writes trainer_state.json last; on_save runs after it, so the marker means 'fully written'. A
        checkpoint whose weights are not finite is never marked (and the run stops)."""

        def on_save(self, args, state, control, model=None, **kwargs):
            if state.is_world_process_zero:
                ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
                if model is not None and not _finite_weights(model):
                    diverged(args, state, "non-finite weights")
                elif ckpt.is_dir():
                    mark_complete(ckpt, state.global_step)

    from aligntool.launch import preemption

    divergence = Divergence()
    return [MetricsJsonl(), StopOnNonFinite(), MarkComplete(), preemption.callback()], divergence


def new_learning_rate_callback():
    """On a resume: the recipe's learning rate as the schedule's peak (``--accept-changes`` may have changed it; the
    Trainer restored the checkpoint's optimizer and scheduler just before ``on_train_begin``)."""
    from transformers import TrainerCallback

    from aligntool.resume import apply_learning_rate

    class NewLearningRate(TrainerCallback):
        def on_train_begin(self, args, state, control, optimizer=None, lr_scheduler=None, **kwargs):
            if optimizer is not None and lr_scheduler is not None:
                apply_learning_rate(optimizer, lr_scheduler, args.learning_rate, log)

    return NewLearningRate()


def _number(x):
    import math

    x = float(x)
    return x if math.isfinite(x) else None


def completion_rows(logs: dict, weights: list[float], count: int) -> list[dict]:
    """The first ``count`` rows of a TRL GRPO / RLOO trainer's ``_logs`` (its last generation batch, all processes'
    rows, kept for its own ``log_completions``): prompt, completion, reward (the weighted sum of the reward functions'
    values, unscorable ones left out, as the trainer sums them), each function's value when there are several, and
    the advantage."""
    prompts, completions = list(logs.get("prompt", ()))[:count], list(logs.get("completion", ()))[:count]
    per_function = {name: list(values)[:count] for name, values in logs.get("rewards", {}).items()}
    advantages = list(logs.get("advantages", ()))[:count]
    rows = []
    for i, (prompt, completion) in enumerate(zip(prompts, completions)):
        values = {name: _number(v[i]) for name, v in per_function.items() if i < len(v)}
        terms = [w * v for w, v in zip(weights, values.values()) if v is not None]
        row = {"prompt": prompt, "completion": completion, "reward": sum(terms) if terms else None}
        if len(values) > 1:
            row["rewards"] = values
        if i < len(advantages):
            row["advantage"] = _number(advantages[i])
        rows.append(row)
    return rows


def completions_callback(trainer, out: Path, stage: str | None, every: int, count: int):
    """For a trainer that keeps its completions (TRL's GRPO / RLOO: ``_logs``), or None: every ``every`` steps the
    first ``count`` of its last generation batch appended to ``out/completions.jsonl`` (main process)."""
    if not isinstance(getattr(trainer, "_logs", None), dict):
        return None
    from transformers import TrainerCallback

    class Completions(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.is_world_process_zero and state.global_step % every == 0:
                weights = getattr(trainer, "reward_weights", None)
                weights = [float(w) for w in weights] if weights is not None else []
                rows = completion_rows(trainer._logs, weights, count)
                append_completions(out, state.global_step, rows, stage)
                if rows and "wandb" in (args.report_to or []) and not getattr(args, "log_completions", False):
                    wandb_table(state.global_step, rows)  # TRL's log_completions logs its own table instead

    return Completions()


def wandb_table(step: int, rows: list[dict]) -> None:
    """The completions as a W&B table ``completions`` (step, prompt, completion, reward, advantage), attached to the
    run's next logged row, as the online methods log theirs."""
    import json

    import wandb

    if wandb.run is None:
        return
    def as_text(value) -> str:  # a conversational prompt or completion (a list of messages) as its JSON
        return value if isinstance(value, str) else json.dumps(value)

    columns = ["step", "prompt", "completion", "reward", "advantage"]
    data = [[step, as_text(r["prompt"]), as_text(r["completion"]), r["reward"], r.get("advantage")] for r in rows]
    wandb.log({"completions": wandb.Table(columns=columns, data=data)}, commit=False)


class Divergence:
    """Set by the non-finite checks on the main process during training; ``stop()`` shares it with every rank."""

    error: UserError | None = None

    def stop(self) -> bool:
        """True on every rank once the main process recorded an error (collective: all ranks call it together)."""
        from aligntool.launch.preemption import any_rank

        if any_rank(self.error is not None) and self.error is None:
            self.error = UserError("training diverged (see the main process's message)")
        return self.error is not None
