"""What the rollout engine reports beyond its training statistics (``Tracking``, a part of
aligntool.online.engine.Engine): the loggers of ``train.report_to`` (accelerate's trackers; TensorBoard always), a
sample of the completions the run drew (completions.jsonl, and a table where the tracker has tables), and the
evaluation on held-out prompts every ``train.eval_steps`` iterations and at the end (docs/TRACKING.md).

Names: metrics.jsonl holds the row as the method gives it (``reward``, ``kl``, ...; evaluation rows ``eval_reward``,
...), as transformers' Trainer writes its own; the trackers get the names transformers' integrations give the
TRL-based methods: ``train/<key>`` and ``eval/<key>`` (TensorBoard, W&B, Trackio, Comet, SwanLab), the row's own
keys for MLflow, ClearML and DVCLive."""

from __future__ import annotations

import math
import os

import torch

RAW_NAME_TRACKERS = ("mlflow", "clearml", "dvclive")  # transformers' callbacks for these log the keys as they are
EVAL_SEED = 1_000_000_007  # the held-out prompts' sampling streams: one per prompt, the same at every evaluation
PROJECT = "aligntool"


def project_defaults(names) -> None:
    """The same W&B project and MLflow experiment for every method: ``WANDB_PROJECT`` and
    ``MLFLOW_EXPERIMENT_NAME`` default to 'aligntool' (a value the user set wins). Both transformers' callbacks (the
    TRL-based methods; W&B's own default there is 'huggingface') and accelerate's trackers (the online methods) read
    these variables."""
    if "wandb" in names:
        os.environ.setdefault("WANDB_PROJECT", PROJECT)
    if "mlflow" in names:
        os.environ.setdefault("MLFLOW_EXPERIMENT_NAME", PROJECT)


def tracker_names(report_to) -> list[str]:
    """The accelerate trackers of a run's (normalised) ``report_to``: all but TensorBoard, which the engine writes
    itself, into tensorboard/ with transformers' tags."""
    return [n for n in (report_to or []) if n not in ("tensorboard", "none", "all")]


def flat_config(d: dict, prefix: str = "") -> dict:
    """A recipe as one level of ``section.key`` -> scalar (lists and None as text), for a tracker's run config."""
    out = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flat_config(value, f"{name}."))
        elif isinstance(value, (bool, int, float, str)):
            out[name] = value
        else:
            out[name] = str(value)
    return out


def rewrite(row: dict) -> dict:
    """transformers' tracker names: ``eval_x`` -> ``eval/x``, anything else -> ``train/x`` (numbers only)."""
    from transformers.integrations.integration_utils import rewrite_logs

    return rewrite_logs({k: v for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})


def mean_stderr(values: list[float]) -> tuple[float, float]:
    """(mean, standard error of the mean: sample std / sqrt(n); 0 for one value)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)


class Tracking:
    """The engine's loggers, completions and evaluation. Reads what the set-up made (aligntool.online.setup):
    ``accelerator``, ``run``, ``args``, ``out``, ``tb``, ``method``, ``scorer``, ``rank`` / ``world``, ``state``."""

    # ------------------------------------------------------------------------------------------------ loggers
    def _start_trackers(self) -> None:
        """accelerate's trackers of ``train.report_to`` (W&B, MLflow, ...) started with the recipe as their config;
        a W&B run folder goes under output_dir (unless WANDB_DIR says where)."""
        if not self.accelerator.log_with:
            return
        name = getattr(self.args, "run_name", None) or self.out.name
        project_defaults([str(n) for n in self.accelerator.log_with])
        init = {"wandb": {"name": name, **({} if os.environ.get("WANDB_DIR") else {"dir": str(self.out)})},
                "mlflow": {"run_name": name}}
        try:
            self.accelerator.init_trackers(os.environ.get("WANDB_PROJECT", PROJECT),
                                           config=flat_config(self.run.loaded.resolved()), init_kwargs=init)
        except Exception as exc:  # noqa: BLE001 - a tracker's own set-up (its server, its store): one line
            from aligntool.errors import UserError, first_line

            names = ", ".join(str(n) for n in self.accelerator.log_with)
            raise UserError(f"train.report_to: {names} could not start: {first_line(exc)[:300]}") from None

    def log(self, row: dict) -> None:
        """One row at the current iteration: metrics.jsonl (``step`` + the row), TensorBoard and the trackers."""
        step = self.state["iteration"]
        if self.accelerator.is_main_process:
            from aligntool.outputs import append_metrics

            append_metrics(self.metrics_file, {"step": step, **row})
            named = rewrite(row)
            for k, v in named.items():
                self.tb.add_scalar(k, v, step)
            for tracker in self.accelerator.trackers:
                raw = {k: v for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
                tracker.log(raw if tracker.name in RAW_NAME_TRACKERS else named, step=step)

    def _end_trackers(self) -> None:
        if self.accelerator.is_main_process and self.tb:
            self.tb.close()
        if self.accelerator.log_with:
            self.accelerator.end_training()

    # -------------------------------------------------------------------------------------------- completions
    def _completions_due(self) -> bool:
        """Whether the iteration about to run writes a sample of its completions (every completions_steps)."""
        t = self.run.recipe.train
        every = t.completions_steps or max(1, self.args.logging_steps or 1)
        return (self.state["iteration"] + 1) % int(every) == 0

    def note_completions(self, rows: list[dict]) -> None:
        """A method's (or ``score``'s) completions of this iteration, one dict per row (prompt, completion, reward;
        for a pair prompt, chosen, rejected, ...): kept when this iteration writes a sample and none is kept yet (the
        first scored rollout of an iteration: ReMax's sampled responses, not its greedy baseline)."""
        if getattr(self, "_completions", ()) is None:
            self._completions = rows

    def _write_completions(self) -> None:
        """The kept completions of all processes (gathered, in process order), the first ``num_completions_to_log``
        to completions.jsonl and to the trackers that have tables."""
        rows, self._completions = self._completions, ()
        if rows == ():
            return
        if self.world > 1:
            from accelerate.utils import gather_object

            rows = gather_object([rows or []])
            rows = [r for part in rows for r in part]
        rows = (rows or [])[: self.run.recipe.train.num_completions_to_log]
        if not self.accelerator.is_main_process or not rows:
            return
        from aligntool.outputs import append_completions

        step = self.state["iteration"]
        append_completions(self.out, step, rows)
        columns = list(dict.fromkeys(k for r in rows for k in r))
        for tracker in self.accelerator.trackers:
            if hasattr(tracker, "log_table"):
                tracker.log_table("completions", columns=["step", *columns],
                                  data=[[step, *[r.get(c) for c in columns]] for r in rows], step=step)

    # ------------------------------------------------------------------------------------------- evaluation
    def _setup_eval(self) -> None:
        """``eval_prompts`` (the eval set's prompts, once each), ``eval_columns`` and ``eval_steps``; without an eval
        set evaluation is off (said when the recipe asks for it, as for the TRL-based methods)."""
        from aligntool.outputs import log

        t, dataset = self.run.recipe.train, self.run.eval_dataset
        self.eval_prompts, self.eval_columns, self.eval_steps = [], {}, None
        if dataset is None:
            if (t.eval_steps or t.eval_strategy not in (None, "no")) and self.accelerator.is_main_process:
                log("note: no eval set (dataset.eval_path, dataset.eval_fraction or dataset.toy.eval_size): "
                    "evaluation during training is off")
            return
        self.eval_prompts, self.eval_columns = self.prompt_keys(dataset)  # rendered as the training prompts
        self.eval_steps = None if t.eval_strategy == "no" else t.eval_steps
        if self.accelerator.is_main_process:
            every = f"every {self.eval_steps} iterations and " if self.eval_steps else ""
            log(f"Online evaluation on {len(self.eval_prompts)} held-out prompts {every}at the end")

    def _eval_scores(self, prompts: list[str], ro) -> tuple[str, list[float]] | None:
        """(metric name, one value per row) of the reward source on the held-out samples: the reward source's score
        (no missing-EOS penalty), or for a method with a preference source of its own (online DPO, XPO) its scores,
        or, with a judge, P(policy sample > the reference's sample) (``win_rate``; None where the reference is
        partitioned, ZeRO-3 / FSDP)."""
        columns = {} if not self.eval_columns else {
            c: [self.eval_columns[p][c] for p in prompts] for c in next(iter(self.eval_columns.values()))}
        if self.scorer is not None:
            from aligntool.online.rollout import scorer_inputs

            scores = [float(x) for x in self.scorer(*scorer_inputs(ro), **columns)]
            if ro.episodes is not None:  # the environment's reward, as in training
                scores = [s + (e.reward or 0.0) for s, e in zip(scores, ro.episodes)]
            return "reward", scores
        prefs = getattr(self.method, "preferences", None)
        if prefs is None:
            return None
        if (scores := prefs.scores(prompts, ro.texts)) is not None:
            return "reward", [float(x) for x in scores]
        if self.zero3 or self.fsdp:
            return None
        seeds = [s + 1 for s in self._eval_seeds]
        ref = self.samples(prompts, ["sample"], from_reference=True, seeds=seeds)[0]
        return "win_rate", [float(p) for p in prefs.probabilities(prompts, ro.texts, ref.texts)]

    @torch.no_grad()
    def evaluate(self) -> dict:
        """One sampled completion per held-out prompt (the recipe's temperature, a fixed seed per prompt), scored by
        the reward source, and its sequence KL to the reference (sum over the response of log pi - log pi_ref, a
        Monte-Carlo estimate of KL(pi || pi_ref) per sequence). Each process takes its share of the prompts (all the
        same size: the last prompt repeated, dropped again), the values gathered -> ``eval_*`` row, logged."""
        n, per = len(self.eval_prompts), -(-len(self.eval_prompts) // self.world)
        mine = list(range(self.rank * per, min(n, (self.rank + 1) * per)))
        rows = mine + [mine[-1] if mine else n - 1] * (per - len(mine))
        seeds = [EVAL_SEED + (self.args.seed or 0) * 1_000_003 + 2 * i for i in rows]
        size = self.args.per_device_eval_batch_size or per  # chunks bound the memory; every rank runs as many
        kl, scores, lengths, name = [], [], [], None
        for start in range(0, per, size):
            prompts = [self.eval_prompts[i] for i in rows[start:start + size]]
            self._eval_seeds = seeds[start:start + size]
            ro = self.samples(prompts, ["sample"], seeds=self._eval_seeds)[0]
            logp, _ = self.policy_logprobs(ro)
            kl += ((logp - self.ref_logprobs(ro)) * ro.mask).sum(-1).tolist()
            lengths += ro.mask.sum(-1).tolist()
            scored = self._eval_scores(prompts, ro)
            name, scores = (scored[0], scores + scored[1]) if scored else (None, scores)
        values = [(i, kl[j], scores[j] if name else None, int(lengths[j])) for j, i in enumerate(rows[: len(mine)])]
        if self.world > 1:
            from accelerate.utils import gather_object

            values = gather_object(values)
        values = sorted(dict((v[0], v) for v in values).values())
        out = {"eval_num_prompts": len(values)}
        if name:
            out[f"eval_{name}"], out[f"eval_{name}_stderr"] = mean_stderr([v[2] for v in values])
        out["eval_kl"], out["eval_kl_stderr"] = mean_stderr([v[1] for v in values])
        out["eval_completions/mean_length"] = sum(v[3] for v in values) / len(values)
        self._last_eval = self.state["iteration"]
        self.log(out)
        return out
