"""HyPO: Hybrid Preference Optimization (Song et al. 2024, "The Importance of Online Data", arXiv 2406.01462).

    L(theta) = L_DPO(theta; offline pairs) + lam * KL(pi_theta(.|x) || pi_ref(.|x))

The reverse KL is estimated on fresh, unlabelled samples y ~ pi_theta(.|x) for the prompts x of each batch: k samples
per prompt (temperature 1, no top-k/top-p, so the samples are exactly on-policy), reward r = -(log pi - log pi_ref)
summed over the sequence, and the RLOO score-function gradient with a leave-one-out baseline
(aligntool.losses.preference.rloo_kl_loss). No reward model and no labels are needed online.

Open details (the paper publishes no code): the KL is sequence-level; lam and k are options (defaults
lam = 0.05, k = 2); the DPO part is TRL's sigmoid loss with ``beta``. With ``num_kl_prompts`` the KL term uses only
the first prompts of each batch, to bound generation cost.
"""

from __future__ import annotations

from pydantic import Field

from aligntool.recipe.schema import Strict


class AlgoConfig(Strict):
    beta: float = Field(0.1, gt=0, description="DPO beta.")
    kl_coef: float = Field(0.05, ge=0, description="lambda: weight of the online KL(pi || pi_ref) term.")
    kl_samples: int = Field(2, ge=2, description="k: on-policy samples per prompt for the RLOO estimator (>= 2).")
    num_kl_prompts: int | None = Field(None, gt=0, description="Use only this many prompts of each batch (default all).")
    max_new_tokens: int = Field(48, gt=0, description="Length limit of the online samples.")

    def trl_kwargs(self) -> dict:
        return {"beta": self.beta, "loss_type": "sigmoid"}


def build(run):
    import torch
    import torch.nn.functional as F

    from aligntool.losses.preference import rloo_kl_loss
    from aligntool.sampling import generate_from_ids, sequence_logprobs
    from aligntool.trainers.pairwise import PairLossTrainer

    cfg: AlgoConfig = run.algo
    tok = run.tokenizer

    class HyPOTrainer(PairLossTrainer):
        def pair_loss(self, b):
            lr_w = b["chosen_logps"] - b["ref_chosen_logps"]
            lr_l = b["rejected_logps"] - b["ref_rejected_logps"]
            loss = -F.logsigmoid(cfg.beta * (lr_w - lr_l))
            return loss, {"rewards/chosen": cfg.beta * lr_w.detach(), "rewards/rejected": cfg.beta * lr_l.detach(),
                          "rewards/accuracies": (lr_w > lr_l).float(), "rewards/margins": cfg.beta * (lr_w - lr_l),
                          "hypo/dpo_loss": loss}

        def _compute_loss(self, model, inputs, return_outputs):
            loss = super()._compute_loss(model, inputs, False)
            if cfg.kl_coef == 0 or not self.model.training:
                return loss
            mode = "train"
            half = inputs["input_ids"].shape[0] // 2
            prompts = []
            for row, mask in zip(inputs["input_ids"][:half], inputs["completion_mask"][:half]):
                start = int(mask.nonzero()[0]) if mask.any() else int(inputs["attention_mask"][0].sum())
                prompts.append(row[:start].tolist())
            prompts = prompts[: cfg.num_kl_prompts] if cfg.num_kl_prompts else prompts
            repeated = [p for p in prompts for _ in range(cfg.kl_samples)]
            policy = self.accelerator.unwrap_model(model)
            samples = generate_from_ids(policy, repeated, tok.pad_token_id, tok.eos_token_id, cfg.max_new_tokens)
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
            self._metrics[mode]["hypo/kl"].append(self.accelerator.gather_for_metrics(kl.reshape(1)).mean().item())
            lengths = torch.tensor([len(s) for s in samples], dtype=torch.float)
            self._metrics[mode]["hypo/sample_length"].append(lengths.mean().item())
            return loss + cfg.kl_coef * kl_loss

    return HyPOTrainer(model=run.policy(), ref_model=run.reference(), args=run.trl_config(),
                       train_dataset=run.train_dataset, eval_dataset=run.eval_dataset, processing_class=tok,
                       peft_config=run.peft_config())
