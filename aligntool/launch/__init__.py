"""Launching: torchrun processes on one or several nodes (torchrun.py), SLURM batch scripts (slurm.py), and the
preemption signal path that turns SIGUSR1/SIGTERM into a checkpoint and a clean exit (preemption.py)."""
