"""Asynchronous generation for the rollout engine (``generation.asynchronous: true``): one step off-policy.

The prompts of iteration t + 1 are known before iteration t trains (``Engine.batch_prompts`` is a function of the
seed and the iteration), and so are its rows' seeds (``RolloutSteps.row_seeds``). So at iteration t's first optimizer
step, before it changes the weights, the engine copies the policy pi_t into a generation copy, and a background thread
samples iteration t + 1's rollout from it (the same ``samples`` call the method makes, with the same seeds) and
measures its log-probs there, pi_behaviour = pi_t, while iteration t's update runs. Iteration t + 1 then trains on
those rows: pi_old = pi_{t+1} (the log-probs the engine recomputes on the training model, as always) differs from the
policy that sampled, and each token's policy-gradient term is reweighted by the truncated importance weight

    w_t = min(pi_old(y_t | x, y_<t) / pi_behaviour(y_t | x, y_<t), C),     C = generation.tis_imp_ratio_cap (2)

(Yao, Liu, Zhang, Shen, Gao 2025, "Your Efficient RL Framework Secretly Brings You Off-Policy RL Training",
fengyao.notion.site/off-policy-rl: truncated importance sampling, TIS; verl: ``compute_policy_loss_vanilla`` in
verl/trainer/ppo/core_algos.py multiplies ``pg_losses`` by ``clamp(exp(old_log_prob - rollout_log_probs),
max=tis_imp_ratio_cap)``; OpenRLHF: ``PolicyLoss`` with ``--enable_vllm_is_correction --vllm_is_truncated_threshold``,
whose example scripts use 2, as verl's and SkyRL's do). The weight is detached and multiplies the advantage (for PPO's
clipped loss, -min(rho A, clip(rho) A) w = -min(rho A w, clip(rho) A w) for w > 0: the same as weighting the loss).
P3O's surrogate is per pair of sequences, so its weight is the sequence-level one of the pair (verl's
``rollout_is_level: sequence``): min(prod over the pair's tokens of pi_old / pi_behaviour, C). The KL and value terms
are not reweighted. Iteration 1 (and the first iteration after a resume) samples synchronously (w = 1).

What it saves: the generation of t + 1 overlaps the update of t, so an iteration takes about max(generation, update)
instead of their sum when the machine has the cores or devices to run both (scripts/bench_async_rollout.py measures
it on the CPU). Generation runs through transformers on the copy (``generation.backend: hf``), in one process or
under DDP (each process its own slice); ZeRO-3 / FSDP (sharded weights) and the vLLM backend are refused in one line.
"""

from __future__ import annotations

import copy
import threading
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from aligntool.errors import UserError

METHODS = ("reinforce_pp", "remax", "ppo", "p3o")  # the engine's: recipe/schema.py ASYNCHRONOUS adds grpo (TRL)


def check(run) -> None:
    """One line where the engine cannot generate asynchronously (before any model loads)."""
    g, name = run.recipe.generation, run.loaded.spec.name
    if name not in METHODS:
        raise UserError(f"generation.asynchronous: applies to {', '.join(METHODS)} on the engine; {name!r} "
                        "generates synchronously")
    if getattr(run.recipe, "agent", None) is not None:  # multi-turn episodes sample turn by turn: not sampled ahead
        raise UserError("generation.asynchronous: multi-turn tool episodes (agent:) generate synchronously; remove "
                        "one of the two")
    if g.backend != "hf":
        raise UserError("generation.asynchronous: the engine generates asynchronously with transformers on a copy "
                        "of the weights (generation.backend: hf); with vLLM, remove one of the two")


def tis_weights(logp_old: torch.Tensor, logp_behaviour: torch.Tensor, mask: torch.Tensor, cap: float,
                group: int = 0) -> torch.Tensor:
    """Truncated importance weights min(pi_old / pi_behaviour, cap), detached: per token (B, R), zero off the
    response (``group`` 0); or per group of ``group`` consecutive rows over all their tokens (B / group,): the
    sequence-level weight of P3O's pairs."""
    d = (logp_old.detach() - logp_behaviour.detach()) * mask
    if group:
        return d.sum(-1).reshape(-1, group).sum(-1).exp().clamp(max=cap)
    return d.exp().clamp(max=cap) * mask


def weight(engine, ro, group: int = 0) -> torch.Tensor | None:
    """The truncated importance weights of an asynchronous rollout (``tis_weights`` with the recipe's C), to multiply
    the policy-gradient term; None for a rollout sampled by the current policy. Their mean and the share of tokens
    whose ratio exceeded C are logged (``tis/weight_mean``, ``tis/capped_ratio``)."""
    if getattr(ro, "logp_behaviour", None) is None:
        return None
    cap = engine.run.recipe.generation.tis_imp_ratio_cap
    w = tis_weights(ro.logp, ro.logp_behaviour, ro.mask, cap, group)
    ratio = tis_weights(ro.logp, ro.logp_behaviour, ro.mask, float("inf"))
    engine._tis_stats = {"tis/weight_mean": (w.sum() / (w.numel() if group else ro.mask.sum())).item(),
                         "tis/capped_ratio": ((ratio > cap).sum() / ro.mask.sum()).item()}
    return w


class AsyncRollouts:
    """The engine's generation copy and the background rollout of the next iteration (one at a time)."""

    def __init__(self, engine):
        if engine.zero3 or engine.fsdp:
            raise UserError("generation.asynchronous: needs the policy's whole weights in each process for the "
                            "generation copy; ZeRO-3 and FSDP shard them: use ZeRO-2 / DDP, or remove it")
        self.engine = engine
        self.copy = None  # the generation copy of the policy LM, refreshed at each launch
        self.pattern = None  # (rows per prompt, kinds) of the iteration's first sampling call
        self.pending: tuple[int, tuple, Future] | None = None  # (iteration, (prompts, kinds), rollouts)
        self.launched_at = -1
        self.worker = threading.local()
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="aligntool-rollout")

    # ---------------------------------------------------------------------------------------- the engine's hooks
    def generation_lm(self):
        """The LM ``RolloutSteps._generation`` samples with in the background thread (the copy); None elsewhere."""
        return getattr(self.worker, "lm", None)

    def serve(self, prompts: list[str], kinds: list[str], from_reference: bool, seeds) -> list | None:
        """At the top of ``RolloutSteps.samples``: the rollouts sampled in the background for this call, or None (the
        call samples now). Only the iteration's first call from the policy with the engine's own seeds is served;
        it also records the call's pattern, so the next iteration's can be sampled ahead."""
        e = self.engine
        if from_reference or seeds is not None or e._calls != 0 or self.generation_lm() is not None:
            return None
        batch = getattr(e, "_batch_prompts", None)  # set by the engine's loop; none for a call outside it
        if not batch:
            return None
        per = len(prompts) // len(batch)
        self.pattern = (per, tuple(kinds)) if [p for p in batch for _ in range(per)] == list(prompts) else None
        pending, self.pending = self.pending, None
        if pending is None or pending[:2] != (e.state["iteration"], (tuple(prompts), tuple(kinds))):
            return None
        e._calls += len(kinds)  # as row_seeds would have advanced
        return pending[2].result()

    def launch(self) -> None:
        """At the iteration's first optimizer step, before it changes the weights: copy the policy (pi_t) and sample
        the next iteration's rollout from the copy in the background."""
        e = self.engine
        it = e.state["iteration"]
        if self.launched_at == it or self.pattern is None or it + 1 >= e.iterations:
            return
        self.launched_at = it
        if self.pending is not None:  # not served (another call pattern): done before the copy changes
            self.pending[2].result()
            self.pending = None
        self._refresh_copy()
        prompts, kinds, seeds = self._next_call()
        self.pending = (it + 1, (tuple(prompts), tuple(kinds)), self.pool.submit(self._sample, prompts, kinds, seeds))

    def close(self) -> None:
        self.pending = None
        self.pool.shutdown(wait=True)

    # -------------------------------------------------------------------------------------------------- steps
    @torch.no_grad()
    def _refresh_copy(self) -> None:
        lm = self.engine.policy_lm
        if self.copy is None:
            self.copy = copy.deepcopy(lm).eval().requires_grad_(False)
            return
        for target, source in zip(self.copy.parameters(), lm.parameters(), strict=True):
            target.copy_(source)

    def _next_call(self) -> tuple[list[str], list[str], list[int]]:
        """The next iteration's first sampling call as the method will make it: its prompts (the next batch,
        expanded as this one was) and its rows' seeds (``row_seeds`` of call 0, one call per kind)."""
        e = self.engine
        state, calls = dict(e.state), e._calls
        try:
            e.state["iteration"] += 1
            e._calls = 0
            per, kinds = self.pattern
            prompts = [p for p in e.batch_prompts() for _ in range(per)]
            seeds = [s for _ in kinds for s in e.row_seeds(len(prompts))]
        finally:
            e.state.clear()
            e.state.update(state)
            e._calls = calls
        return prompts, list(kinds), seeds

    @torch.no_grad()
    def _sample(self, prompts, kinds, seeds) -> list:
        """In the background thread: ``samples`` on the copy, and the sampled rows' log-probs under it."""
        from aligntool.sampling import completion_logprobs, positions

        self.worker.lm = self.copy
        try:
            rollouts = self.engine.samples(prompts, list(kinds), seeds=seeds)
            out = []
            for kind, ro in zip(kinds, rollouts):
                if kind == "sample":
                    keep = ro.input_ids.shape[1] - ro.prompt_width + 1
                    logits = self.copy(input_ids=ro.input_ids, attention_mask=ro.attention_mask,
                                       position_ids=positions(ro.attention_mask), logits_to_keep=keep).logits
                    logp = completion_logprobs(logits, ro.input_ids, ro.prompt_width, kept=True) * ro.mask
                    ro = ro.with_(logp_behaviour=logp)
                out.append(ro)
            return out
        finally:
            self.worker.lm = None
