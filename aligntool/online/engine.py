"""The rollout engine shared by every online method (PPO, P3O, ReMax; later online DPO, XPO, INPO).

One loop, built on transformers (``generate`` with the KV cache, models, schedulers) and accelerate (devices, DDP,
gradient sync): each iteration takes ``per_device_train_batch_size`` prompts per process, lets the method roll out
and update (``method.step(engine, prompts)``), logs, and checkpoints. What the engine provides to methods:

- ``rollout(prompts, greedy=False)``: samples (or greedy decodes) one response per prompt, trims it after EOS, scores
  it with the recipe's reward source and returns token tensors: response ids and mask, old log-probs, reference
  log-probs, per-sequence scores, values when the policy has a value head;
- ``forward(batch)``: per-token log-probs (and values) of a rollout batch under the current policy, with grad;
- ``optimizer_step(loss)``: backward, gradient clipping, optimizer and scheduler step.

Layout of a rollout batch: prompts left-padded to width P, responses right-padded to width R; token j of the response
sits at position P + j and is predicted from position P + j - 1. Position ids follow the attention mask.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from pydantic import Field

from aligntool.errors import UserError, first_line
from aligntool.recipe.schema import Strict


class OnlineConfig(Strict):
    """Rollout settings every online method shares (its ``algo`` section extends these)."""

    max_new_tokens: int = Field(48, gt=0, description="Response length limit.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature of rollouts (1 = on-policy).")
    top_p: float = Field(1.0, gt=0, le=1)
    missing_eos_penalty: float | None = Field(None, ge=0, description="Subtracted from the score of responses cut off "
                                              "before EOS (for online_dpo / xpo: from the preference scores, as TRL).")
    disable_dropout: bool = Field(True, description="Dropout off in the policy (LoRA's included) and the reference, as "
                                  "TRL's trainers default: rollouts are scored in eval mode and updated in train mode, "
                                  "so with dropout the PPO/P3O ratio would not be 1 at the sampling policy.")

    def trl_kwargs(self) -> dict:
        return {}


class PolicyWithValue(nn.Module):
    """A causal LM plus an optional scalar value head, as one module so DDP syncs both. The head reads the policy's
    own last hidden state (``critic="shared"``, trlx style) or that of a separate critic LM initialised as a copy of
    the policy (``critic="separate"``, InstructGPT / OpenRLHF style: twice the weights, no policy-value interference)."""

    def __init__(self, lm, value_head: bool, critic: str = "shared"):
        super().__init__()
        self.lm = lm
        self.critic_lm = None
        self.value_head = nn.Linear(lm.config.hidden_size, 1) if value_head else None
        if self.value_head is not None:
            nn.init.zeros_(self.value_head.weight)
            nn.init.zeros_(self.value_head.bias)
            if critic == "separate":
                import copy

                self.critic_lm = copy.deepcopy(lm)

    def forward(self, input_ids, attention_mask, position_ids):
        shared = self.value_head is not None and self.critic_lm is None
        out = self.lm(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                      output_hidden_states=shared, use_cache=False)
        values = None
        if self.value_head is not None:
            hidden = out.hidden_states[-1] if shared else self.critic_lm(
                input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                output_hidden_states=True, use_cache=False).hidden_states[-1]
            values = self.value_head(hidden.float()).squeeze(-1)
        return out.logits, values

    def value_state(self) -> dict:
        """Everything of the critic that is not the policy (saved beside the policy in checkpoints)."""
        state = {f"value_head.{k}": v for k, v in self.value_head.state_dict().items()}
        if self.critic_lm is not None:
            state.update({f"critic_lm.{k}": v for k, v in self.critic_lm.state_dict().items()})
        return {k: v.detach().contiguous().clone() for k, v in state.items()}


@dataclass
class Rollout:
    input_ids: torch.Tensor  # (B, P + R)
    attention_mask: torch.Tensor
    prompt_width: int
    mask: torch.Tensor  # (B, R) response tokens
    logp: torch.Tensor  # (B, R) under the policy that sampled
    logp_ref: torch.Tensor  # (B, R)
    score: torch.Tensor | None  # (B,) reward source; None when the method labels pairs with a preference source
    values: torch.Tensor | None
    texts: list[str]
    prompts: list[str]
    missing_eos: torch.Tensor | None = None  # (B,) bool: the response was cut off before EOS

    def select(self, idx) -> "Rollout":
        pick = lambda t: None if t is None else t[idx]  # noqa: E731
        idx_list = idx.tolist() if isinstance(idx, torch.Tensor) else list(idx)
        return Rollout(self.input_ids[idx], self.attention_mask[idx], self.prompt_width, self.mask[idx], self.logp[idx],
                       self.logp_ref[idx], pick(self.score), pick(self.values), [self.texts[i] for i in idx_list],
                       [self.prompts[i] for i in idx_list], pick(self.missing_eos))


def pack(prompt_ids: list[list[int]], responses: list[list[int]], pad_id: int, device="cpu"):
    """The rollout layout: prompts left-padded to width P, responses right-padded to width R (at least 1), so response
    token j of every row sits at position P + j. Returns (input_ids, attention_mask, response mask (B, R), P)."""
    P, R = max(map(len, prompt_ids)), max(1, max(map(len, responses)))
    ids = torch.full((len(prompt_ids), P + R), pad_id)
    attn = torch.zeros_like(ids)
    mask = torch.zeros(len(prompt_ids), R)
    for i, (p, r) in enumerate(zip(prompt_ids, responses)):
        ids[i, P - len(p) : P] = torch.tensor(p)
        attn[i, P - len(p) : P + len(r)] = 1
        if r:
            ids[i, P : P + len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
    return ids.to(device), attn.to(device), mask.to(device), P


def response_logprobs(logits: torch.Tensor, input_ids: torch.Tensor, prompt_width: int):
    """log p of each response token and the per-token entropy of the distribution it was drawn from."""
    logits = logits[:, prompt_width - 1 : -1].float()
    logp_all = torch.log_softmax(logits, -1)
    logp = logp_all.gather(-1, input_ids[:, prompt_width:, None])[..., 0]
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy


class Engine:
    def __init__(self, run, method, value_head: bool = False, critic: str = "shared"):
        from accelerate import Accelerator
        from transformers import get_scheduler

        from aligntool import models, rewards
        from aligntool.recipe.schema import RewardConfig

        self.run, self.method, self.cfg = run, method, run.algo
        if run.recipe.distributed.backend != "ddp":
            raise UserError(f"distributed.backend: the online methods run with ddp only for now, not "
                            f"{run.recipe.distributed.backend}")
        self.args = run.trl_config()  # transformers.TrainingArguments: lr, max_steps (= iterations), batch, seed, ...
        self.accelerator = Accelerator(cpu=not torch.cuda.is_available())
        self.rank, self.world = self.accelerator.process_index, self.accelerator.num_processes
        torch.manual_seed(self.args.seed + self.rank)
        self.tokenizer = run.tokenizer
        lm, lora = run.policy(), run.peft_config()
        if lora is not None:
            from peft import get_peft_model

            if critic == "separate":
                raise UserError("algo.critic: a separate critic is not supported with LoRA; use critic: shared")
            lm = get_peft_model(lm, lora)
        self.model = PolicyWithValue(lm, value_head, critic)
        # with LoRA and no explicit reference, the reference is the policy with its adapter disabled (no second copy)
        explicit = run.reference()
        self.ref = None if lora is not None and explicit is None else (explicit or models.load_model(
            run.model_path, run.recipe.model.dtype, run.recipe.model.trust_remote_code)).eval()
        if self.ref is not None:
            self.ref.requires_grad_(False)
        if getattr(self.cfg, "disable_dropout", True):
            models.disable_dropout(self.model)
            if self.ref is not None:
                models.disable_dropout(self.ref)
        from transformers import Trainer

        # the optimizer train.optim names (AdamW, bitsandbytes 8-bit, Lion, ...), built as the Trainer builds it
        optim_cls, optim_kwargs = Trainer.get_optimizer_cls_and_kwargs(self.args, self.model.lm)
        optim_kwargs = {**optim_kwargs, "lr": self.args.learning_rate}
        self.optimizer = optim_cls(self.model.parameters(), weight_decay=self.args.weight_decay, **optim_kwargs)
        self.iterations = self.args.max_steps if self.args.max_steps > 0 else 100
        self.scheduler = get_scheduler(self.args.lr_scheduler_type, self.optimizer,
                                       num_warmup_steps=self.args.get_warmup_steps(self.iterations * method.updates_per_iteration),
                                       num_training_steps=self.iterations * method.updates_per_iteration)
        self.model, self.optimizer = self.accelerator.prepare(self.model, self.optimizer)
        if self.ref is not None:
            self.ref.to(self.accelerator.device)
        self.scorer = None if getattr(method, "uses_preferences", False) else rewards.load(
            run.recipe.reward or RewardConfig(), device=self.accelerator.device)
        all_prompts = list(dict.fromkeys(run.train_dataset["prompt"]))
        self.prompts = all_prompts[self.rank :: self.world]
        self.batch_size = self.args.per_device_train_batch_size
        self.state = {"iteration": 0, "kl_coef": getattr(self.cfg, "kl_coef", 0.0)}
        self.out = run.output_dir
        self.metrics_file = self.out / "metrics.jsonl"
        self.tb = None
        if self.accelerator.is_main_process:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(self.out / "tensorboard"))

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

    def _pack(self, prompt_ids: list[list[int]], responses: list[list[int]]):
        return pack(prompt_ids, responses, self.tokenizer.pad_token_id, self.accelerator.device)

    @staticmethod
    def positions(attn: torch.Tensor) -> torch.Tensor:
        return (attn.cumsum(-1) - 1).clamp(min=0)

    def forward(self, ro: Rollout, model=None):
        """(log-probs, entropies, values) of ``ro``'s response tokens under the current policy, with grad."""
        logits, values = (model or self.model)(ro.input_ids, ro.attention_mask, self.positions(ro.attention_mask))
        logp, entropy = response_logprobs(logits, ro.input_ids, ro.prompt_width)
        if values is not None:
            values = values[:, ro.prompt_width - 1 : -1]
        return logp, entropy, values

    def _generate(self, lm, prompt_ids: list[list[int]], greedy: bool) -> list[list[int]]:
        from aligntool.sampling import generate_from_ids, trim

        tok, cfg = self.tokenizer, self.cfg
        if not greedy:
            return generate_from_ids(lm, prompt_ids, tok.pad_token_id, tok.eos_token_id, cfg.max_new_tokens,
                                     temperature=cfg.temperature, top_p=cfg.top_p)
        ids, attn, _, P = self._pack(prompt_ids, [[] for _ in prompt_ids])
        out = lm.generate(input_ids=ids[:, :P], attention_mask=attn[:, :P], do_sample=False,
                          max_new_tokens=cfg.max_new_tokens, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        return [trim(r, tok.eos_token_id, tok.pad_token_id) or [tok.eos_token_id] for r in out[:, P:].tolist()]

    @torch.no_grad()
    def rollout(self, prompts: list[str], greedy: bool = False, score_only: bool = False, from_reference: bool = False,
                score: bool = True, policy_logp: bool = True) -> Rollout:
        import contextlib

        tok, cfg = self.tokenizer, self.cfg
        prompt_ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
        lm, context = self.reference() if from_reference else (self.policy_lm, contextlib.nullcontext())
        lm.eval()
        with context:  # XPO samples the reference too
            responses = self._generate(lm, prompt_ids, greedy)
        ids, attn, mask, P = self._pack(prompt_ids, responses)
        texts = [tok.decode(r, skip_special_tokens=True) for r in responses]
        missing_eos = torch.tensor([tok.eos_token_id not in r for r in responses], device=ids.device)
        # methods that compare two samples with a preference source take score=False and label pairs themselves
        if not score:
            score = None
        else:
            score = torch.tensor(self.scorer(prompts, texts), device=ids.device)
        if score is not None and cfg.missing_eos_penalty:
            score = score - cfg.missing_eos_penalty * missing_eos.to(score.dtype)
        ro = Rollout(ids, attn, P, mask, None, None, score, None, texts, prompts, missing_eos)
        if score_only:  # e.g. ReMax's greedy baseline: only its reward is used
            return ro
        if policy_logp:  # methods that take one gradient step right away reuse that forward instead (fill_logp)
            ro.logp, _, ro.values = self.forward(ro, model=self.accelerator.unwrap_model(self.model))
            ro.logp = ro.logp * mask
        ref, context = self.reference()
        with context:
            ref_logits = ref(input_ids=ids, attention_mask=attn, position_ids=self.positions(attn)).logits
        ro.logp_ref, _ = response_logprobs(ref_logits, ids, P)
        ro.logp_ref = ro.logp_ref * mask
        return ro

    def forward_with_grad(self, ro: Rollout) -> torch.Tensor:
        """Per-token log-probs with grad of a rollout made with ``policy_logp=False``; also fills ``ro.logp`` (the
        policy has not changed since sampling, so these are the sampling log-probs too)."""
        logp, _, _ = self.forward(ro)
        ro.logp = logp.detach() * ro.mask
        return logp

    def optimizer_step(self, loss: torch.Tensor) -> float:
        if not torch.isfinite(loss):
            raise FloatingPointError("loss")
        self.model.train()
        self.accelerator.backward(loss)
        norm = self.accelerator.clip_grad_norm_(self.model.parameters(), self.args.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    def rollout_stats(self, ro: Rollout) -> dict:
        kl = ((ro.logp - ro.logp_ref) * ro.mask).sum(-1)
        scored = {} if ro.score is None else {
            "reward": ro.score.mean().item(), "reward_std": ro.score.std().item() if len(ro.score) > 1 else 0.0}
        return {**scored, "kl": kl.mean().item(), "entropy": (-(ro.logp * ro.mask).sum() / ro.mask.sum()).item(),
                "response_length": ro.mask.sum(-1).float().mean().item(),
                "missing_eos": ro.missing_eos.float().mean().item()}

    # ------------------------------------------------------------------------------------------- checkpoints
    def _checkpoint_dir(self) -> Path:
        return self.out / "checkpoints"

    def save_checkpoint(self) -> Path:
        from aligntool.outputs import COMPLETE_MARKER

        it = self.state["iteration"]
        final = self._checkpoint_dir() / f"checkpoint-{it}"
        if self.accelerator.is_main_process:
            tmp = self._checkpoint_dir() / f".tmp-checkpoint-{it}"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            model = self.accelerator.unwrap_model(self.model)
            model.lm.save_pretrained(tmp, safe_serialization=True)
            self.tokenizer.save_pretrained(tmp)  # a checkpoint is a loadable model folder (aligntool eval)
            if model.value_head is not None:
                from safetensors.torch import save_file

                save_file(model.value_state(), str(tmp / "value_head.safetensors"))
            torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                        "rng": torch.get_rng_state(), "py_rng": random.getstate()}, tmp / "optimizer.pt")
            (tmp / "state.json").write_text(json.dumps(self.state))
            (tmp / COMPLETE_MARKER).write_text(f"{it}\n")
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            limit = self.args.save_total_limit
            if limit:
                from aligntool.outputs import complete_checkpoints

                for old in complete_checkpoints(self._checkpoint_dir())[limit:]:
                    shutil.rmtree(old, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        return final

    def load_checkpoint(self, path: Path) -> None:
        from safetensors.torch import load_file

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
        with self.metrics_file.open("a") as fh:
            fh.write(json.dumps({"step": self.state["iteration"], **row}) + "\n")
        for k, v in row.items():
            if isinstance(v, (int, float)):
                self.tb.add_scalar(f"train/{k}", v, self.state["iteration"])

    def _iteration(self, rng: random.Random) -> dict:
        from aligntool.outputs import latest_checkpoint

        prompts = rng.sample(self.prompts, min(self.batch_size, len(self.prompts)))
        try:
            stats = self.method.step(self, prompts)
        except FloatingPointError:
            ckpt = latest_checkpoint(self._checkpoint_dir())
            raise UserError(f"training diverged (non-finite loss) at iteration {self.state['iteration'] + 1}; "
                            f"last checkpoint kept: {ckpt or 'none'}") from None
        self.state["iteration"] += 1
        stats = {k: float(v) for k, v in stats.items()}
        if self.world > 1:  # log the mean over all processes' prompts, not rank 0's alone
            keys = sorted(stats)
            mean = self.accelerator.reduce(torch.tensor([stats[k] for k in keys], device=self.accelerator.device), "mean")
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

        if self.run.resume and (ckpt := latest_checkpoint(self._checkpoint_dir())):
            self.load_checkpoint(ckpt)
            log(f"Resuming from {ckpt} (iteration {self.state['iteration']})")
        rng = random.Random(self.args.seed + 7919 * self.rank + self.state["iteration"])
        start, last = time.time(), {}
        with tqdm(total=self.iterations, initial=self.state["iteration"], desc=self.run.loaded.spec.name,
                  disable=not self.accelerator.is_main_process) as bar:  # closed before any error message
            while self.state["iteration"] < self.iterations:
                last = self._iteration(rng)
                bar.update(1)
                if preemption.requested():
                    ckpt = self.save_checkpoint()
                    raise preemption.Preempted(self.state["iteration"], str(ckpt))
                bar.set_postfix({k: f"{last[k]:.2f}" for k in ("reward", "loss", "kl") if k in last})
        wall = time.time() - start
        if self.accelerator.is_main_process:
            self.policy_lm.save_pretrained(self.out, safe_serialization=True)
            self.tokenizer.save_pretrained(self.out)
            if self.tb:
                self.tb.close()
        self.accelerator.wait_for_everyone()
        from aligntool.train import peak_memory_mb

        return {"algorithm": self.run.loaded.spec.name, "global_step": self.state["iteration"], "train_time_s": round(wall, 2),
                "iterations_per_second": round(self.iterations / wall, 4) if wall else None,
                "peak_memory_mb": round(peak_memory_mb(), 1), "world_size": self.world, "final_metrics": last}


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

