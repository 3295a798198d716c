"""`aligntool train --nproc N [--nnodes M --node-rank R --master-addr HOST --master-port P]`: re-run the same command
under torchrun (gloo on CPU, NCCL on GPUs). Signals the launcher receives (SLURM's SIGUSR1/SIGTERM, Ctrl-C) are
passed on to torchrun, which passes them to every rank, so preemption reaches the trainers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys


def torchrun_command(argv: list[str], nproc: int, nnodes: int = 1, node_rank: int = 0, master_addr: str | None = None,
                     master_port: int = 29500) -> list[str]:
    """The torchrun command line (a list: nothing passes through a shell)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}"]
    if nnodes == 1 and master_addr is None:
        cmd.append("--standalone")
    else:
        cmd += [f"--nnodes={nnodes}", f"--node_rank={node_rank}", f"--master_addr={master_addr or '127.0.0.1'}",
                f"--master_port={master_port}"]
    return [*cmd, "-m", "aligntool.cli", *argv]


def run_forwarding_signals(cmd: list[str]) -> int:
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    child = subprocess.Popen(cmd, env=env)

    def forward(signum, frame):
        # torchrun handles TERM/INT (it passes them to every rank and waits for them); USR1 would just kill it
        child.send_signal(signal.SIGTERM if signum == signal.SIGUSR1 else signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)}
    try:
        return child.wait()
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
