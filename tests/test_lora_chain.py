"""A LoRA run started from another LoRA run's output (SFT adapter -> DPO): what is saved is what was trained.

Issue 26 item 2: the DPO adapter used to name the first base as its own, so eval / merge-lora / bon loaded base + DPO
adapter and silently dropped the SFT stage; full fine-tuning of an adapter output failed ("element 0 of tensors does
not require grad")."""

from __future__ import annotations

import json

import pytest
import torch

from aligntool import models
from aligntool.recipe.loader import load_recipe
from aligntool.train import Run, train

FAST = ["train.max_steps=2", "train.per_device_train_batch_size=4", "train.logging_steps=1", "train.save_steps=100",
        "dataset.toy.size=16", "dataset.toy.eval_size=0", "train.learning_rate=5e-3"]


def _adapter(folder) -> bool:
    return (folder / "adapter_config.json").is_file() and not (folder / "config.json").is_file()


def _logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def _capture_fit(monkeypatch):
    """Keep the trainer each Run.fit trains (its model is the policy as trained)."""
    seen = []
    fit = Run.fit

    def keep(self, trainer):
        seen.append(trainer)
        return fit(self, trainer)

    monkeypatch.setattr(Run, "fit", keep)
    return seen


@pytest.fixture(scope="module")
def sft_adapter(tmp_path_factory):
    out = tmp_path_factory.mktemp("sft") / "run"
    train(load_recipe("sft", [*FAST, "peft.r=8", f"output_dir={out}"]))
    assert _adapter(out)
    return out


@pytest.mark.slow
def test_lora_dpo_on_a_lora_sft_output_saves_what_it_trained(sft_adapter, tmp_path, tiny_path, monkeypatch):
    from peft import PeftModel

    seen = _capture_fit(monkeypatch)
    out = tmp_path / "dpo"
    train(load_recipe("dpo", [*FAST, "peft.r=8", f"model.name_or_path={sft_adapter}", f"output_dir={out}"]))
    policy = seen[-1].model
    ids = torch.tensor([[1, 5, 9, 13, 2, 7, 11, 3]])
    trained = _logits(policy, ids)
    # the reference of the run (the adapter disabled) is the SFT model: base + SFT adapter
    with policy.disable_adapter():
        reference = _logits(policy, ids)
    sft = _logits(models.load_model(str(sft_adapter)), ids)
    assert torch.allclose(reference, sft, atol=1e-5)
    # the saved adapter names the merged SFT model as its base; loaded as eval / bon / merge-lora do: the policy
    base = json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert base == str((out / "merged_base").resolve()), base
    loaded = _logits(models.load_model(str(out)), ids)
    assert torch.allclose(loaded, trained, atol=1e-4), (loaded - trained).abs().max()
    merged = _logits(models.merged_adapter(str(out)), ids)  # what merge-lora writes
    assert torch.allclose(merged, trained, atol=1e-4)
    # and the SFT stage matters: the first base + the DPO adapter alone is another model
    first = json.loads((sft_adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    dropped = _logits(PeftModel.from_pretrained(models.load_model(first), str(out)).merge_and_unload(), ids)
    assert (dropped - trained).abs().max() > 1e-2


@pytest.mark.slow
def test_full_fine_tuning_of_a_lora_output_trains(sft_adapter, tmp_path, monkeypatch):
    seen = _capture_fit(monkeypatch)
    out = tmp_path / "dpo_full"
    result = train(load_recipe("dpo", [*FAST, f"model.name_or_path={sft_adapter}", f"output_dir={out}"]))
    assert result["global_step"] == 2
    trainer = seen[-1]
    ids = torch.tensor([[1, 5, 9, 13, 2, 7, 11, 3]])
    sft = _logits(models.load_model(str(sft_adapter)), ids)
    assert torch.allclose(_logits(trainer.ref_model, ids), sft, atol=1e-5)  # the reference is the SFT model
    assert (out / "config.json").is_file() and not _adapter(out)  # a full model, not an adapter
    saved = _logits(models.load_model(str(out)), ids)
    assert torch.allclose(saved, _logits(trainer.model, ids), atol=1e-4)
    assert (saved - sft).abs().max() > 1e-3  # it trained


@pytest.mark.slow
def test_a_reward_models_adapter_continues_as_a_reward_model_and_is_refused_as_a_policy(tmp_path, tiny_path):
    from conftest import user_error

    fast = [*FAST, "peft.r=8"]
    first = tmp_path / "rm"
    train(load_recipe("reward", [*fast, f"output_dir={first}"]))
    second = tmp_path / "rm2"
    assert train(load_recipe("reward", [*fast, f"model.name_or_path={first}", f"output_dir={second}"]))[
        "global_step"] == 2
    assert json.loads((second / "adapter_config.json").read_text())["base_model_name_or_path"] == \
        str((second / "merged_base").resolve())
    assert models.architectures(str(second / "merged_base")) == ["LlamaForSequenceClassification"]
    message = user_error(train, load_recipe("dpo", [*FAST, f"model.name_or_path={first}",
                                                    f"output_dir={tmp_path / 'dpo'}"]))
    assert "is a LoRA adapter of a reward model" in message and not (tmp_path / "dpo" / "merged_base").exists()
