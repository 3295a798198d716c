"""dpo_family_loss (the DPO-family losses of the online methods) against TRL's own DPOTrainer loss, for every loss type
TRL lists: TRL computes its loss from a real batch and two real models; we compute the sequence log-probs of the same
batch with a plain forward and call dpo_family_loss. A loss type TRL adds and we lack fails here."""

import copy
import re

import pytest
import torch

from aligntool.losses.preference import dpo_family_loss

pytestmark = pytest.mark.slow


def trl_loss_types() -> list[str]:
    from trl import DPOConfig

    help_text = DPOConfig.__dataclass_fields__["loss_type"].metadata["help"]
    types = re.findall(r"`'(\w+)'`", help_text)
    assert len(types) >= 15, help_text  # TRL 1.16 lists 15
    return types


def sequence_logps(model, batch):
    """Summed completion log-probs (float64) of the [chosen; rejected] batch TRL's collator built, and lengths."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()
    logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, batch["input_ids"][:, 1:, None])[..., 0]
    mask = batch["completion_mask"][:, 1:].double()
    (chosen, rejected), (n_chosen, n_rejected) = (logp * mask).sum(1).chunk(2), mask.sum(1).chunk(2)
    return chosen, rejected, n_chosen, n_rejected


def test_every_trl_dpo_loss_type_matches_trls_dpo_trainer(tmp_path, tiny_path):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from aligntool.toy import world

    tok = AutoTokenizer.from_pretrained(tiny_path)
    rows = world.preference_pairs(4, seed=3)  # completions of different lengths: sft and ipo reductions matter
    data = Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows])
    torch.manual_seed(0)
    reference = AutoModelForCausalLM.from_pretrained(tiny_path).eval()
    with torch.no_grad():  # a reference that differs from the policy: non-zero log-ratios
        for p in reference.parameters():
            p.add_(0.02 * torch.randn_like(p))
    policy = AutoModelForCausalLM.from_pretrained(tiny_path).eval()
    beta, eps, tau = 0.5, 0.1, 0.05
    batch = None
    for loss_type in trl_loss_types():
        args = DPOConfig(output_dir=str(tmp_path), loss_type=[loss_type], beta=beta, label_smoothing=eps,
                         discopop_tau=tau, per_device_train_batch_size=4, report_to=[], use_cpu=True, bf16=False,
                         max_length=64)
        trainer = DPOTrainer(model=copy.deepcopy(policy), ref_model=copy.deepcopy(reference), args=args,
                             train_dataset=data, processing_class=tok)
        trainer.model.eval()
        step = next(iter(trainer.get_train_dataloader()))
        if batch is None:
            batch = step
            lp_w, lp_l, n_w, n_l = sequence_logps(policy, batch)
            ref_w, ref_l, _, _ = sequence_logps(reference, batch)
            assert len(set(n_w.tolist())) > 1
        assert torch.equal(step["input_ids"], batch["input_ids"])
        with torch.no_grad():
            expected = float(trainer._compute_loss(trainer.model, dict(step), False))
        # DPOTrainer's ipo is the per-token form; the online methods default to the paper's sequence form
        ours = dpo_family_loss(loss_type, beta, lp_w, lp_l, ref_w, ref_l, n_w, n_l, eps, tau,
                               ipo_length_normalized=True).mean().item()
        assert ours == pytest.approx(expected, rel=2e-5, abs=1e-6), loss_type
