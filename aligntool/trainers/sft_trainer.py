"""DCOSFTTrainer: TRL's SFTTrainer (its data path, collator, fused LM head) with the per-sequence Direct Coverage
Optimization loss in place of token cross-entropy. The recipe section and the paper are in
``aligntool/trainers/sft.py``; the loss is ``aligntool.losses.sft.dco_loss``."""

from __future__ import annotations

from trl import SFTTrainer

from aligntool.losses.sft import dco_gradient_factor, dco_loss


class DCOSFTTrainer(SFTTrainer):
    # the loss is a mean over this micro-batch's sequences: Trainer divides it by the accumulation steps
    loss_is_scaled_for_ga = False

    def __init__(self, *args, algo, **kwargs):
        self.algo = algo
        super().__init__(*args, **kwargs)
        if self.padding_free:
            raise ValueError("loss 'dco' scores whole sequences: padding-free batches (train.padding_free) are not "
                             "supported")

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """mean over the batch's sequences of dco_loss(log p_hat(y|x), N), log p_hat = sum of the log-probs of the
        tokens whose label is not -100 (TRL's completion mask under completion_only_loss)."""
        mode = "train" if self.model.training else "eval"
        inputs["use_cache"] = False
        if self.aux_loss_enabled:  # MoE: the router's load-balancing loss, as TRL's SFTTrainer adds it
            inputs["output_router_logits"] = True
        outputs = model(**inputs, fused_lm_head=True)  # per-token log-probs, zero where the label is -100
        logp = outputs.log_probs.sum(-1)
        has_tokens = outputs.label_mask.any(-1)
        per_seq = dco_loss(logp, self.algo.pass_n) * has_tokens
        loss = per_seq.sum() / has_tokens.sum().clamp(min=1)
        if self.aux_loss_enabled:  # a per-micro-batch mean, like the DCO mean above
            loss = loss + self.router_aux_loss_coef * outputs.aux_loss
            metrics_aux = self.accelerator.gather_for_metrics(outputs.aux_loss.detach()).mean().item()
            self._metrics[mode]["aux_loss"].append(metrics_aux)

        gather = self.accelerator.gather_for_metrics
        n_valid = gather(outputs.label_mask.sum()).sum()
        metrics = self._metrics[mode]
        metrics["entropy"].append((gather(outputs.entropy.detach().sum()).sum() / n_valid).item()
                                  if n_valid > 0 else 0.0)
        metrics["mean_token_accuracy"].append((gather(outputs.is_top1.sum()).sum() / n_valid).item()
                                              if n_valid > 0 else 0.0)
        seq_logp = gather(logp.detach())[gather(has_tokens)]  # same shape on every rank, masked after
        if seq_logp.numel():
            metrics["dco/p_hat"].append(seq_logp.exp().mean().item())
            metrics["dco/grad_factor"].append(dco_gradient_factor(seq_logp, self.algo.pass_n).mean().item())
        if mode == "train":
            self._total_train_tokens += gather(inputs["attention_mask"].sum()).sum().item() // self._tp_size
        metrics["num_tokens"] = [self._total_train_tokens]
        return (loss, outputs) if return_outputs else loss
