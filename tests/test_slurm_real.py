"""The script `aligntool slurm` writes, on a real SLURM cluster (issue 29, item 6): Debian's slurmctld and slurmd on
this machine, one node (scripts/ci_system.sh sets it up; skipped where there is no ``sbatch``).

Two jobs of the same tiny DPO run (1 node, CPU, ``--gpus-per-node 0``) are submitted at once with ``sbatch``:

- job A runs to the end: COMPLETED, exit code 0:0, never restarted, a loadable model in output_dir;
- job B is sent SLURM's preemption warning (``scancel -s USR1 -b``: to the batch shell, as ``--signal=B:USR1@lead``
  does at the time limit) once it has logged two steps. The run writes a checkpoint and exits 75 (srun says so in
  the job's log), the batch script requeues the job, SLURM starts it again (scontrol: Restarts=1), and the run
  resumes from that checkpoint and finishes with A's final weights, bit for bit (CPU, one process, the same data
  order and RNG states).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from conftest import REPO

pytestmark = [pytest.mark.system,
              pytest.mark.skipif(shutil.which("sbatch") is None,
                                 reason="no SLURM here (sbatch absent): scripts/ci_system.sh installs and starts a "
                                        "one-node cluster (as root)")]

STEPS = 40
OVERRIDES = [f"train.max_steps={STEPS}", "train.logging_steps=1", "train.save_steps=1000",
             "train.per_device_train_batch_size=8", "dataset.toy.size=320", "train.seed=3"]
WAIT_S = 600  # per job, from submission: requeue delay (AuthInfo cred_expire) and a loaded machine included


def job(job_id: str) -> dict:
    """``scontrol show job -o``'s fields (JobState, Restarts, ExitCode, ...)."""
    text = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True,
                          timeout=30).stdout
    return dict(re.findall(r"(\w+)=(\S*)", text))


def wait_for(job_id: str, log: Path, until: float) -> dict:
    while time.time() < until:
        info = job(job_id)
        if info.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
            return info
        time.sleep(1)
    subprocess.run(["scancel", job_id], timeout=30)
    pytest.fail(f"job {job_id} did not end in {WAIT_S} s: {job(job_id)}; its log ends: "
                f"{log.read_text(errors='replace')[-3000:] if log.is_file() else '(none)'}")


def submit(tmp: Path, name: str) -> tuple[str, Path]:
    from aligntool.cli import main

    out = tmp / name
    script = tmp / f"{name}.sbatch"
    assert main(["slurm", "--recipe", "dpo", *OVERRIDES, f"output_dir={out}", "--nodes", "1", "--gpus-per-node", "0",
                 "--time", "00:20:00", "--out", str(script)]) == 0
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    proc = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True, timeout=60, env=env,
                          cwd=tmp)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().split(";")[0], out


@pytest.fixture(scope="module")
def jobs(tmp_path_factory, tiny_path):
    """Both jobs submitted; B preempted once it has logged two steps. Returns {name: (job id, output_dir)}."""
    ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=30)
    assert "UP" in ping.stdout, f"sbatch is here but no controller answers (scontrol ping: {ping.stdout}" \
                                f"{ping.stderr}); start the cluster with scripts/ci_system.sh"
    tmp = tmp_path_factory.mktemp("slurm")
    submitted = {name: submit(tmp, name) for name in ("a", "b")}
    b_id, b_out = submitted["b"]
    metrics, until = b_out / "metrics.jsonl", time.time() + WAIT_S
    try:
        while time.time() < until and not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 2):
            assert job(b_id).get("JobState") in ("PENDING", "RUNNING", "CONFIGURING"), job(b_id)
            time.sleep(0.1)
        assert metrics.is_file(), f"job {b_id} logged no step in {WAIT_S} s: {job(b_id)}"
        subprocess.run(["scancel", "-s", "USR1", "-b", b_id], check=True, timeout=30)
        yield submitted
    finally:
        for job_id, _ in submitted.values():
            if job(job_id).get("JobState") not in ("COMPLETED", "FAILED", "CANCELLED", None):
                subprocess.run(["scancel", job_id], timeout=30)


def test_a_job_runs_to_a_loadable_model(jobs):
    from transformers import AutoModelForCausalLM

    from aligntool import outputs

    job_id, out = jobs["a"]
    info = wait_for(job_id, out / f"slurm-{job_id}.out", time.time() + WAIT_S)
    log = (out / f"slurm-{job_id}.out").read_text(errors="replace")
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "0"), (info, log[-3000:])
    assert json.loads((out / "summary.json").read_text())["global_step"] == STEPS
    assert outputs.model_problem(out) is None
    AutoModelForCausalLM.from_pretrained(out)


def test_a_preempted_job_checkpoints_exits_75_is_requeued_and_ends_with_the_uninterrupted_weights(jobs):
    import torch
    from safetensors.torch import load_file

    job_id, out = jobs["b"]
    log_file = out / f"slurm-{job_id}.out"
    info = wait_for(job_id, log_file, time.time() + WAIT_S)
    log = log_file.read_text(errors="replace")  # both runs of the job (--open-mode=append)
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), (info, log[-3000:])
    assert info["Restarts"] == "1", info  # requeued once, by SLURM
    stopped = re.search(r"aligntool: preempted: stopped after step (\d+); checkpoint (\S+) written", log)
    assert stopped, log[-3000:]
    step, checkpoint = int(stopped.group(1)), stopped.group(2)
    assert 2 <= step < STEPS and checkpoint == str(out / "checkpoints" / f"checkpoint-{step}")
    assert re.search(r"srun: error: \S+: task 0: Exited with exit code 75", log), log[-3000:]
    assert f"requeueing job {job_id}" in log
    assert f"Resuming from {checkpoint}" in log
    summary = json.loads((out / "summary.json").read_text())
    assert summary["global_step"] == STEPS and summary["resumed_from"] == checkpoint

    a_id, a_out = jobs["a"]
    wait_for(a_id, a_out / f"slurm-{a_id}.out", time.time() + WAIT_S)
    uninterrupted, resumed = load_file(str(a_out / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert uninterrupted.keys() == resumed.keys()
    for name in uninterrupted:
        assert torch.equal(uninterrupted[name], resumed[name]), name
