"""Rollouts: what the engine samples and measures (``Rollout``), and the engine's sampling steps (``RolloutSteps``).

Generation runs through transformers (``generate`` with the KV cache: aligntool.sampling) or vLLM
(aligntool.online.vllm_backend), from the policy (gathered under ZeRO-3, unsharded under FSDP) or from the frozen
reference. Every row has its own seeded random stream (``RolloutSteps.row_seeds``), so a row is sampled alike whatever
the number of processes or the batch it shares. Layout of a rollout batch: aligntool.sampling.pack (prompts
left-padded, responses right-padded, position ids that follow the attention mask).
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass

import torch

from aligntool.online.episodes import EpisodeSteps, episode_stats
from aligntool.online.ops import sequence_kl


def scorer_inputs(ro) -> tuple[list, list]:
    """(prompts, completions) for the reward functions: the texts, or for tool episodes the conversations as messages
    (TRL's convention: each completion is the list of messages after the prompt, the tool replies included)."""
    if ro.episodes is None:
        return ro.prompts, ro.texts
    return [e.messages[: e.prompt_messages] for e in ro.episodes], [e.completion_messages for e in ro.episodes]


@dataclass(frozen=True)
class Rollout:
    """One response per row (a prompt, or one of a prompt's group: ``RolloutSteps.sample_groups``) and what has been
    measured on it so far (None: not yet). Never changed in place: ``ro.with_(...)`` makes the next one."""

    prompts: list[str]
    texts: list[str]
    input_ids: torch.Tensor  # (B, P + R)
    attention_mask: torch.Tensor
    prompt_width: int
    mask: torch.Tensor  # (B, R): 1 on response tokens
    missing_eos: torch.Tensor  # (B,) bool: cut off before EOS
    logp: torch.Tensor | None = None  # (B, R) under the policy that sampled, no grad
    logp_ref: torch.Tensor | None = None  # (B, R) under the reference
    score: torch.Tensor | None = None  # (B,) from the reward source
    values: torch.Tensor | None = None  # (B, R) of the value head
    logp_behaviour: torch.Tensor | None = None  # (B, R) under the policy that sampled, when older (asynchronous)
    episodes: list | None = None  # multi-turn tool episodes (aligntool.online.episodes.Episode), one per row; mask 0
    # on the tokens the policy did not generate (tool replies, role markers)

    def with_(self, **changes) -> "Rollout":
        return dataclasses.replace(self, **changes)

    def select(self, idx) -> "Rollout":
        """The rows ``idx`` of every per-row field (tensors indexed, lists picked)."""
        rows = idx.tolist() if isinstance(idx, torch.Tensor) else list(idx)

        def pick(value):
            if isinstance(value, torch.Tensor):
                return value[idx]
            return [value[i] for i in rows] if isinstance(value, list) else value

        return dataclasses.replace(self, **{f.name: pick(getattr(self, f.name)) for f in dataclasses.fields(self)})


class RolloutSteps(EpisodeSteps):
    """The engine's rollout steps (a part of aligntool.online.engine.Engine). They read what the set-up made
    (aligntool.online.setup.EngineSetup): ``model``, ``ref``, ``accelerator``, ``tokenizer``, ``cfg`` (sampling
    settings), ``vllm``, ``scorer``, ``columns``, ``zero3`` / ``fsdp``, ``rank`` / ``world``, ``args.seed``, and the
    loop's ``state["iteration"]``, ``_calls`` and ``updates``."""

    @property
    def policy_lm(self):
        return self.accelerator.unwrap_model(self.model).lm

    def reference(self):
        """(reference model, context to run it in): the frozen copy, or the LoRA policy with its adapter disabled."""
        if self.ref is not None:
            return self.ref, contextlib.nullcontext()
        return self.policy_lm, self.policy_lm.disable_adapter()

    def row_seeds(self, n: int) -> list[int]:
        """One seed per row of this sampling call: a function of (train.seed, iteration, call, global row), so a row
        is sampled alike whatever the number of processes or the batch it shares."""
        call, self._calls = self._calls, self._calls + 1
        base = ((self.args.seed * 1_000_003 + self.state["iteration"]) * 1_009 + call) * 1_000_033
        return [base + self.rank * n + i for i in range(n)]

    def _generation(self, from_reference: bool):
        """(LM to generate with, context): the policy's weights gathered under ZeRO-3 (TRL's
        ``unwrap_model_for_generation``), the FSDP root's unsharded, the adapter disabled for a LoRA reference."""
        stack = contextlib.ExitStack()
        if from_reference:
            if self.ref is None:
                lm = self.policy_lm
                stack.enter_context(lm.disable_adapter())
            else:
                lm = getattr(self.ref, "module", self.ref)  # under ZeRO-2 the DeepSpeed engine's module (stage 0)
            return lm, stack
        if (ahead := getattr(self, "asynchronous", None)) and (copy := ahead.generation_lm()) is not None:
            return copy, stack  # the background thread samples from the generation copy (online/asynchronous.py)
        if self.zero3:
            from trl.models.utils import unwrap_model_for_generation

            return stack.enter_context(unwrap_model_for_generation(self.model, self.accelerator)).lm, stack
        if self.fsdp:
            root = self.model
            root.unshard()
            stack.callback(root.reshard)
        return self.policy_lm, stack

    @torch.no_grad()
    def samples(self, prompts: list[str], kinds: list[str], from_reference: bool = False,
                seeds: list[int] | None = None) -> list[Rollout]:
        """For each kind ("sample" or "greedy"), one response per prompt, all generated in one call -> one Rollout
        per kind. Each row has its own random stream (``row_seeds``, or ``seeds``, one per prompt and kind, given:
        the online evaluation's fixed ones; aligntool.sampling.RowSampler)."""
        from aligntool.sampling import generate_from_ids, pack, trim
        from aligntool.tokens import encode_prompts, stop_ids

        if (ahead := getattr(self, "asynchronous", None)) and (served := ahead.serve(prompts, kinds, from_reference,
                                                                                     seeds)):
            return served  # sampled ahead by the previous iteration's policy (aligntool.online.asynchronous)
        if getattr(self, "agent", None) is not None:  # multi-turn tool episodes (aligntool.online.episodes)
            return [Rollout(**fields) for fields in self.episode_samples(prompts, kinds, from_reference, seeds)]
        tok, cfg = self.tokenizer, self.cfg
        prompt_ids = encode_prompts(tok, prompts)
        stops = stop_ids(tok)  # EOS and the chat template's end of turn: either ends a response
        n = len(prompts)
        seeds = seeds if seeds is not None else [s for _ in kinds for s in self.row_seeds(n)]
        greedy_rows = [k == "greedy" for k in kinds for _ in prompts]
        if self.vllm is not None and not from_reference:  # the reference (XPO) keeps generating with transformers
            self.vllm.sync(self.updates)
            rows = self.vllm.generate(prompt_ids * len(kinds), seeds, greedy_rows, stops, cfg.max_new_tokens,
                                      temperature=cfg.temperature, top_p=cfg.top_p)
            responses = [trim(r, stops, tok.pad_token_id) or [stops[0]] for r in rows]
        else:
            lm, context = self._generation(from_reference)
            lm.eval()
            with context:
                responses = generate_from_ids(lm, prompt_ids * len(kinds), tok.pad_token_id, stops,
                                              cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                                              seeds=seeds, greedy_rows=greedy_rows,
                                              synced=self.fsdp and self.world > 1)
        out = []
        for j in range(len(kinds)):
            rows = responses[j * n : (j + 1) * n]
            ids, attn, mask, width = pack(prompt_ids, rows, tok.pad_token_id, self.accelerator.device)
            texts = [tok.decode(r, skip_special_tokens=True) for r in rows]
            missing_eos = torch.tensor([r[-1] not in stops for r in rows], device=ids.device)
            out.append(Rollout(prompts, texts, ids, attn, width, mask, missing_eos))
        return out

    def sample(self, prompts: list[str], from_reference: bool = False, greedy: bool = False) -> Rollout:
        """One response per prompt from the policy (or the reference: XPO), sampled or greedy (ReMax's baseline)."""
        return self.samples(prompts, ["greedy" if greedy else "sample"], from_reference)[0]

    def sample_groups(self, prompts: list[str], n: int) -> Rollout:
        """Group sampling: ``n`` sampled responses per prompt from the policy, in one generate call, as one Rollout of
        ``len(prompts) * n`` rows grouped per prompt: rows ``n*j .. n*j + n - 1`` answer ``prompts[j]`` (so
        ``x.reshape(-1, n)`` has one prompt's group per row; aligntool.losses.online.group_baseline). Each row has its
        own seed, as in ``samples``: a group's responses differ, and ``n = 1`` is ``sample(prompts)``."""
        return self.samples([p for p in prompts for _ in range(n)], ["sample"])[0]

    def score(self, ro: Rollout) -> torch.Tensor:
        """The reward source's score of each response, minus ``missing_eos_penalty`` where no stop token (EOS or the
        template's end of turn) ended it."""
        columns = {} if not self.columns else {
            c: [self.columns[p][c] for p in ro.prompts] for c in next(iter(self.columns.values()))}
        score = torch.tensor(self.scorer(*scorer_inputs(ro), **columns), device=ro.mask.device)
        if ro.episodes is not None and any(e.reward is not None for e in ro.episodes):  # the environment's reward
            score = score + torch.tensor([e.reward or 0.0 for e in ro.episodes], device=score.device)
        if self.cfg.missing_eos_penalty:
            score = score - self.cfg.missing_eos_penalty * ro.missing_eos.to(score.dtype)
        if getattr(self, "_completions", ()) is None:  # this iteration writes a sample of its completions
            self.note_completions([{"prompt": p, "completion": t, "reward": r}
                                   for p, t, r in zip(ro.prompts, ro.texts, score.tolist())])
        return score

    def policy_logprobs(self, ro: Rollout, grad: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(per-token log-probs masked to the response, values or None) under the current policy. ``grad=True`` runs
        the wrapped (DDP / DeepSpeed / FSDP) model with grad, for an update; otherwise without."""
        from aligntool.sampling import completion_logprobs, positions

        sharded = self.zero3 or self.fsdp  # a sharded model's forward gathers its weights: always the wrapped one
        model = self.model if grad or sharded else self.accelerator.unwrap_model(self.model)
        keep = ro.input_ids.shape[1] - ro.prompt_width + 1  # the head runs on the response positions only
        with torch.set_grad_enabled(grad):
            logits, values = model(ro.input_ids, ro.attention_mask, positions(ro.attention_mask), keep)
            logp = completion_logprobs(logits, ro.input_ids, ro.prompt_width, kept=True) * ro.mask
        if values is not None:
            values = values[:, ro.prompt_width - 1 : -1]
        return logp, values

    @torch.no_grad()
    def ref_logprobs(self, ro: Rollout) -> torch.Tensor:
        """Per-token log-probs under the reference, masked to the response."""
        from aligntool.sampling import completion_logprobs, positions

        ref, context = self.reference()
        keep = ro.input_ids.shape[1] - ro.prompt_width + 1
        with context:
            logits = ref(input_ids=ro.input_ids, attention_mask=ro.attention_mask,
                         position_ids=positions(ro.attention_mask), logits_to_keep=keep).logits
        return completion_logprobs(logits, ro.input_ids, ro.prompt_width, kept=True) * ro.mask

    def rollout(self, prompts: list[str], per_prompt: int = 1) -> Rollout:
        """sample (``per_prompt`` responses per prompt, grouped: ``sample_groups``) -> score -> log-probs (and values)
        under the policy that sampled -> reference log-probs. PPO (1 per prompt), P3O (2)."""
        ro = self.sample_groups(prompts, per_prompt)
        ro = ro.with_(score=self.score(ro))
        logp, values = self.policy_logprobs(ro)
        return ro.with_(logp=logp, values=values, logp_ref=self.ref_logprobs(ro))

    def rollout_stats(self, ro: Rollout) -> dict:
        """reward (and its std), KL to the reference per sequence, entropy (the sampled tokens' mean negative
        log-prob, a Monte-Carlo estimate), the mean response length and the share of responses cut off before EOS;
        named as TRL's GRPOTrainer names them (docs/TRACKING.md)."""
        scored = {} if ro.score is None else {
            "reward": ro.score.mean().item(), "reward_std": ro.score.std().item() if len(ro.score) > 1 else 0.0}
        episodes = {} if ro.episodes is None else episode_stats(ro.episodes)
        return {**scored, **episodes, "kl": sequence_kl(ro).mean().item(),
                "entropy": (-(ro.logp * ro.mask).sum() / ro.mask.sum()).item(),
                "completions/mean_length": ro.mask.sum(-1).float().mean().item(),
                "completions/clipped_ratio": ro.missing_eos.float().mean().item()}
