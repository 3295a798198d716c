"""Each preference recipe trains on the tiny model and raises its own objective's preference accuracy."""

import json

import pytest

from aligntool.recipe.loader import load_recipe
from aligntool.train import train
from conftest import REPO

pytestmark = pytest.mark.slow

SHORT = ["train.max_steps=30", "train.per_device_train_batch_size=8", "train.save_steps=30", "train.logging_steps=10",
         "train.eval_strategy=no", "train.eval_on_start=true", "dataset.toy.size=240", "dataset.toy.eval_size=48"]


def evals(out):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "eval_loss" in r]


@pytest.mark.parametrize("name", ["ipo", "slic", "robust_dpo", "sppo_hard", "fdpo", "rpo", "cpl", "hypo", "srpo", "spo"])
def test_dpo_variant_recipe_learns_the_preferences(name, tmp_path, tiny_path):
    summary = train(load_recipe(REPO / "recipes" / f"{name}.yaml", [*SHORT, f"output_dir={tmp_path}"]))
    before, after = evals(tmp_path)[0], summary["final_metrics"]
    assert after["eval_loss"] < before["eval_loss"], (before, after)
    assert after["eval_rewards/accuracies"] > max(0.55, before["eval_rewards/accuracies"]), (before, after)
    assert after["eval_rewards/margins"] > before["eval_rewards/margins"]
