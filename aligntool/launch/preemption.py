"""Preemption: SIGUSR1 or SIGTERM (SLURM's warning before the time limit, a requeue, or a plain `kill`) asks the run
to write a checkpoint at the end of the current step and exit; `--resume` then continues from it.

Every process installs the handler; under several processes the flag is all-reduced at each step end so that all
ranks stop after the same step (a rank that stopped alone would hang the others in the next collective).
"""

from __future__ import annotations

import signal

SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
_requested: dict[str, int | None] = {"signum": None}


class Preempted(Exception):
    """Raised after the checkpoint is written; the CLI reports it and exits with ``exit_code`` 75 (EX_TEMPFAIL: try
    again), so ``aligntool train ... && aligntool eval ...`` does not evaluate a half-trained model; the SLURM script
    requeues the job on the signal whatever the code."""

    exit_code = 75

    def __init__(self, step: int, checkpoint: str | None):
        super().__init__(f"preempted: stopped after step {step}; checkpoint {checkpoint} written; "
                         "continue with --resume")
        self.step, self.checkpoint = step, checkpoint


def install() -> None:
    def handler(signum, frame):
        _requested["signum"] = signum

    for sig in SIGNALS:
        signal.signal(sig, handler)


def reset() -> None:
    _requested["signum"] = None


def any_rank(flag: bool) -> bool:
    """True on every rank if ``flag`` is true on any (collective under torch.distributed: call it on all ranks at the
    same point), so that all ranks stop after the same step."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        import torch

        t = torch.tensor([1.0 if flag else 0.0], device="cuda" if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())
    return flag


def requested() -> bool:
    """True on every rank once any rank received the signal (collective: see any_rank)."""
    flag = any_rank(_requested["signum"] is not None)
    if flag:
        _requested["signum"] = _requested["signum"] or int(signal.SIGTERM)
    return flag


def callback():
    from transformers import TrainerCallback

    class StopOnPreemption(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if requested():
                control.should_save = True
                control.should_training_stop = True

    return StopOnPreemption()
