"""A DPOTrainer whose loss is ours: TRL does the data (tokenising, [chosen; rejected] batches, reference log-probs,
precomputation, distributed, logging); the subclass only maps sequence log-probs to a loss.

Subclasses set ``extra_columns`` (per-pair float columns handed to the loss, e.g. SPPO's win rates),
``uses_reference`` and implement ``pair_loss(batch) -> (per-pair losses, {metric: tensor})``; the method's recipe
section is ``self.algo`` (``PairLossTrainer(..., algo=run.algo)``). ``batch`` holds
``chosen_logps``, ``rejected_logps`` (summed over completion tokens), ``ref_chosen_logps``/``ref_rejected_logps``
when a reference is used, ``chosen_tokens``/``rejected_tokens`` (completion lengths) and the extra columns.
"""

from __future__ import annotations

import torch
from trl import DPOTrainer

from aligntool.trainers.base.refcache import RefLogpsCache


class ExtraColumnsCollator:
    """Wraps TRL's preference collator and adds float tensors for ``keys`` (TRL's collator drops unknown keys)."""

    def __init__(self, inner, keys):
        self.inner, self.keys = inner, tuple(keys)

    def __call__(self, examples):
        batch = self.inner(examples)
        for key in self.keys:
            batch[key] = torch.tensor([float(e[key]) for e in examples])
        return batch


class PairLossTrainer(RefLogpsCache, DPOTrainer):
    """``algo`` is the method's recipe section (its AlgoConfig): the loss reads its settings from ``self.algo``."""

    extra_columns: tuple[str, ...] = ()
    uses_reference: bool = True

    def __init__(self, *args, algo=None, **kwargs):
        self.algo = algo
        super().__init__(*args, **kwargs)
        if self.extra_columns:
            self.data_collator = ExtraColumnsCollator(self.data_collator, self.extra_columns)
        if not self.uses_reference and not self.precompute_ref_logps:
            self.ref_model = None  # TRL built one; a reference-free loss never calls it

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        self._signature_columns = list(self._signature_columns) + [
            c for c in self.extra_columns if c not in self._signature_columns
        ]

    def pair_loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError

    def _compute_loss(self, model, inputs, return_outputs):
        mode = "train" if self.model.training else "eval"
        keys = {"completion_mask", "ref_chosen_logps", "ref_rejected_logps", *self.extra_columns}
        model_kwargs = {k: v for k, v in inputs.items() if k not in keys}
        model_kwargs["use_cache"] = False
        completion_mask = inputs["completion_mask"]
        labels = inputs["input_ids"].masked_fill(completion_mask == 0, -100)
        outputs = model(**model_kwargs, labels=labels, fused_lm_head=True)
        seq_len = completion_mask.size(1) - 1
        logps = outputs.log_probs[:, -seq_len:].sum(dim=1)
        tokens = completion_mask[:, 1:].sum(dim=1)
        batch = {}
        batch["chosen_logps"], batch["rejected_logps"] = logps.chunk(2, dim=0)
        batch["chosen_tokens"], batch["rejected_tokens"] = tokens.chunk(2, dim=0)
        if self.uses_reference:
            if self.precompute_ref_logps:
                ref = inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
            else:
                # no_grad inside; with LoRA and no reference model TRL disables the adapter on the policy
                ref = self.compute_ref_log_probs(self.model if self.ref_model is None else self.ref_model, inputs)
            batch["ref_chosen_logps"], batch["ref_rejected_logps"] = ref
        for key in self.extra_columns:
            batch[key] = inputs[key].to(logps.dtype)

        per_pair, metrics = self.pair_loss(batch)
        loss = per_pair.mean()
        metrics = {"logps/chosen": batch["chosen_logps"], "logps/rejected": batch["rejected_logps"], **metrics}
        for name, value in metrics.items():
            value = self.accelerator.gather_for_metrics(value.detach().float().reshape(-1))
            self._metrics[mode][name].append(value.mean().item())
        if mode == "train":
            n = self.accelerator.gather_for_metrics(inputs["attention_mask"].sum()).sum().item()
            self._total_train_tokens += n
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
        return (loss, outputs) if return_outputs else loss
