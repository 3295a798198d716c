"""The resume decision (aligntool.resume.check_resume) on hand-made run folders, and which checkpoint a resume takes
(aligntool.outputs.latest_checkpoint / checkpoint_problem): each case's answer written here from the documented rules
(docs: --resume, --accept-changes)."""

from __future__ import annotations

import json

import pytest
import yaml
from conftest import user_error

from aligntool.outputs import checkpoint_problem, latest_checkpoint, mark_complete
from aligntool.resume import check_resume

RECIPE = {"algorithm": "dpo", "output_dir": "/runs/a", "train": {"max_steps": 10, "num_train_epochs": 1,
                                                                  "learning_rate": "auto"}}


def run_folder(tmp_path, recipe=RECIPE, auto=(), finished=False):
    out = tmp_path / "run"
    out.mkdir(parents=True)
    (out / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    (out / "run.json").write_text(json.dumps({"world_size": 1, "auto": list(auto)}))
    if finished:
        (out / "summary.json").write_text(json.dumps({"global_step": 10}))
    return out


def changed(**train):
    return {**RECIPE, "train": {**RECIPE["train"], **train}}


def test_a_moved_run_folder_is_the_same_run(tmp_path):
    out = run_folder(tmp_path)
    assert check_resume(out, {**RECIPE, "output_dir": str(out)}, 1, False, print) is False


def test_an_explicit_value_switched_to_auto_is_a_change_a_kept_auto_is_not(tmp_path):
    resolved = {**RECIPE, "train": {**RECIPE["train"], "learning_rate": 1e-5}}  # recipe.yaml holds the resolved value
    out = run_folder(tmp_path, resolved, auto=["train.learning_rate"])
    assert check_resume(out, changed(learning_rate="auto"), 1, False, print) is False  # still auto: same run
    out2 = run_folder(tmp_path / "b", resolved, auto=())  # 1e-5 was set by hand
    message = user_error(check_resume, out2, changed(learning_rate="auto"), 1, False, print)
    assert "train.learning_rate" in message


@pytest.mark.parametrize("train,trains_on", [({"max_steps": 20}, True), ({"num_train_epochs": 2}, True),
                                             ({"learning_rate": 1e-4}, False), ({}, False)])
def test_a_finished_run_trains_on_only_when_an_accepted_change_gives_it_more(tmp_path, train, trains_on):
    out = run_folder(tmp_path, finished=True)
    said = []
    assert check_resume(out, changed(**train), 1, True, said.append) is (not trains_on)
    assert any("finished run" in s for s in said) is (not trains_on)


def _checkpoint(folder, step, state="{}"):
    ckpt = folder / f"checkpoint-{step}"
    ckpt.mkdir(parents=True)
    (ckpt / "state.json").write_text(state)
    mark_complete(ckpt, step)
    return ckpt


def test_the_latest_readable_checkpoint_is_taken_and_a_broken_one_skipped(tmp_path):
    folder = tmp_path / "checkpoints"
    _checkpoint(folder, 2)
    good = _checkpoint(folder, 4)
    assert latest_checkpoint(folder, log=lambda m: None) == good
    bad = _checkpoint(folder, 6, state='{"iteration": 6')  # truncated JSON
    assert "state.json" in checkpoint_problem(bad)
    said = []
    assert latest_checkpoint(folder, log=said.append) == good
    assert len(said) == 1 and "checkpoint-6" in said[0]
    (folder / "checkpoint-8").mkdir()  # no COMPLETE marker: cut while writing
    assert latest_checkpoint(folder, log=lambda m: None) == good
    assert checkpoint_problem(folder / "checkpoint-8").startswith("not marked COMPLETE")
