"""Shared fixtures. The tiny model is built once per machine (about a minute) and cached under $ALIGNTOOL_CACHE."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from aligntool.errors import UserError

REPO = Path(__file__).resolve().parent.parent
RECIPES = REPO / "aligntool" / "recipes"
def pytest_configure(config):
    """A pytest-xdist worker computes on one torch thread: the workers (2, see pyproject) share the machine's cores,
    and torch's default of one thread per core in each of them oversubscribes it (spinning OpenMP threads: the suite
    took 31 minutes on 2 cores instead of 17). Subprocesses the tests start inherit OMP_NUM_THREADS=1."""
    if hasattr(config, "workerinput"):
        import os

        import torch

        os.environ.setdefault("OMP_NUM_THREADS", "1")
        torch.set_num_threads(1)


def pytest_sessionstart(session):
    """In a parallel run, build the tiny model and the family test models once in the controlling process, on every
    core, before the workers start: a worker builds on one thread (above), and the other would wait for it."""
    if hasattr(session.config, "workerinput") or not getattr(session.config.option, "numprocesses", None):
        return
    from aligntool.toy.families import FAMILIES, family_model_path
    from aligntool.toy.tiny import tiny_model_path

    tiny_model_path(log=lambda message: None)
    for name in FAMILIES:
        family_model_path(name)


# the files whose tests run longest (several processes, benchmarks' quick modes, lm-eval's CLI): 20-70 s each
LONGEST_FIRST = ("test_scale.py", "test_scripts.py", "test_launchers.py", "test_online_sharded.py", "test_faults.py",
                 "test_lm_eval.py", "test_online_pref_e2e.py", "test_online_e2e.py", "test_train_e2e.py")


def pytest_collection_modifyitems(config, items):
    """The longest tests first (a stable sort: the order within a file is kept): pytest-xdist hands work out in this
    order, and a minute-long test that comes last leaves one worker running it alone at the end of the run."""
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(Path(str(item.fspath)).name, len(rank)))


# summary.json: the same keys for every kind of method (trl, pipeline, online)
SUMMARY_KEYS = {"algorithm", "kind", "global_step", "train_time_s", "steps_per_second", "train_samples_per_second",
                "peak_memory_mb", "world_size", "resumed_from", "final_metrics", "wall_time_s"}


@pytest.fixture(scope="session")
def tiny_path() -> Path:
    from aligntool.toy.tiny import tiny_model_path

    return tiny_model_path(log=lambda m: None)


@pytest.fixture(scope="session")
def tiny_arith_path() -> Path:
    """The built-in ``tiny-arith`` model (the tiny model fine-tuned on toy addition; built once, about a minute)."""
    from aligntool.toy.tiny import tiny_arith_model_path

    return tiny_arith_model_path(log=lambda m: None)


@pytest.fixture
def recipe_file(tmp_path):
    """Write a recipe YAML text to a file and return its path."""

    def write(text: str, name: str = "recipe.yaml") -> Path:
        path = tmp_path / name
        path.write_text(text)
        return path

    return write


def user_error(fn, *args, **kwargs) -> str:
    """Call fn, expect a UserError, return its one-line message."""
    with pytest.raises(UserError) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message, message
    return message


def cli_error(capsys, argv: list[str], *needles: str) -> str:
    """``aligntool ARGV`` in this process must end in exit code 2 with ``aligntool: error: ...`` as the last line on
    stderr, no traceback, holding every needle; returns that line."""
    from aligntool.cli import main

    code = main(argv)
    err = capsys.readouterr().err.strip()
    last = err.splitlines()[-1] if err else ""
    assert code == 2, err
    assert "Traceback" not in err and last.startswith("aligntool: error: "), err
    for needle in needles:
        assert needle in last, (needle, last)
    return last


def train_two_processes(recipe: str, out: Path, *overrides: str) -> tuple[dict, str]:
    """`aligntool train --recipe <recipe> --nproc 2` in a subprocess (torchrun, gloo on CPU); returns the
    run's summary.json and the command's stderr, after checking it exited 0 on 2 ranks."""
    import json
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "aligntool.cli", "train", "--recipe", str(RECIPES / f"{recipe}.yaml"),
           "--nproc", "2", *overrides, f"output_dir={out}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2
    return summary, proc.stderr


def expect_error(capsys, args, *needles) -> str:
    """``aligntool ARGS`` in-process: exit code 2 and one line on stderr holding every needle; returns the line."""
    from aligntool.cli import main

    code = main(args)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("aligntool: error: "), err
    for needle in needles:
        assert needle in err, (needle, err)
    return err


def ok(capsys, args) -> str:
    """``aligntool ARGS`` in-process: exit code 0; returns what it wrote to stderr."""
    from aligntool.cli import main

    code = main(args)
    captured = capsys.readouterr()
    assert code == 0, captured.err[-3000:]
    return captured.err


RENDEZVOUS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture
def rendezvous_env():
    """vLLM's / TRL's colocate mode writes RANK, WORLD_SIZE, MASTER_PORT, ... into os.environ: put them back
    afterwards."""
    saved = {k: os.environ.get(k) for k in RENDEZVOUS}
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
