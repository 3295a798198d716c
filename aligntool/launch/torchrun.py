"""`aligntool train --nproc N [--nnodes M --node-rank R --master-addr HOST --master-port P]`: re-run the same command
under torchrun (gloo on CPU, NCCL on GPUs). Signals the launcher receives (SLURM's SIGUSR1/SIGTERM, Ctrl-C) reach the
ranks, so preemption reaches the trainers (see run_forwarding_signals)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys


def torchrun_command(argv: list[str], nproc: int, nnodes: int = 1, node_rank: int = 0, master_addr: str | None = None,
                     master_port: int = 29500) -> list[str]:
    """The torchrun command line (a list: nothing passes through a shell)."""
    cmd = [sys.executable, "-m", "aligntool.launch.agent", f"--nproc_per_node={nproc}"]  # torchrun (agent.py)
    if nnodes == 1 and master_addr is None:
        cmd.append("--standalone")
    else:
        cmd += [f"--nnodes={nnodes}", f"--node_rank={node_rank}", f"--master_addr={master_addr or '127.0.0.1'}",
                f"--master_port={master_port}"]
    return [*cmd, "-m", "aligntool.cli", *argv]


def run_forwarding_signals(cmd: list[str], finished=lambda: True) -> int:
    """Run torchrun. SIGUSR1/SIGTERM (SLURM's warning, a preemption, a plain kill) go straight to the ranks as SIGUSR1:
    each writes its checkpoint at the step end and exits 0, so torchrun ends cleanly (signalled itself, it would tear
    the ranks down and report a failure); the launcher then exits 75, as a single-process run does, unless the run had
    ``finished()`` anyway. SIGINT (Ctrl-C) goes to torchrun."""
    import psutil

    from aligntool.launch.preemption import Preempted

    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    child = subprocess.Popen(cmd, env=env)
    preempted = {"signal": None}

    def forward(signum, frame):
        if signum == signal.SIGINT:
            child.send_signal(signum)
            return
        preempted["signal"] = signum
        try:
            ranks = psutil.Process(child.pid).children()
        except psutil.NoSuchProcess:
            ranks = []
        for rank in ranks:
            try:
                rank.send_signal(signal.SIGUSR1)
            except psutil.NoSuchProcess:
                pass
        if not ranks:  # not started yet: nothing to checkpoint
            child.send_signal(signal.SIGTERM)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)}
    try:
        code = child.wait()
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    if code == 0 and preempted["signal"] is not None and not finished():
        return Preempted.exit_code
    return code
