"""`aligntool eval --tasks` through lm-evaluation-harness, offline, on a local task (tests/data/lm_eval_task: a task
YAML over a local JSONL file): the accuracy equals what lm-eval's own CLI reports on the same model and task; an
unknown task name is one line with the close names."""

import glob
import json
import os
import subprocess
import sys

import pytest
from conftest import REPO

from aligntool.cli import main

TASK_DIR = REPO / "tests" / "data" / "lm_eval_task"
OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


@pytest.fixture
def offline(monkeypatch):
    for key, value in OFFLINE.items():
        monkeypatch.setenv(key, value)


def test_local_task_accuracy_equals_lm_eval_cli(capsys, tmp_path, tiny_path, offline):
    """Ours: the task by name from --include-path; lm-eval's CLI: the same task by its YAML file."""
    code = main(["eval", "--model", "tiny", "--tasks", "aligntool_reviews_mc", "--include-path", str(TASK_DIR),
                 "--batch-size", "8", "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err[-3000:]
    ours = json.loads(captured.out)
    proc = subprocess.run([sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args",
                           f"pretrained={tiny_path}", "--tasks", str(TASK_DIR / "reviews_mc.yaml"), "--device", "cpu",
                           "--batch_size", "8", "--output_path", str(tmp_path)],
                          capture_output=True, text=True, env={**os.environ, **OFFLINE}, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    theirs = json.loads(open(glob.glob(str(tmp_path / "**" / "results_*.json"), recursive=True)[0]).read())
    theirs = theirs["results"]["aligntool_reviews_mc"]
    mine = ours["tasks"]["aligntool_reviews_mc"]
    assert mine["acc"] == theirs["acc,none"] and mine["acc_norm"] == theirs["acc_norm,none"]
    assert mine["acc_stderr"] == theirs["acc_stderr,none"]
    assert 0 < mine["acc"] < 1 and mine["acc"] != mine["acc_norm"]  # two distinct figures, both compared
    assert ours["data"]["source"] == "lm-eval task aligntool_reviews_mc" and ours["data"]["rows"] == 24
    assert ours["kind"] == "lm_eval" and ours["backend"] == "hf"
    # the task YAML given as a path: the same figures
    assert main(["eval", "--model", "tiny", "--tasks", str(TASK_DIR / "reviews_mc.yaml"), "--batch-size", "8",
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["tasks"] == ours["tasks"]


def expect_error(capsys, args, *needles):
    code = main(["eval", *args])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("aligntool: error: "), err
    for needle in needles:
        assert needle in err, (needle, err)


def test_unknown_task_names_close_ones(capsys, offline):
    expect_error(capsys, ["--model", "tiny", "--tasks", "aligntool_reviews_mcq", "--include-path", str(TASK_DIR)],
                 "--tasks: no lm-eval task 'aligntool_reviews_mcq'", "close names: aligntool_reviews_mc")
    expect_error(capsys, ["--model", "tiny", "--tasks", "hellaswag,helaswag", "--include-path", str(TASK_DIR)],
                 "'helaswag'", "close names: hellaswag")
    expect_error(capsys, ["--model", "tiny", "--tasks", str(TASK_DIR / "nope.yaml")], "no such task file")


@pytest.mark.skipif(__import__("importlib").util.find_spec("vllm") is not None, reason="vllm is installed")
def test_vllm_backend_without_vllm(capsys):
    expect_error(capsys, ["--model", "tiny", "--tasks", "hellaswag", "--backend", "vllm"],
                 "--backend vllm: vllm is not installed")
