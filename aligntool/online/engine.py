"""The rollout engine shared by every online method (PPO, P3O, ReMax, online DPO, XPO).

One loop, built on transformers (``generate`` with the KV cache, models, schedulers), accelerate (devices, DDP,
DeepSpeed ZeRO-2/3, FSDP2, gradient sync, sharded checkpoints), TRL (generation under ZeRO-3, the sharded reference,
vLLM: aligntool.online.vllm_backend): each iteration draws one global batch of prompts, gives each process its
``per_device_train_batch_size`` slice, lets the method roll out and update (``method.step(engine, prompts)``), logs,
and checkpoints. Every sampled row has its own seeded random stream and the losses' token means run over the global
batch, so the number of processes does not change the math. The steps a method composes, each returning new
values (a ``Rollout`` is never changed in place; ``ro.with_(...)`` makes the next one):

- ``sample(prompts, from_reference=False, greedy=False)``: one response per prompt, trimmed after EOS -> ``Rollout``
  with token tensors, texts and missing-EOS flags; ``samples(prompts, kinds)``: several per prompt in one call;
- ``score(ro)``: the recipe's reward source on the texts, minus ``missing_eos_penalty`` where EOS is missing;
- ``policy_logprobs(ro, grad=False)``: per-token log-probs (and values, with a value head) under the current policy;
  ``grad=True`` is the forward of an update;
- ``ref_logprobs(ro)``: per-token log-probs under the reference;
- ``rollout(prompts)``: all four (PPO, P3O);
- ``optimizer_step(loss)``: backward, gradient clipping, optimizer and scheduler step.

Layout of a rollout batch: aligntool.sampling.pack (prompts left-padded, responses right-padded, position ids that
follow the attention mask).
"""

from __future__ import annotations

import dataclasses
import json
import pickle
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import Field
from torch import nn

from aligntool.errors import UserError, first_line
from aligntool.recipe.schema import Sampling, Strict

DEFAULT_ITERATIONS = 100  # when train.max_steps is not set (logged)
SEED_STRIDE = 7919  # a prime: the prompt streams of seeds s and s + 1 never coincide


def online_config(**sampling) -> type[Strict]:
    """The settings every online method shares (its ``algo`` section extends these), with the method's sampling
    defaults (temperature, top_p, max_new_tokens; see aligntool.recipe.schema.Sampling)."""

    class OnlineConfig(Sampling(**sampling)):
        missing_eos_penalty: float | None = Field(
            None, ge=0, description="Subtracted from the score of responses cut off before EOS (for online_dpo / xpo: "
            "from the preference scores, as TRL).")
        disable_dropout: bool = Field(True, description="Dropout off in the policy (LoRA's included) and the "
                                      "reference, as TRL's trainers default: rollouts are scored in eval mode and "
                                      "updated in train mode, so with dropout the PPO/P3O ratio would not be 1 at the "
                                      "sampling policy.")

    return OnlineConfig


class PolicyWithValue(nn.Module):
    """A causal LM plus an optional scalar value head, as one module so DDP syncs both. The head reads the policy's
    own last hidden state (``critic="shared"``, trlx style) or that of a separate critic LM initialised as a copy of
    the policy (``critic="separate"``, InstructGPT / OpenRLHF style: twice the weights, no policy-value
    interference)."""

    def __init__(self, lm, value_head: bool, critic_lm=None):
        super().__init__()
        self.lm = lm
        self.critic_lm = critic_lm if value_head else None
        # FSDP wraps the decoder blocks of the LM (and of the critic) one by one, as it would the LM alone
        self._no_split_modules = list(getattr(lm, "_no_split_modules", None) or [])
        self.value_head = nn.Linear(lm.config.hidden_size, 1) if value_head else None
        if self.value_head is not None:
            nn.init.zeros_(self.value_head.weight)
            nn.init.zeros_(self.value_head.bias)

    def forward(self, input_ids, attention_mask, position_ids, logits_to_keep: int = 0):
        """(logits of the last ``logits_to_keep`` positions (0: all), values of every position or None)."""
        shared = self.value_head is not None and self.critic_lm is None
        out = self.lm(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                      output_hidden_states=shared, use_cache=False, logits_to_keep=logits_to_keep)
        values = None
        if self.value_head is not None:
            hidden = out.hidden_states[-1] if shared else self.critic_lm(
                input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                output_hidden_states=True, use_cache=False).hidden_states[-1]
            values = self.value_head(hidden.to(self.value_head.weight.dtype)).float().squeeze(-1)
        return out.logits, values

    @property
    def is_gradient_checkpointing(self) -> bool:  # read by TRL's unwrap_model_for_generation
        return bool(getattr(self.lm, "is_gradient_checkpointing", False))

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None):
        self.lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gradient_checkpointing_kwargs)

    def gradient_checkpointing_disable(self):
        self.lm.gradient_checkpointing_disable()

    def value_state(self) -> dict:
        """Everything of the critic that is not the policy (saved beside the policy in checkpoints)."""
        state = {f"value_head.{k}": v for k, v in self.value_head.state_dict().items()}
        if self.critic_lm is not None:
            state.update({f"critic_lm.{k}": v for k, v in self.critic_lm.state_dict().items()})
        return {k: v.detach().contiguous().clone() for k, v in state.items()}


@dataclass(frozen=True)
class Rollout:
    """One response per prompt and what has been measured on it so far (None: not yet)."""

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

    def with_(self, **changes) -> "Rollout":
        return dataclasses.replace(self, **changes)

    def select(self, idx) -> "Rollout":
        rows = idx.tolist() if isinstance(idx, torch.Tensor) else list(idx)
        pick = lambda t: None if t is None else t[idx]  # noqa: E731
        return Rollout([self.prompts[i] for i in rows], [self.texts[i] for i in rows], self.input_ids[idx],
                       self.attention_mask[idx], self.prompt_width, self.mask[idx], self.missing_eos[idx],
                       pick(self.logp), pick(self.logp_ref), pick(self.score), pick(self.values))


class Engine:
    """``method``: an object with ``step(engine, prompts) -> stats`` and ``updates_per_iteration``; optionally
    ``value_head`` / ``critic`` (PPO) and ``uses_preferences`` (labels pairs itself, no reward source).

    The recipe's ``distributed`` backend decides how the policy is held: ``ddp`` (a replica per process),
    ``deepspeed`` (ZeRO-2 / ZeRO-3, through accelerate's DeepSpeed integration; under ZeRO-3 the policy, the critic
    and the reference are built and kept partitioned, and gathered for generation only, by TRL's
    ``unwrap_model_for_generation``) or ``fsdp`` (PyTorch FSDP2; the frozen reference by TRL's ``prepare_fsdp``)."""

    def __init__(self, run, method):
        from transformers import get_scheduler

        from aligntool import models, rewards
        from aligntool.recipe.schema import RewardConfig

        self.run, self.method, self.cfg = run, method, run.algo
        value_head, critic = getattr(method, "value_head", False), getattr(method, "critic", "shared")
        d = run.recipe.distributed
        self.zero3 = d.backend == "deepspeed" and d.zero_stage == 3
        self.fsdp = d.backend == "fsdp"
        if getattr(method, "samples_from_reference", False) and (self.zero3 or self.fsdp):
            raise UserError(f"distributed.backend: {run.loaded.spec.name} samples from the reference model, which "
                            f"ZeRO-3 and FSDP keep partitioned; use distributed.backend ddp, or deepspeed with "
                            f"zero_stage 2")
        self.args = run.trl_config()  # transformers.TrainingArguments: lr, max_steps (= iterations), batch, seed, ...
        self.accelerator = accelerator_for(self.args)
        if self.fsdp:  # checkpoints: each process writes its own shards (torch.distributed.checkpoint)
            plugin = self.accelerator.state.fsdp_plugin
            plugin.state_dict_config = plugin.optim_state_dict_config = None  # else the full-state config stays
            plugin.set_state_dict_type("SHARDED_STATE_DICT")
        self.rank, self.world = self.accelerator.process_index, self.accelerator.num_processes
        self.tokenizer = run.tokenizer
        lm, lora = run.policy(), run.peft_config()
        critic_lm = None
        if value_head and critic == "separate":
            if lora is not None:
                raise UserError("algo.critic: a separate critic is not supported with LoRA; use critic: shared")
            critic_lm = run.policy()  # a second copy of the initial policy (built sharded under ZeRO-3 too)
        if lora is not None:
            from peft import get_peft_model

            lm = get_peft_model(lm, lora)
        torch.manual_seed(self.args.seed + self.rank)
        self.model = PolicyWithValue(lm, value_head, critic_lm)
        if self.zero3 and value_head:  # ZeRO-3 partitions all trainable weights in one dtype: the LM's (bf16 runs)
            self.model.value_head.to(next(lm.parameters()).dtype)
        # with LoRA and no explicit reference, the reference is the policy with its adapter disabled (no second copy)
        explicit = run.reference()
        self.ref = None if lora is not None and explicit is None else (explicit or models.load_model(
            run.model_path, **models.options(run.recipe.model, revision=True))).eval()
        if self.ref is not None:
            self.ref.requires_grad_(False)
        if getattr(self.cfg, "disable_dropout", True):
            models.disable_dropout(self.model)
            if self.ref is not None:
                models.disable_dropout(self.ref)
        from transformers import Trainer

        # the optimizer train.optim names (AdamW, bitsandbytes 8-bit, Lion, ...), built as the Trainer builds it
        from aligntool.optim import optimizer_cls_and_kwargs

        # (train.optim: lion_kappa | cosmos: aligntool's own, aligntool/optim)
        optim_cls, optim_kwargs = optimizer_cls_and_kwargs(run.recipe, self.args, self.model, str(run.loaded.source)) \
            or Trainer.get_optimizer_cls_and_kwargs(self.args, self.model.lm)
        optim_kwargs = {**optim_kwargs, "lr": self.args.learning_rate}
        self.optimizer = optim_cls(self.model.parameters(), weight_decay=self.args.weight_decay, **optim_kwargs)
        if self.args.max_steps > 0:
            self.iterations = self.args.max_steps
        else:
            from aligntool.outputs import log

            self.iterations = DEFAULT_ITERATIONS
            log(f"note: train.max_steps (the number of iterations) is not set: {DEFAULT_ITERATIONS} iterations")
        updates = self.iterations * method.updates_per_iteration
        self.scheduler = get_scheduler(self.args.lr_scheduler_type, self.optimizer,
                                       num_warmup_steps=self.args.get_warmup_steps(updates),
                                       num_training_steps=updates)
        if self.accelerator.state.deepspeed_plugin is not None:
            # DeepSpeed's "auto" entries (micro batch, clipping, precision, ZeRO-3 bucket sizes) from the arguments
            # and the model, as the Trainer's deepspeed_init fills them
            self.args.hf_deepspeed_config.trainer_config_finalize(self.args, self.model.lm, updates)
        # the scheduler stays ours (stepped once per update; accelerate's wrapper would step it once per process)
        # and acts on the optimizer DeepSpeed / FSDP wrap; sharded checkpoints save it with the rest
        self.model, self.optimizer = self.accelerator.prepare(self.model, self.optimizer)
        self.accelerator.register_for_checkpointing(self.scheduler)
        if self.ref is not None:
            if self.accelerator.state.deepspeed_plugin is not None:
                from trl.models.utils import prepare_deepspeed

                self.ref = prepare_deepspeed(self.ref, self.accelerator)  # sharded under ZeRO-3, whole under ZeRO-2
            elif self.fsdp:
                from trl.models.utils import prepare_fsdp

                self.ref = prepare_fsdp(self.ref, self.accelerator)
            else:
                self.ref.to(self.accelerator.device)
        if self.fsdp:  # FSDP2 initialises at the root's first forward: do it now, before generation runs the LM alone
            with torch.no_grad():
                one = torch.ones(1, 1, dtype=torch.long, device=self.accelerator.device)
                self.model(one, one, one - 1, 1)
        self._log_partitioning()
        self.updates = 0  # optimizer steps taken by this process (the vLLM weights follow it)
        self.vllm = None
        if run.recipe.generation.backend == "vllm":
            from aligntool.online.vllm_backend import VLLMSampler

            self.vllm = VLLMSampler(self.policy_lm, self.accelerator, self.tokenizer, run.recipe.generation,
                                    self.cfg.max_new_tokens)
        self.scorer = None if getattr(method, "uses_preferences", False) else rewards.load(
            run.recipe.reward or RewardConfig(), device=self.accelerator.device)
        # every process holds the whole prompt list; each iteration draws one global batch and takes its slice
        self.prompts = list(dict.fromkeys(run.train_dataset["prompt"]))
        # the dataset's other columns (an answer, test cases, ...), passed to reward functions by prompt
        extra = [c for c in run.train_dataset.column_names if c != "prompt"]
        self.columns = {} if not extra else {
            row["prompt"]: {c: row[c] for c in extra} for row in reversed(run.train_dataset.to_list())}
        self.batch_size = self.args.per_device_train_batch_size
        self.state = {"iteration": 0, "kl_coef": getattr(self.cfg, "kl_coef", 0.0)}
        self._calls = 0  # sampling calls in this iteration (part of each row's seed)
        self.out = run.output_dir
        self.metrics_file = self.out / "metrics.jsonl"
        self.tb = None
        if self.accelerator.is_main_process:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(self.out / "tensorboard"))

    def _log_partitioning(self) -> None:
        """Say how the weights are held: ZeRO-3 partitions (each process's share of the elements) or FSDP shards."""
        from aligntool.outputs import log

        params = list(self.model.parameters())
        if self.zero3:
            local = sum(p.ds_tensor.numel() for p in params if hasattr(p, "ds_tensor"))
            total = sum(p.ds_numel for p in params if hasattr(p, "ds_numel"))
            log(f"ZeRO-3: this process holds {local} of the policy's {total} parameter elements "
                f"({len(params)} tensors partitioned over {self.world} processes)")
        elif self.fsdp:
            placements = {str(getattr(p, "placements", None)) for p in params}
            log(f"FSDP: parameters sharded over {self.world} processes ({', '.join(sorted(placements))})")

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

    # ------------------------------------------------------------------------------------------------ rollouts
    @property
    def policy_lm(self):
        return self.accelerator.unwrap_model(self.model).lm

    def reference(self):
        """(reference model, context to run it in): the frozen copy, or the LoRA policy with its adapter disabled."""
        import contextlib

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
        import contextlib

        stack = contextlib.ExitStack()
        if from_reference:
            if self.ref is None:
                lm = self.policy_lm
                stack.enter_context(lm.disable_adapter())
            else:
                lm = getattr(self.ref, "module", self.ref)  # under ZeRO-2 the DeepSpeed engine's module (stage 0)
            return lm, stack
        if self.zero3:
            from trl.models.utils import unwrap_model_for_generation

            return stack.enter_context(unwrap_model_for_generation(self.model, self.accelerator)).lm, stack
        if self.fsdp:
            root = self.model
            root.unshard()
            stack.callback(root.reshard)
        return self.policy_lm, stack

    @torch.no_grad()
    def samples(self, prompts: list[str], kinds: list[str], from_reference: bool = False) -> list[Rollout]:
        """For each kind ("sample" or "greedy"), one response per prompt, all generated in one call -> one Rollout
        per kind. Each row has its own random stream (``row_seeds``; aligntool.sampling.RowSampler)."""
        from aligntool.sampling import generate_from_ids, pack, trim
        from aligntool.tokens import encode_prompts, stop_ids

        tok, cfg = self.tokenizer, self.cfg
        prompt_ids = encode_prompts(tok, prompts)
        stops = stop_ids(tok)  # EOS and the chat template's end of turn: either ends a response
        n = len(prompts)
        seeds = [s for _ in kinds for s in self.row_seeds(n)]
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

    def score(self, ro: Rollout) -> torch.Tensor:
        """The reward source's score of each response, minus ``missing_eos_penalty`` where no stop token (EOS or the
        template's end of turn) ended it."""
        columns = {} if not self.columns else {
            c: [self.columns[p][c] for p in ro.prompts] for c in next(iter(self.columns.values()))}
        score = torch.tensor(self.scorer(ro.prompts, ro.texts, **columns), device=ro.mask.device)
        if self.cfg.missing_eos_penalty:
            score = score - self.cfg.missing_eos_penalty * ro.missing_eos.to(score.dtype)
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

    def rollout(self, prompts: list[str]) -> Rollout:
        """sample -> score -> log-probs (and values) under the policy that sampled -> reference log-probs."""
        ro = self.sample(prompts)
        ro = ro.with_(score=self.score(ro))
        logp, values = self.policy_logprobs(ro)
        return ro.with_(logp=logp, values=values, logp_ref=self.ref_logprobs(ro))

    def optimizer_step(self, loss: torch.Tensor) -> float:
        if not torch.isfinite(loss):
            raise FloatingPointError("loss")
        self.model.train()
        self.accelerator.backward(loss)  # under DeepSpeed this also steps (and clips: deepspeed.json)
        norm = self.accelerator.clip_grad_norm_(self.model.parameters(), self.args.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.updates += 1
        return float(norm) if norm is not None else float("nan")

    def rollout_stats(self, ro: Rollout) -> dict:
        """reward (and its std), KL to the reference per sequence, entropy (the sampled tokens' mean negative
        log-prob, a Monte-Carlo estimate), response length and the share of responses cut off before EOS."""
        scored = {} if ro.score is None else {
            "reward": ro.score.mean().item(), "reward_std": ro.score.std().item() if len(ro.score) > 1 else 0.0}
        return {**scored, "kl": sequence_kl(ro).mean().item(),
                "entropy": (-(ro.logp * ro.mask).sum() / ro.mask.sum()).item(),
                "response_length": ro.mask.sum(-1).float().mean().item(),
                "missing_eos": ro.missing_eos.float().mean().item()}

    # ------------------------------------------------------------------------------------------- checkpoints
    def _checkpoint_dir(self) -> Path:
        return self.out / "checkpoints"

    def _whole_state(self) -> tuple[dict | None, dict | None]:
        """(policy LM state dict, critic state) as whole tensors on the main process (None elsewhere): gathered
        from the shards under ZeRO-3 / FSDP (a collective: every process calls it), the module's own otherwise."""
        if not (self.zero3 or self.fsdp):
            model = self.accelerator.unwrap_model(self.model)
            return None, (model.value_state() if model.value_head is not None else None)
        full = self.accelerator.get_state_dict(self.model)
        if not self.accelerator.is_main_process:
            return None, None
        lm = {k[len("lm."):]: v for k, v in full.items() if k.startswith("lm.")}
        rest = {k: v.detach().contiguous().clone() for k, v in full.items() if not k.startswith("lm.")}
        return lm, rest or None

    def _save_model(self, folder: Path, lm_state: dict | None) -> None:
        """The policy as a loadable model folder (weights, config, tokenizer): main process only."""
        self.policy_lm.save_pretrained(folder, safe_serialization=True, state_dict=lm_state)
        self.tokenizer.save_pretrained(folder)

    def save_checkpoint(self) -> Path:
        """checkpoints/checkpoint-N: the policy as a loadable model folder, the critic, optimizer, scheduler and RNG
        states, the engine state; written under a temporary name and renamed once complete (then COMPLETE).
        Under ZeRO-3 / FSDP every process writes its shard of the training state (accelerate's ``save_state``:
        DeepSpeed's or FSDP's own sharded checkpoint) into ``training_state/``."""
        from aligntool.outputs import COMPLETE_MARKER

        it = self.state["iteration"]
        final = self._checkpoint_dir() / f"checkpoint-{it}"
        sharded = self.zero3 or self.fsdp or self.accelerator.state.deepspeed_plugin is not None
        if not sharded and not all(bool(torch.isfinite(p).all()) for p in self.model.parameters()):
            from aligntool.outputs import latest_checkpoint  # replicas agree: every process raises alike

            last = latest_checkpoint(self._checkpoint_dir(), log=lambda m: None)
            raise UserError(f"training diverged (non-finite weights) at iteration {it}; last checkpoint kept: "
                            f"{last or 'none'}")
        lm_state, critic = self._whole_state()
        if sharded:  # every process writes into one agreed temporary folder, then the main process renames it
            tmp = final.with_name(f".{final.name}.partial")
            if self.accelerator.is_main_process:
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)
            self.accelerator.wait_for_everyone()
            self.accelerator.save_state(str(tmp / "training_state"))
            self.accelerator.wait_for_everyone()  # every process's files (its RNG state last) are written
        if self.accelerator.is_main_process:
            from aligntool.outputs import atomic_path

            final.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(final) as target:
                if sharded:
                    tmp.rename(target)
                else:
                    target.mkdir()
                self._save_model(target, lm_state)  # a checkpoint is a loadable model folder (aligntool eval)
                if critic is not None:
                    from safetensors.torch import save_file

                    save_file(critic, str(target / "value_head.safetensors"))
                if not sharded:
                    torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                                "rng": torch.get_rng_state(), "py_rng": random.getstate()},
                               target / "optimizer.pt")
                (target / "state.json").write_text(json.dumps(self.state))
                (target / COMPLETE_MARKER).write_text(f"{it}\n")
            limit = self.args.save_total_limit
            if limit:
                from aligntool.outputs import complete_checkpoints

                for old in complete_checkpoints(self._checkpoint_dir())[limit:]:
                    shutil.rmtree(old, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        return final

    def load_checkpoint(self, path: Path) -> None:
        from safetensors.torch import load_file

        if (path / "training_state").is_dir():  # a ZeRO / FSDP checkpoint: model, critic, optimizer, scheduler, RNG
            if not (self.zero3 or self.fsdp or self.accelerator.state.deepspeed_plugin is not None):
                raise UserError(f"{path}: written by a DeepSpeed / FSDP run; resume it with the same "
                                f"distributed.backend")
            self.accelerator.load_state(str(path / "training_state"))
            self.state = json.loads((path / "state.json").read_text())
            return
        if self.zero3 or self.fsdp or self.accelerator.state.deepspeed_plugin is not None:
            raise UserError(f"{path}: written by a ddp run; resume it with distributed.backend: ddp")
        model = self.accelerator.unwrap_model(self.model)
        if (path / "adapter_model.safetensors").is_file():  # a LoRA policy: only the adapter was saved
            from peft import set_peft_model_state_dict

            set_peft_model_state_dict(model.lm, load_file(str(path / "adapter_model.safetensors")))
        else:
            model.lm.load_state_dict(load_file(str(path / "model.safetensors")), strict=False)
        if model.value_head is not None and (path / "value_head.safetensors").is_file():
            result = model.load_state_dict(load_file(str(path / "value_head.safetensors")), strict=False)
            if result.unexpected_keys or any(not k.startswith("lm.") for k in result.missing_keys):
                raise UserError(f"{path / 'value_head.safetensors'}: does not match the critic of this recipe "
                                f"(algo.critic); unexpected {result.unexpected_keys[:3]}, missing "
                                f"{[k for k in result.missing_keys if not k.startswith('lm.')][:3]}")
        try:  # tensors, numbers, lists and dicts only: a checkpoint from elsewhere cannot run code when loaded
            state = torch.load(path / "optimizer.pt", weights_only=True)
        except pickle.UnpicklingError as exc:
            raise UserError(f"{path / 'optimizer.pt'}: refused: it holds objects other than tensors, numbers and "
                            f"containers ({first_line(exc)[:120]}); it is not an aligntool checkpoint") from None
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        random.setstate(state["py_rng"])
        self.state = json.loads((path / "state.json").read_text())

    # --------------------------------------------------------------------------------------------------- loop
    def log(self, row: dict) -> None:
        if not self.accelerator.is_main_process:
            return
        from aligntool.outputs import append_metrics

        append_metrics(self.metrics_file, {"step": self.state["iteration"], **row})
        for k, v in row.items():
            if isinstance(v, (int, float)):
                self.tb.add_scalar(f"train/{k}", v, self.state["iteration"])

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

        prompts = self.batch_prompts()
        self._calls = 0
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
        stats = {k: float(v) for k, v in stats.items()}
        if self.world > 1:  # log the mean over all processes' prompts, not rank 0's alone
            keys = sorted(stats)
            mean = self.accelerator.reduce(torch.tensor([stats[k] for k in keys], device=self.accelerator.device),
                                           "mean")
            stats = dict(zip(keys, mean.tolist()))
        stats["kl_coef"] = self.state["kl_coef"]
        stats["learning_rate"] = self.scheduler.get_last_lr()[0]
        if self.state["iteration"] % max(1, self.args.logging_steps) == 0 or self.state["iteration"] == 1:
            self.log(stats)
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
                    raise preemption.Preempted(self.state["iteration"], str(ckpt))
                bar.set_postfix({k: f"{last[k]:.2f}" for k in ("reward", "loss", "kl") if k in last})
        wall = time.time() - start
        lm_state, _ = self._whole_state()
        if self.accelerator.is_main_process:
            self._save_model(self.out, lm_state)
            if self.tb:
                self.tb.close()
        self.accelerator.wait_for_everyone()
        from aligntool.outputs import summary

        done = self.state["iteration"] - start_iteration
        return summary(self.run.loaded.spec.name, "online", self.state["iteration"], wall,
                       done * self.batch_size * self.world, self.world, last, resumed_from)


def accelerator_for(args):
    """The run's Accelerator, made as transformers' Trainer makes its own from the same TrainingArguments: precision,
    the DeepSpeed plugin of their DeepSpeed config, the FSDP plugin of their FSDP keywords. On a multi-process CPU
    run with DeepSpeed or FSDP the process state that aligntool.launch.distributed.setup configured is reused."""
    from accelerate import Accelerator

    kwargs = {"mixed_precision": args.mixed_precision, "deepspeed_plugin": args.deepspeed_plugin}
    if args.fsdp_plugin_args is not None:
        from accelerate.utils import FullyShardedDataParallelPlugin

        kwargs["fsdp_plugin"] = FullyShardedDataParallelPlugin(**args.fsdp_plugin_args)
    elif args.deepspeed_plugin is None and not torch.cuda.is_available():
        kwargs["cpu"] = True
    return Accelerator(**kwargs)


def check_finite(*tensors: torch.Tensor) -> None:
    for t in tensors:
        if t is not None and not bool(torch.isfinite(t).all()):
            raise FloatingPointError("non-finite")


def sequence_kl(ro: Rollout) -> torch.Tensor:
    return ((ro.logp - ro.logp_ref) * ro.mask).sum(-1)


def minibatches(n: int, size: int, generator: torch.Generator):
    perm = torch.randperm(n, generator=generator)
    for i in range(0, n, size):
        yield perm[i : i + size]

