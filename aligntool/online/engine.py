"""The rollout engine shared by every online method (the registry's entries of kind online): its loop.

One loop, built on transformers (``generate`` with the KV cache, models, schedulers), accelerate (devices, DDP,
DeepSpeed ZeRO-2/3, FSDP2, gradient sync, sharded checkpoints), TRL (generation under ZeRO-3, the sharded reference,
vLLM: aligntool.online.vllm_backend): each iteration draws one global batch of prompts, gives each process its
``per_device_train_batch_size`` slice, lets the method roll out and update (``method.step(engine, prompts)``), logs,
and checkpoints. Every sampled row has its own seeded random stream and the losses' token means run over the global
batch, so the number of processes does not change the math. What a method must provide is written down once:
aligntool.online.contract.OnlineMethod. The engine is one class in four parts:

- aligntool.online.setup (``EngineSetup``): the accelerator, policy, value head or critic, reference, optimizer,
  scheduler, reward source and prompts, in named set-up steps;
- aligntool.online.rollout (``RolloutSteps``, ``Rollout``): sampling (transformers or vLLM) and measuring;
- aligntool.online.checkpoint (``Checkpoints``): save and load;
- aligntool.online.tracking (``Tracking``): the loggers (``log``), completions.jsonl and the online evaluation;
- this module: the loop (``train``, iterations, the prompt draw, logging), the collectives and the optimizer step.

The steps a method composes, each returning new values (a ``Rollout`` is never changed in place; ``ro.with_(...)``
makes the next one):

- ``sample(prompts, from_reference=False, greedy=False)``: one response per prompt, trimmed after EOS -> ``Rollout``
  with token tensors, texts and missing-EOS flags; ``samples(prompts, kinds)``: one per prompt and kind ("sample",
  "greedy") in one call; ``sample_groups(prompts, n)``: group sampling, n responses per prompt, grouped per prompt;
- ``score(ro)``: the recipe's reward source on the texts, minus ``missing_eos_penalty`` where EOS is missing;
- ``policy_logprobs(ro, grad=False)``: per-token log-probs (and values, with a value head) under the current policy;
  ``grad=True`` is the forward of an update;
- ``ref_logprobs(ro)``: per-token log-probs under the reference;
- ``rollout(prompts, per_prompt=1)``: all four (PPO; P3O with 2 per prompt);
- ``optimizer_step(loss)``: backward, gradient clipping, optimizer and scheduler step;
- ``all_sum`` / ``global_mean`` / ``token_denominator``: sums and means over the global batch;
- ``rollout_stats(ro)``, ``state`` (``iteration``, ``kl_coef``), ``cfg`` (the recipe's ``algo``), ``log(row)``;
- ``note_completions(rows)``: a method's own sample of completions (online DPO's pairs; ``score`` notes the rest).

Small tensor helpers of the methods (``check_finite``, ``sequence_kl``, ``minibatches``): aligntool.online.ops.
"""

from __future__ import annotations

import random
import time

import torch

from aligntool.errors import UserError
from aligntool.online.checkpoint import Checkpoints
from aligntool.online.contract import check_method
from aligntool.online.rollout import RolloutSteps
from aligntool.online.setup import EngineSetup
from aligntool.online.tracking import Tracking
from aligntool.recipe.base import DEFAULT_ITERATIONS

SEED_STRIDE = 7919  # a prime: the prompt streams of seeds s and s + 1 never coincide
# the methods' statistics logged under the name TRL's GRPOTrainer gives the same quantity (docs/TRACKING.md)
TRL_NAMES = {"clipfrac": "clip_ratio/region_mean"}


class Engine(EngineSetup, RolloutSteps, Checkpoints, Tracking):
    """The rollout engine for one run and one online method (an aligntool.online.contract.OnlineMethod, checked here
    first: a method that does not meet the contract is refused before any model loads). ``Engine(run, method)``
    sets everything up (``EngineSetup.setup``); ``train()`` runs the iterations and returns the summary."""

    def __init__(self, run, method):
        self.run, self.cfg = run, run.algo
        self.method = check_method(method, run.loaded.spec.name)
        self.asynchronous = self._tis_stats = None
        if run.recipe.generation.asynchronous:  # one step off-policy (aligntool.online.asynchronous)
            from aligntool.online import asynchronous

            asynchronous.check(run)
        self.setup()
        if run.recipe.generation.asynchronous:
            self.asynchronous = asynchronous.AsyncRollouts(self)

    def _setup_iterations(self) -> None:
        """``iterations``: train.max_steps, or DEFAULT_ITERATIONS (said) when it is not set."""
        if self.args.max_steps > 0:
            self.iterations = self.args.max_steps
        else:
            from aligntool.outputs import log

            self.iterations = DEFAULT_ITERATIONS
            log(f"note: train.max_steps (the number of iterations) is not set: {DEFAULT_ITERATIONS} iterations")

    # --------------------------------------------------------------------------------------------- collectives
    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        """The sum of ``t`` over all processes (``t`` itself in a single process)."""
        return self.accelerator.reduce(t.detach().clone(), "sum") if self.world > 1 else t

    def global_mean(self, t: torch.Tensor) -> float:
        """The mean of a per-row tensor over the global batch (all processes' rows)."""
        total = self.all_sum(torch.stack([t.detach().float().sum(), torch.tensor(float(t.numel()), device=t.device)]))
        return (total[0] / total[1]).item()

    def token_denominator(self, mask: torch.Tensor) -> torch.Tensor:
        """The token count for a loss's per-process mean, so that the processes' average gradient is that of the
        global batch's token mean (aligntool.losses.online.token_denominator)."""
        from aligntool.losses.online import token_denominator

        return token_denominator(mask, self.all_sum, self.world)

    # ------------------------------------------------------------------------------------------------- update
    def optimizer_step(self, loss: torch.Tensor) -> float:
        """backward, gradient clipping, optimizer and scheduler step -> the gradient norm before clipping (nan where
        the backend does not say). A non-finite loss raises FloatingPointError (the run stops: "diverged")."""
        if not torch.isfinite(loss):
            raise FloatingPointError("loss")
        if getattr(self, "asynchronous", None):  # the next iteration's rollout, sampled by the weights before this step
            self.asynchronous.launch()
        self.model.train()
        self.accelerator.backward(loss)  # under DeepSpeed this also steps (and clips: deepspeed.json)
        norm = self.accelerator.clip_grad_norm_(self.model.parameters(), self.args.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.updates += 1
        return float(norm) if norm is not None else float("nan")

    # --------------------------------------------------------------------------------------------------- loop
    def batch_prompts(self) -> list[str]:
        """This process's slice of the iteration's global batch: ``per_device_train_batch_size`` x processes prompts
        drawn without replacement (the prompt list cycled when shorter) from a stream seeded by (train.seed,
        iteration). One process with batch 8 trains on the prompts two processes with batch 4 share, and a resumed
        run draws what the uninterrupted one drew."""
        rng = random.Random(self.args.seed * SEED_STRIDE + self.state["iteration"])
        need, drawn = self.batch_size * self.world, []
        while len(drawn) < need:
            drawn += rng.sample(self.prompts, len(self.prompts))
        return drawn[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]

    def _iteration(self) -> dict:
        from aligntool.outputs import latest_checkpoint

        prompts = self._batch_prompts = self.batch_prompts()
        self._calls, self._tis_stats = 0, None
        self._completions = None if self._completions_due() else ()  # None: note this iteration's completions
        try:
            stats = self.method.step(self, prompts)
        except FloatingPointError:
            ckpt = latest_checkpoint(self._checkpoint_dir())
            raise UserError(f"training diverged (non-finite loss) at iteration {self.state['iteration'] + 1}; "
                            f"last checkpoint kept: {ckpt or 'none'}") from None
        except UserError as exc:  # a reward function failing mid-run: say where the run can resume from
            ckpt = latest_checkpoint(self._checkpoint_dir(), log=lambda m: None)
            raise UserError(f"{exc} at iteration {self.state['iteration'] + 1}; last checkpoint kept: "
                            f"{ckpt or 'none'}") from None
        self.state["iteration"] += 1
        stats = {TRL_NAMES.get(k, k): float(v) for k, v in {**stats, **(self._tis_stats or {})}.items()}
        if self.world > 1:  # log the mean over all processes' prompts, not rank 0's alone
            keys = sorted(stats)
            mean = self.accelerator.reduce(torch.tensor([stats[k] for k in keys], device=self.accelerator.device),
                                           "mean")
            stats = dict(zip(keys, mean.tolist()))
        stats["kl_coef"] = self.state["kl_coef"]
        stats["learning_rate"] = self.scheduler.get_last_lr()[0]
        if self.state["iteration"] % max(1, self.args.logging_steps) == 0 or self.state["iteration"] == 1:
            self.log(stats)
        self._write_completions()
        if self.eval_steps and self.state["iteration"] % self.eval_steps == 0:
            self.evaluate()
        if self.args.save_steps and self.state["iteration"] % int(self.args.save_steps) == 0:
            self.save_checkpoint()
        return stats

    def train(self) -> dict:
        from tqdm.auto import tqdm

        from aligntool.launch import preemption
        from aligntool.outputs import latest_checkpoint, log

        resumed_from = None
        if self.run.resume and (ckpt := latest_checkpoint(self._checkpoint_dir())):
            self.load_checkpoint(ckpt)
            from aligntool.resume import apply_learning_rate

            apply_learning_rate(self.optimizer, self.scheduler, self.args.learning_rate, log)  # --accept-changes
            log(f"Resuming from {ckpt} (iteration {self.state['iteration']})")
            resumed_from = ckpt
        start_iteration = self.state["iteration"]
        start, last = time.time(), {}
        with tqdm(total=self.iterations, initial=self.state["iteration"], desc=self.run.loaded.spec.name,
                  disable=not self.accelerator.is_main_process) as bar:  # closed before any error message
            while self.state["iteration"] < self.iterations:
                last = self._iteration()
                bar.update(1)
                if preemption.requested():
                    ckpt = self.save_checkpoint()
                    self._end_trackers()  # the trackers' runs end cleanly; the resumed run starts new ones
                    raise preemption.Preempted(self.state["iteration"], str(ckpt))
                bar.set_postfix({k: f"{last[k]:.2f}" for k in ("reward", "loss", "kl") if k in last})
        wall = time.time() - start
        if self.asynchronous is not None:
            self.asynchronous.close()
        if self.eval_prompts and self._last_eval != self.state["iteration"]:
            last = {**last, **self.evaluate()}  # the final model's evaluation, unless the last iteration had one
        lm_state, _ = self._whole_state()
        if self.accelerator.is_main_process:
            self._save_model(self.out, lm_state)
        self._end_trackers()
        self.accelerator.wait_for_everyone()
        from aligntool.outputs import summary

        done = self.state["iteration"] - start_iteration
        return summary(self.run.loaded.spec.name, "online", self.state["iteration"], wall,
                       done * self.batch_size * self.world, self.world, last, resumed_from)
