"""HyPOTrainer: TRL's DPO data path with the sigmoid loss, plus lam * KL(pi || pi_ref) estimated on fresh on-policy
samples of each batch's prompts with the RLOO estimator (aligntool.losses.preference.rloo_kl_loss). The recipe
section and the paper are in ``aligntool/trainers/hypo.py``."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from aligntool.losses.preference import rloo_kl_loss
from aligntool.sampling import generate_from_ids, sequence_logprobs
from aligntool.tokens import stop_ids
from aligntool.trainers.base.pairwise import PairLossTrainer


class HyPOTrainer(PairLossTrainer):
    def pair_loss(self, b):
        beta = self.algo.beta
        lr_w = b["chosen_logps"] - b["ref_chosen_logps"]
        lr_l = b["rejected_logps"] - b["ref_rejected_logps"]
        loss = -F.logsigmoid(beta * (lr_w - lr_l))
        return loss, {"rewards/chosen": beta * lr_w.detach(), "rewards/rejected": beta * lr_l.detach(),
                      "rewards/accuracies": (lr_w > lr_l).float(), "rewards/margins": beta * (lr_w - lr_l),
                      "hypo/dpo_loss": loss}

    def prompts_of(self, inputs) -> list[list[int]]:
        """The prompt token ids of the batch's pairs (the chosen half of TRL's [chosen; rejected] batch)."""
        half = inputs["input_ids"].shape[0] // 2
        prompts = []
        for row, mask in zip(inputs["input_ids"][:half], inputs["completion_mask"][:half]):
            start = int(mask.nonzero()[0]) if mask.any() else int(inputs["attention_mask"][0].sum())
            prompts.append(row[:start].tolist())
        return prompts[: self.algo.num_kl_prompts] if self.algo.num_kl_prompts else prompts

    def _compute_loss(self, model, inputs, return_outputs):
        cfg, tok = self.algo, self.processing_class
        loss = super()._compute_loss(model, inputs, False)
        if cfg.kl_coef == 0 or not self.model.training:
            return loss
        prompts = self.prompts_of(inputs)
        repeated = [p for p in prompts for _ in range(cfg.kl_samples)]
        policy = self.accelerator.unwrap_model(model)
        samples = generate_from_ids(policy, repeated, tok.pad_token_id, stop_ids(tok), cfg.max_new_tokens)
        logp = sequence_logprobs(model, tok, repeated, samples, batch_size=len(repeated), grad=True)
        with torch.no_grad():
            if self.ref_model is None and hasattr(policy, "disable_adapter"):  # LoRA: the reference is the base
                with policy.disable_adapter():
                    logp_ref = sequence_logprobs(policy, tok, repeated, samples, batch_size=len(repeated), grad=True)
            else:
                logp_ref = sequence_logprobs(self.ref_model, tok, repeated, samples, batch_size=len(repeated),
                                             grad=True)
        logratio = (logp - logp_ref).view(len(prompts), cfg.kl_samples)
        kl_loss, kl = rloo_kl_loss(logp.view(len(prompts), cfg.kl_samples), logratio)
        self._metrics["train"]["hypo/kl"].append(self.accelerator.gather_for_metrics(kl.reshape(1)).mean().item())
        lengths = torch.tensor([len(s) for s in samples], dtype=torch.float)
        self._metrics["train"]["hypo/sample_length"].append(lengths.mean().item())
        return loss + cfg.kl_coef * kl_loss
