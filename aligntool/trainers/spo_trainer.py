"""SPOTrainer: TRL's DPOTrainer plus SPO's self-supervised degree loss (Li et al. 2024, "Self-supervised Preference
Optimization: Enhance Your Language Model with Preference Degree Awareness", arXiv 2409.17791). The recipe section,
the degraded data and the paper's open details are in ``aligntool/trainers/spo.py``."""

from __future__ import annotations

import torch
from trl import DPOTrainer

from aligntool.losses.preference import spo_ssl_loss

SPO_HEAD_FILE = "spo_head.safetensors"


def _full_state(module) -> dict:
    """``module``'s weights as whole CPU tensors on every rank: gathered from ZeRO-3 partitions or FSDP2 shards
    (collective calls: every rank must call this)."""
    import contextlib

    params = list(module.parameters())
    gather = contextlib.nullcontext()
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        gather = deepspeed.zero.GatheredParameters(params)
    with gather:
        return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().cpu().clone().contiguous()
                for k, v in module.state_dict().items()}


class SPOTrainer(DPOTrainer):
    """TRL's DPOTrainer (any DPO loss type) + lam * SPO's self-supervised degree loss.

    ``spo_columns`` name the dataset columns holding the degraded responses' token ids (``spo_<src>_<d>``);
    ``algo`` is the recipe's ``algo`` section (``spo.AlgoConfig``, not imported here: spo.py imports this module).
    The degree head is registered on the policy as ``spo_head`` before TRL wraps it (LoRA adapters, DDP, DeepSpeed,
    FSDP all see it)."""

    def __init__(self, *args, algo, spo_columns: list[str], **kwargs):
        policy = kwargs["model"]
        with torch.random.fork_rng(devices=[]):  # the same head on every rank and in every run of a recipe
            torch.manual_seed(kwargs["args"].seed)
            policy.spo_head = torch.nn.Linear(policy.config.hidden_size, len(algo.removal_ratios),
                                              dtype=next(policy.parameters()).dtype)
        policy._keys_to_ignore_on_save = {*(policy._keys_to_ignore_on_save or ()), "spo_head.weight",
                                          "spo_head.bias"}
        self.spo_head, self.algo, self.spo_columns = policy.spo_head, algo, spo_columns
        super().__init__(*args, **kwargs)
        # peft freezes everything that is not an adapter; with ssl_weight 0 the head is unused (and DDP would wait
        # for its gradient)
        self.spo_head.requires_grad_(algo.ssl_weight > 0)
        inner = self.data_collator

        def collate(examples):
            batch = inner(examples)
            batch["spo"] = [[e[c] for c in spo_columns] for e in examples]
            batch["spo_prompt"] = [e["prompt_ids"] for e in examples]
            return batch

        self.data_collator = collate

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        self._signature_columns = list(self._signature_columns) + self.spo_columns

    def _compute_loss(self, model, inputs, return_outputs):
        cfg, tok = self.algo, self.processing_class
        degrees = len(cfg.removal_ratios)
        spo, prompts = inputs.pop("spo"), inputs.pop("spo_prompt")
        loss = super()._compute_loss(model, inputs, False)
        if cfg.ssl_weight == 0:
            return loss
        seqs, labels = [], []
        for prompt, variants in zip(prompts, spo):
            for j, completion in enumerate(variants):
                seqs.append(prompt + completion)
                labels.append(j % degrees)
        width = max(map(len, seqs))
        ids = torch.full((len(seqs), width), tok.pad_token_id)
        mask = torch.zeros_like(ids)
        for i, seq in enumerate(seqs):
            ids[i, : len(seq)], mask[i, : len(seq)] = torch.tensor(seq), 1
        device = inputs["input_ids"].device
        out = model(input_ids=ids.to(device), attention_mask=mask.to(device), output_hidden_states=True)
        last = out.hidden_states[-1][torch.arange(len(seqs)), mask.sum(1).to(device) - 1]
        logits = self.spo_head(last.to(self.spo_head.weight.dtype)).float()
        target = torch.tensor(labels, device=device)
        ssl = spo_ssl_loss(logits, target).mean()
        mode = "train" if self.model.training else "eval"
        self._metrics[mode]["spo/ssl_loss"].append(ssl.item())
        self._metrics[mode]["spo/degree_accuracy"].append((logits.argmax(-1) == target).float().mean().item())
        return loss + cfg.ssl_weight * ssl

    def save_model(self, output_dir=None, _internal_call=False):
        super().save_model(output_dir, _internal_call)
        state = _full_state(self.spo_head)  # every rank: a collective under ZeRO-3 / FSDP
        if output_dir and self.is_world_process_zero():
            from safetensors.torch import save_file

            save_file(state, f"{output_dir}/{SPO_HEAD_FILE}")

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        load_head(self.spo_head, resume_from_checkpoint)


def load_head(head: torch.nn.Module, folder) -> None:
    """Restore the degree head from ``folder/spo_head.safetensors`` (a checkpoint or a finished SPO run). Sharded
    heads (FSDP2, ZeRO-3) are left alone: their checkpoint is the framework's, which holds the head like any weight."""
    from pathlib import Path

    from safetensors.torch import load_file

    from aligntool.errors import UserError

    if any(hasattr(p, "full_tensor") or hasattr(p, "ds_id") for p in head.parameters()):
        return
    path = Path(folder) / SPO_HEAD_FILE
    if not path.is_file():
        raise UserError(f"--resume: {folder} has no {SPO_HEAD_FILE} (not a checkpoint of an SPO run)")
    state = load_file(str(path))
    with torch.no_grad():
        for name, param in head.named_parameters():
            param.copy_(state[name].to(param.dtype))
