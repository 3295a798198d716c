"""`aligntool slurm`: write an sbatch script that runs a recipe on N nodes x G GPUs and survives preemption.

The script asks SLURM for ``--requeue`` and a warning signal ``signal_lead`` seconds before the time limit
(``--signal=B:USR1@lead``, delivered to the batch shell). It starts one task per node with srun; each task runs
``aligntool train ... --nproc G --slurm``, which reads its node rank and the job size from SLURM_NODEID / SLURM_NNODES
and the main address from MASTER_ADDR (node 0, set here), launches torchrun, and resumes from the latest complete
checkpoint when there is one. On USR1 (or TERM) the batch shell passes the signal to srun, which passes it to the
tasks; the trainers write a checkpoint at the end of the current step and exit 75, and the shell requeues the job
(``scontrol requeue``), which then resumes; the job's log is appended to (``--open-mode=append``), so it holds both
runs. Tested on a real one-node SLURM cluster (tests/test_slurm_real.py, docs/SLURM.md). Every user-given value is
quoted (shlex.quote); the script builds no command from unquoted input.
"""

from __future__ import annotations

import re
import shlex

from aligntool.errors import UserError

TIME_RE = re.compile(r"^(\d+-)?\d{1,3}:[0-5]\d:[0-5]\d$")


def check_time(value: str) -> str:
    if not TIME_RE.match(value):
        raise UserError(f"--time: {value!r} is not a SLURM time limit; expected HH:MM:SS or D-HH:MM:SS (e.g. 04:00:00)")
    return value


def sbatch_script(recipe: str, overrides: list[str], nodes: int, gpus_per_node: int, time: str, output_dir: str,
                  job_name: str, partition: str | None = None, account: str | None = None,
                  cpus_per_task: int | None = None, signal_lead: int = 120) -> str:
    check_time(time)
    q = shlex.quote
    directives = [f"--job-name={job_name}", f"--nodes={nodes}", "--ntasks-per-node=1", f"--time={time}", "--requeue",
                  f"--signal=B:USR1@{signal_lead}", f"--output={output_dir}/slurm-%j.out",
                  "--open-mode=append"]  # a requeued job adds to its log instead of truncating it
    if gpus_per_node:
        directives.append(f"--gpus-per-node={gpus_per_node}")
    if cpus_per_task:
        directives.append(f"--cpus-per-task={cpus_per_task}")
    if partition:
        directives.append(f"--partition={partition}")
    if account:
        directives.append(f"--account={account}")
    train = ["aligntool", "train", "--recipe", recipe, *overrides, "--nproc", str(max(1, gpus_per_node)), "--slurm"]
    lines = ["#!/bin/bash", "# Written by `aligntool slurm`. Submit with: sbatch THIS_FILE", "#",
             *(f"#SBATCH {q(d)}" for d in directives), "",
             "set -uo pipefail",
             f"mkdir -p {q(output_dir)}",
             'export MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"',
             'export MASTER_PORT="$((29500 + SLURM_JOB_ID % 1000))"',
             "",
             "# one task per node; each launches torchrun for its GPUs and resumes from the latest checkpoint",
             "srun --kill-on-bad-exit=1 " + " ".join(q(a) for a in train) + " &",
             "SRUN_PID=$!",
             "",
             "preempted() {  # SLURM's warning before the time limit, or a preemption: checkpoint, then requeue",
             "  trap '' USR1 TERM  # once: the TERM that follows a requeue must not requeue again",
             '  echo "aligntool: $1 received; the run writes a checkpoint and the job is requeued" >&2',
             '  kill -USR1 "$SRUN_PID" 2>/dev/null',
             '  wait "$SRUN_PID"',
             "  code=$?",
             "  # 75: stopped at a checkpoint; 138 (USR1): stopped while starting, before any step. A run that had",
             "  # finished anyway exits 0: nothing to redo",
             "  if [ $code -eq 75 ] || [ $code -eq 138 ]; then",
             '    echo "aligntool: the run exited $code; requeueing job $SLURM_JOB_ID" >&2',
             '    scontrol requeue "$SLURM_JOB_ID" && exit 0  # the job runs again; this run ended as it should',
             "  fi",
             "  exit $code",
             "}",
             "trap 'preempted USR1' USR1",
             "trap 'preempted TERM' TERM",
             'wait "$SRUN_PID"',
             "exit $?",
             ""]
    return "\n".join(lines)


def slurm_env() -> tuple[int, int, str, int]:
    """(nnodes, node_rank, master_addr, master_port) from the SLURM task environment."""
    import os

    missing = [k for k in ("SLURM_NNODES", "SLURM_NODEID", "MASTER_ADDR") if k not in os.environ]
    if missing:
        raise UserError(f"--slurm: not inside a SLURM job step ({', '.join(missing)} unset); run the script from "
                        "`aligntool slurm` with sbatch")
    return (int(os.environ["SLURM_NNODES"]), int(os.environ["SLURM_NODEID"]), os.environ["MASTER_ADDR"],
            int(os.environ.get("MASTER_PORT", "29500")))
