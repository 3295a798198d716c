"""Scale and operations: 8-bit optimizers (bitsandbytes on CPU), ..."""

import pytest
import torch

from aligntool.recipe.loader import load_recipe
from aligntool.train import train
from conftest import REPO

pytestmark = pytest.mark.slow


def quant_state(checkpoint):
    saved = torch.load(checkpoint / "optimizer.pt", weights_only=False)
    state = saved.get("optimizer", saved)["state"]  # the online engine saves {"optimizer": ..., "scheduler": ...}
    return [s["__bnb_optimizer_quant_state__"] for s in state.values() if "__bnb_optimizer_quant_state__" in s]


@pytest.mark.parametrize("optim", ["AdamW8bit", "PagedAdamW8bit", "Lion8bit"])
def test_8bit_optimizers_train_and_keep_uint8_state(tmp_path, tiny_path, optim):
    summary = train(load_recipe(REPO / "recipes" / "sft.yaml", [
        f"output_dir={tmp_path}", f"train.optim={optim}", "train.max_steps=2", "train.save_steps=2",
        "train.eval_strategy=no", "train.per_device_train_batch_size=4", "dataset.toy.size=16",
        "dataset.toy.eval_size=0"]))
    assert summary["global_step"] == 2
    states = quant_state(tmp_path / "checkpoints" / "checkpoint-2")
    assert states and any(t.dtype == torch.uint8 for s in states for t in s.values() if torch.is_tensor(t))


def test_online_engine_uses_the_recipes_optimizer(tmp_path, tiny_path):
    train(load_recipe(REPO / "recipes" / "remax.yaml", [
        f"output_dir={tmp_path}", "train.optim=AdamW8bit", "train.max_steps=2", "train.save_steps=2",
        "train.per_device_train_batch_size=2", "algo.max_new_tokens=8", "dataset.toy.size=8"]))
    states = quant_state(tmp_path / "checkpoints" / "checkpoint-2")
    assert any(t.dtype == torch.uint8 for s in states for t in s.values() if torch.is_tensor(t))
