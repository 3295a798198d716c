"""How `aligntool train` starts: in this process, or re-launched under torchrun on N processes (and nodes), inside a
SLURM job step or not. The CLI parses the flags and calls ``start``; everything about processes is here (the
process machinery it uses, below ``train``, is in aligntool.launch).

- ``--slurm``: nodes, node rank and main address come from SLURM's environment, and a folder that holds a checkpoint
  (or finished iterations) is resumed, as a requeued job must;
- ``--nproc``/``--nnodes`` > 1: the launcher checks the folder once, builds the tiny model once (not racing in every
  rank), then runs torchrun with the same command and passes signals on (aligntool.launch.torchrun);
- in a rank, or alone: aligntool.train.train, with a full disk reported in one line; in a rank of several nodes, a
  lost node is named in one line (aligntool.launch.nodes).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

from aligntool.errors import UserError


@dataclass
class Launch:
    nproc: int = 1
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str | None = None
    master_port: int = 29500
    slurm: bool = False


def check_processes(launch: Launch) -> None:
    import torch

    if torch.cuda.is_available():
        if launch.nproc > torch.cuda.device_count():
            raise UserError(f"--nproc: {launch.nproc} processes but this node has {torch.cuda.device_count()} GPUs")
    elif launch.nproc > (os.cpu_count() or 1):
        raise UserError(f"--nproc: {launch.nproc} processes but this machine has {os.cpu_count()} CPU cores")
    if launch.node_rank >= launch.nnodes:
        raise UserError(f"--node-rank: {launch.node_rank} is not below --nnodes {launch.nnodes}")
    if launch.nnodes > 1 and not launch.master_addr:
        raise UserError("--master-addr: needed with --nnodes > 1 (the host of node 0)")


def start(recipe: str, overrides: list[str], resume: bool, overwrite: bool, launch: Launch, debug: bool,
          accept_changes: bool = False) -> int:
    """Validate the recipe, then train here or under torchrun; returns the exit code."""
    from aligntool.recipe.loader import load_recipe
    from aligntool.resume import check_flags

    check_flags(resume, overwrite)
    loaded = load_recipe(recipe, overrides)  # validate before spawning anything
    out = Path(loaded.recipe.output_dir).expanduser()
    in_rank = "LOCAL_RANK" in os.environ
    if launch.slurm:
        from aligntool.launch.slurm import slurm_env
        from aligntool.outputs import latest_checkpoint

        if not in_rank:
            launch.nnodes, launch.node_rank, launch.master_addr, launch.master_port = slurm_env()
        started = latest_checkpoint(out / "checkpoints") is not None or any(out.glob("iter-*/iteration.done"))
        # a requeued job (SLURM_RESTART_COUNT > 0) resumes what it started, even where its first start replaced a
        # previous run with --overwrite; its recipe is checked like any --resume
        requeued = int(os.environ.get("SLURM_RESTART_COUNT") or 0) > 0
        if started and (requeued or not overwrite):
            resume, overwrite = True, False
    if in_rank:  # a torchrun rank: trains; the launcher above it pushes
        return train_here(loaded, out, resume, overwrite, debug, accept_changes)
    check_processes(launch)
    push = loaded.recipe.train.push_to_hub and launch.node_rank == 0
    if push:
        check_push(loaded)
    if launch.nproc > 1 or launch.nnodes > 1:
        code = relaunch(recipe, overrides, resume, overwrite, launch, debug, loaded, out, accept_changes)
    else:
        code = train_here(loaded, out, resume, overwrite, debug, accept_changes)
    if code == 0 and push:
        push_final(loaded, out)
    return code


def check_push(loaded) -> None:
    """train.push_to_hub: the repo id and the token, checked before anything trains."""
    from aligntool.publish import check_repo_id, find_token

    check_repo_id(loaded.recipe.train.hub_model_id, key="train.hub_model_id")
    find_token()


def push_final(loaded, out: Path) -> None:
    """train.push_to_hub, once the run finished (summary.json written, the model checked loadable): the final model,
    no more."""
    from aligntool.publish import push as push_model

    t = loaded.recipe.train
    push_model(out, t.hub_model_id, private=bool(t.hub_private_repo), revision=t.hub_revision,
               log=lambda m: print(m, file=sys.stderr))


def relaunch(recipe, overrides, resume, overwrite, launch: Launch, debug: bool, loaded, out: Path,
             accept_changes: bool = False) -> int:
    from aligntool import models
    from aligntool.launch.torchrun import run_forwarding_signals, torchrun_command
    from aligntool.outputs import check_previous_run

    check_previous_run(out, resume, overwrite)  # before any rank starts
    if launch.nnodes > 1:
        from aligntool.launch.nodes import timeout_s

        timeout_s()  # ALIGNTOOL_NODE_TIMEOUT checked here, not in every rank
    if resume:  # the recipe against the run's own, and a finished run, before any rank starts
        from aligntool.resume import check_resume

        said = []  # the notes are the main rank's to print; only "finished" is said here
        if check_resume(out, loaded.resolved(), launch.nproc * launch.nnodes, accept_changes, log=said.append):
            print(said[-1], file=sys.stderr)
            return 0
    models.resolve(loaded.recipe.model.name_or_path, log=lambda m: print(m, file=sys.stderr))  # built once, here
    argv = ["train", "--recipe", recipe, *overrides, *(["--resume"] if resume else []),
            *(["--overwrite"] if overwrite else []), *(["--accept-changes"] if accept_changes else []),
            *(["--debug"] if debug else [])]
    master_addr = None if launch.nnodes == 1 else launch.master_addr  # one node: torchrun's standalone rendezvous
    cmd = torchrun_command(argv, launch.nproc, launch.nnodes, launch.node_rank, master_addr, launch.master_port)
    return run_forwarding_signals(cmd, finished=lambda: (out / "summary.json").is_file())


def train_here(loaded, out: Path, resume: bool, overwrite: bool, debug: bool, accept_changes: bool = False) -> int:
    from aligntool.outputs import disk_full_error
    from aligntool.train import train

    watch = _node_watch()
    try:
        train(loaded, resume=resume, overwrite=overwrite, accept_changes=accept_changes)
    except (UserError, KeyboardInterrupt):
        _end_watch(watch, "failed")
        raise
    except Exception as exc:
        from aligntool.launch.preemption import Preempted

        if isinstance(exc, Preempted):
            _end_watch(watch, "ended")
            raise
        if watch is not None and watch.verdict() and not debug:  # another node is gone: its name, in one line
            watch.stop(None)
            watch.say()
            return watch.code
        _end_watch(watch, "failed")
        error = disk_full_error(out, exc) if out.is_dir() else None
        if error is None or debug:
            raise
        raise error from None
    _end_watch(watch, "ended")
    return 0


def _node_watch():
    """In a rank of a torchrun launch: die with the launcher; with several nodes, the watch on the others
    (aligntool.launch.nodes)."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return None
    from aligntool.launch import nodes

    nodes.die_with_parent()
    return nodes.start_watch()


def _end_watch(watch, state: str) -> None:
    if watch is not None:
        watch.stop(state)
