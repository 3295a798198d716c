"""Resume and outputs: an online run resumed from its checkpoint makes the same first update as the uninterrupted run
(learning rate, weights after it, the value head and KL coefficient); a checkpoint whose weights are not finite is
never marked complete."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import RECIPES, user_error

from aligntool.recipe.loader import load_recipe
from aligntool.train import train

pytestmark = pytest.mark.slow

RUN = ["train.max_steps=3", "train.save_steps=2", "train.per_device_train_batch_size=4", "train.logging_steps=1",
       "train.lr_scheduler_type=linear", "train.learning_rate=3e-3", "algo.max_new_tokens=8", "dataset.toy.size=16"]


def rows(out):
    return {r["step"]: r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}


def test_online_resume_makes_the_uninterrupted_runs_next_update(tmp_path, tiny_path):
    """PPO (2 epochs x 2 minibatches, adaptive KL): checkpoint-2 resumed gives iteration 3's learning rate, KL
    coefficient, rollout and weights of the uninterrupted run (optimizer, scheduler, value head, RNG restored)."""
    from safetensors.torch import load_file

    name, extra = "ppo", ["algo.ppo_epochs=2", "algo.num_minibatches=2", "algo.kl_target=1"]
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    recipe = RECIPES / f"{name}.yaml"
    train(load_recipe(recipe, [*RUN, *extra, f"output_dir={whole}"]))
    # the same run stopped after its checkpoint at iteration 2: its folder as the run left it then
    shutil.copytree(whole, cut)
    for f in ("summary.json", "model.safetensors"):
        (cut / f).unlink()
    kept = [line for line in (cut / "metrics.jsonl").read_text().splitlines() if json.loads(line)["step"] <= 2]
    (cut / "metrics.jsonl").write_text("\n".join(kept) + "\n")
    summary = train(load_recipe(recipe, [*RUN, *extra, f"output_dir={cut}"]), resume=True)
    assert summary["resumed_from"].endswith("checkpoint-2") and summary["global_step"] == 3
    a, b = rows(whole)[3], rows(cut)[3]
    assert b["learning_rate"] == pytest.approx(a["learning_rate"], rel=1e-9)
    assert b["learning_rate"] != rows(whole)[2]["learning_rate"]  # the schedule moves: the check has teeth
    assert b["kl_coef"] == pytest.approx(a["kl_coef"], rel=1e-9)
    for key in ("reward", "kl"):
        assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), key
    after_a, after_b = load_file(str(whole / "model.safetensors")), load_file(str(cut / "model.safetensors"))
    at_2 = load_file(str(whole / "checkpoints" / "checkpoint-2" / "model.safetensors"))
    moved = 0
    for k, v in after_a.items():
        assert torch.allclose(after_b[k], v, rtol=1e-5, atol=1e-7), k
        moved += not torch.equal(v, at_2[k])
    assert moved  # the third update changed weights


def test_a_trl_checkpoint_with_non_finite_weights_is_not_marked_complete(tmp_path):
    """The Trainer callback that writes COMPLETE: finite weights -> marked; a NaN weight -> not marked, the run stops
    with the divergence error."""
    from types import SimpleNamespace

    from aligntool.outputs import COMPLETE_MARKER

    callbacks, divergence = _trl_callbacks(tmp_path)
    model = torch.nn.Linear(2, 2)
    args = SimpleNamespace(output_dir=str(tmp_path))
    for step, bad in ((2, False), (4, True)):
        (tmp_path / f"checkpoint-{step}").mkdir()
        if bad:
            with torch.no_grad():
                model.weight[0, 0] = float("nan")
        state = SimpleNamespace(global_step=step, is_world_process_zero=True)
        for cb in callbacks:
            if hasattr(cb, "on_save"):
                cb.on_save(args, state, SimpleNamespace(), model=model)
    assert (tmp_path / "checkpoint-2" / COMPLETE_MARKER).is_file()
    assert not (tmp_path / "checkpoint-4" / COMPLETE_MARKER).exists()
    assert divergence.error is not None and "non-finite weights" in str(divergence.error)


def _trl_callbacks(out):
    """train.py's Trainer callbacks (one place to repoint: aligntool.train_callbacks after the split)."""
    try:
        from aligntool.train_callbacks import run_callbacks
    except ImportError:
        from aligntool.train import _callbacks as run_callbacks

    return run_callbacks(out / "metrics.jsonl", None)


def test_an_online_checkpoint_with_non_finite_weights_is_not_marked_complete(tmp_path, tiny_path):
    from test_online_wiring import make_engine

    from aligntool.outputs import COMPLETE_MARKER, latest_checkpoint

    engine = make_engine(tmp_path, "remax", "train.save_steps=1")
    engine.state["iteration"] = 1
    assert (engine.save_checkpoint() / COMPLETE_MARKER).is_file()
    with torch.no_grad():
        next(engine.policy_lm.parameters()).view(-1)[0] = float("inf")
    engine.state["iteration"] = 2
    message = user_error(engine.save_checkpoint)
    assert "non-finite weights" in message and "checkpoint-1" in message
    assert not (tmp_path / "checkpoints" / "checkpoint-2" / COMPLETE_MARKER).exists()
    assert latest_checkpoint(tmp_path / "checkpoints", log=lambda m: None).name == "checkpoint-1"
