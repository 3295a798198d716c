"""--resume continues only the run the folder holds: a changed recipe (data, model, method, schedule, process count)
is refused in one line naming each change, unless --accept-changes; a finished run is not trained again; --resume
with --overwrite is refused. The same for TRL Trainer runs, online engine runs and `train --slurm`'s auto-resume."""

import json
import shutil

import pytest
from conftest import expect_error, ok

from aligntool.cli import main
from aligntool.resume import check_resume, differences

TRL = ["train.max_steps=4", "train.save_steps=2", "train.per_device_train_batch_size=4", "train.logging_steps=1",
       "train.max_length=48", "dataset.toy.size=16"]
ONLINE = ["train.max_steps=2", "train.save_steps=1", "train.per_device_train_batch_size=2", "algo.max_new_tokens=4",
          "dataset.toy.size=4", "train.logging_steps=1"]


def losses(out):
    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()
            if "loss" in json.loads(line)]


# ------------------------------------------------------------------------------------------- the rule, no training
def test_the_comparison_names_each_changed_key_and_lets_harmless_ones_pass(tmp_path):
    import yaml

    old = {"train": {"learning_rate": 5e-4, "max_steps": 4, "logging_steps": 10, "per_device_train_batch_size": 8},
           "dataset": {"path": "a.jsonl"}}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(old))
    (tmp_path / "run.json").write_text('{"world_size": 1}')
    new = {"train": {"learning_rate": 1e-5, "max_steps": 4, "logging_steps": 1, "lr_scheduler_type": "cosine",
                     "per_device_train_batch_size": "auto"}, "dataset": {"path": "b.jsonl"}}
    # a run that started with the batch 'auto' holds Step Law's value in recipe.yaml: 'auto' again is no change
    assert differences(old, new, frozenset({"train.per_device_train_batch_size"})) == [
        ("dataset.path", "a.jsonl", "b.jsonl"), ("train.learning_rate", 5e-4, 1e-5), ("train.logging_steps", 10, 1),
        ("train.lr_scheduler_type", None, "cosine")]
    # but an explicit value switched to 'auto' is one (Step Law would pick another batch)
    assert ("train.per_device_train_batch_size", 8, "auto") in differences(old, new)
    new["train"]["per_device_train_batch_size"] = 8
    from aligntool.errors import UserError

    with pytest.raises(UserError) as err:
        check_resume(tmp_path, new, 2, False, log=print)
    line = str(err.value)
    assert "\n" not in line
    for part in ("dataset.path 'a.jsonl' -> 'b.jsonl'", "train.learning_rate 0.0005 -> 1e-05",
                 "train.lr_scheduler_type None -> 'cosine'", "processes (world size) 1 -> 2", "--accept-changes"):
        assert part in line, part
    assert "logging_steps" not in line  # harmless: noted, not refused
    said = []
    assert check_resume(tmp_path, new, 2, True, log=said.append) is False
    assert any("logging_steps 10 -> 1" in s for s in said)
    harmless = {**old, "train": {**old["train"], "logging_steps": 1}}
    said = []
    assert check_resume(tmp_path, harmless, 1, False, log=said.append) is False
    (tmp_path / "summary.json").write_text('{"global_step": 4}')
    said = []
    assert check_resume(tmp_path, old, 1, False, log=said.append) is True  # finished: nothing to train
    assert "finished run (step 4" in said[-1]
    # an accepted change that gives a finished run nothing more to train leaves it finished
    lower = {**old, "train": {**old["train"], "learning_rate": 1e-5}}
    said = []
    assert check_resume(tmp_path, lower, 1, True, log=said.append) is True
    assert "nothing to resume" in said[-1] and not any("continuing" in s for s in said)
    longer = {**old, "train": {**old["train"], "max_steps": 8}}
    assert check_resume(tmp_path, longer, 1, True, log=print) is False


def test_resume_and_overwrite_together_are_refused(capsys, tmp_path):
    expect_error(capsys, ["train", "--recipe", "dpo", f"output_dir={tmp_path}", "--resume", "--overwrite"],
                 "--resume and --overwrite", "choose one")
    assert not any(tmp_path.iterdir())


# ---------------------------------------------------------------------------------------------- a TRL Trainer run
@pytest.fixture(scope="module")
def trl_run(tmp_path_factory, tiny_path):
    out = tmp_path_factory.mktemp("dpo") / "run"
    assert main(["train", "--recipe", "dpo", *TRL, f"output_dir={out}"]) == 0
    return out


def interrupted(trl_run, tmp_path):
    """The run as if cut after checkpoint-2."""
    out = tmp_path / "run"
    shutil.copytree(trl_run, out)
    (out / "summary.json").unlink()
    shutil.rmtree(out / "checkpoints" / "checkpoint-4")
    return out


@pytest.mark.slow
def test_a_trl_resume_refuses_a_changed_recipe_and_continues_an_unchanged_one(capsys, tmp_path, trl_run):
    out = interrupted(trl_run, tmp_path)
    base = ["train", "--recipe", "dpo", *TRL, f"output_dir={out}", "--resume"]
    expect_error(capsys, [*base, "train.learning_rate=1e-5"], "train.learning_rate 0.0005 -> 1e-05",
                 "--accept-changes")
    expect_error(capsys, [*base, "dataset.toy.seed=7", "train.seed=3"], "dataset.toy.seed 0 -> 7",
                 "train.seed 0 -> 3")
    expect_error(capsys, [*base, "--nproc", "2"], "processes (world size) 1 -> 2")  # before any rank starts
    assert not (out / "summary.json").exists()
    err = ok(capsys, [*base, "train.logging_steps=2"])  # harmless: noted
    assert "logging_steps 1 -> 2" in err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["global_step"] == 4 and summary["resumed_from"].endswith("checkpoint-2")


@pytest.mark.slow
def test_resuming_a_finished_run_trains_nothing_unless_a_change_is_accepted(capsys, tmp_path, trl_run):
    out = tmp_path / "run"
    shutil.copytree(trl_run, out)
    base = ["train", "--recipe", "dpo", *TRL, f"output_dir={out}", "--resume"]
    before = (out / "metrics.jsonl").read_text(), (out / "model.safetensors").read_bytes()
    err = ok(capsys, base)
    assert "finished run (step 4" in err and "nothing to resume" in err
    assert ((out / "metrics.jsonl").read_text(), (out / "model.safetensors").read_bytes()) == before
    assert json.loads((out / "summary.json").read_text())["global_step"] == 4
    expect_error(capsys, [*base, "train.max_steps=6"], "train.max_steps 4 -> 6")
    err = ok(capsys, [*base, "train.max_steps=6", "--accept-changes"])
    assert "continuing the checkpoint under changed settings: train.max_steps 4 -> 6" in err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["global_step"] == 6 and summary["resumed_from"].endswith("checkpoint-4")
    assert losses(out)[-2:] == [5, 6]
    # the accepted recipe is the run's recipe from now on
    err = ok(capsys, [*base, "train.max_steps=6"])
    assert "nothing to resume" in err


@pytest.mark.slow
def test_slurm_auto_resume_resumes_the_same_recipe_and_refuses_a_changed_one(capsys, tmp_path, trl_run, monkeypatch):
    out = interrupted(trl_run, tmp_path)
    for key, value in {"SLURM_NNODES": "1", "SLURM_NODEID": "0", "MASTER_ADDR": "127.0.0.1",
                       "SLURM_RESTART_COUNT": "1"}.items():
        monkeypatch.setenv(key, value)
    base = ["train", "--recipe", "dpo", *TRL, f"output_dir={out}", "--slurm"]
    expect_error(capsys, [*base, "train.learning_rate=1e-5"], "train.learning_rate 0.0005 -> 1e-05")
    ok(capsys, base)  # a requeued job: resumes
    summary = json.loads((out / "summary.json").read_text())
    assert summary["global_step"] == 4 and summary["resumed_from"].endswith("checkpoint-2")
    assert "nothing to resume" in ok(capsys, base)  # requeued once more after it finished


def learning_rates(out) -> dict:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["learning_rate"] for r in rows if "learning_rate" in r}


@pytest.mark.slow
def test_an_accepted_new_learning_rate_is_the_schedules_peak_after_the_resume(capsys, tmp_path, trl_run):
    out = interrupted(trl_run, tmp_path)
    err = ok(capsys, ["train", "--recipe", "dpo", *TRL, f"output_dir={out}", "--resume", "train.learning_rate=1e-5",
                      "--accept-changes"])
    assert "train.learning_rate 0.0005 -> 1e-05" in err and "peak is now 1e-05" in err
    before, after = learning_rates(trl_run), learning_rates(out)
    for step in (3, 4):  # the same linear schedule, at the new peak (the old code kept 0.0005's)
        assert after[step] == pytest.approx(before[step] * 1e-5 / 5e-4, rel=1e-6)
    assert after[2] == before[2]


# ------------------------------------------------------------------------------------------- an online engine run
@pytest.mark.slow
def test_an_online_resume_refuses_a_changed_recipe_and_a_finished_run_stays_finished(capsys, tmp_path, tiny_path):
    out = tmp_path / "run"
    base = ["train", "--recipe", "remax", *ONLINE, f"output_dir={out}"]
    ok(capsys, base)
    before = (out / "metrics.jsonl").read_text()
    assert "nothing to resume" in ok(capsys, [*base, "--resume"])
    assert (out / "metrics.jsonl").read_text() == before
    assert json.loads((out / "summary.json").read_text())["global_step"] == 2
    (out / "summary.json").unlink()  # as if cut after checkpoint-2
    expect_error(capsys, [*base, "--resume", "algo.max_new_tokens=6", "train.learning_rate=1e-3"],
                 "algo.max_new_tokens 4 -> 6", "train.learning_rate")
    err = ok(capsys, [*base, "--resume", "train.max_steps=4", "train.learning_rate=1e-6", "--accept-changes"])
    assert "peak is now 1e-06 (the checkpoint's: 0.0001)" in err  # the recipe's 1e-4
    assert json.loads((out / "summary.json").read_text())["global_step"] == 4
    assert 0 < learning_rates(out)[3] <= 1e-6  # linear to 4 iterations from the new peak
