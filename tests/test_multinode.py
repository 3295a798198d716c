"""More than one machine, simulated on this one (issue 29, item 6): two node processes over loopback, each
``aligntool train --nnodes 2 --node-rank i --nproc 1 --master-addr 127.0.0.1 --master-port P`` (the rendezvous the
SLURM script uses), both writing one output_dir, as nodes on shared storage do; both ranks have LOCAL_RANK 0.

- DPO and PPO under DeepSpeed ZeRO-3 (gloo) give one node's 2-process loss curve (1e-4 per logged step), and the
  folder is written once (one metrics row per step, one "Done", RNG states of both ranks).
- SIGKILL to node 1's launcher (its process group) after the first checkpoint: node 1's ranks die with it, node 0
  exits within ALIGNTOOL_NODE_TIMEOUT + a few seconds with exit code 69 and one line naming node 1, no traceback;
  ``--resume`` on both nodes continues from the last complete checkpoint and finishes with a loadable model. The same
  for node 0 (the rendezvous store's host), without the resume.
- The heartbeat watch itself (aligntool.launch.nodes.Watch) on a real TCPStore, in this process (default suite).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO

ZERO3 = ["distributed.backend=deepspeed", "distributed.zero_stage=3"]
DPO = ["train.max_steps=4", "train.logging_steps=1", "dataset.toy.size=64", "train.seed=1",
       "train.per_device_train_batch_size=4", "train.save_steps=2"]
PPO = ["train.max_steps=3", "train.logging_steps=1", "algo.max_new_tokens=8", "dataset.toy.size=32", "train.seed=1",
       "train.lr_scheduler_type=constant", "algo.num_minibatches=1", "algo.ppo_epochs=2", "train.save_steps=2",
       "train.per_device_train_batch_size=2"]
CURVES = {"dpo": ("loss",), "ppo": ("policy_loss", "value_loss", "kl")}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env(**extra) -> dict:
    return dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
                OMP_NUM_THREADS="1", **extra)


def start_nodes(recipe: str, out: Path, overrides: list[str], logs: Path, flags=(), **extra_env) -> list:
    """The two node processes (each in a session of its own, as on two machines); stderr to logs/node<i>.err."""
    port, procs = free_port(), []
    logs.mkdir(parents=True, exist_ok=True)
    for node in (0, 1):
        cmd = [sys.executable, "-m", "aligntool.cli", "train", "--recipe", recipe, *overrides, *ZERO3,
               f"output_dir={out}", *flags, "--nnodes", "2", "--node-rank", str(node), "--nproc", "1",
               "--master-addr", "127.0.0.1", "--master-port", str(port)]
        with open(logs / f"node{node}.err", "w") as err:
            procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, cwd=REPO,
                                          env=env(**extra_env), start_new_session=True))
    return procs


def kill_all(procs) -> None:
    import psutil

    for p in procs:
        if p.poll() is None:
            kids = psutil.Process(p.pid).children(recursive=True)
            os.killpg(p.pid, signal.SIGKILL)
            for k in kids:
                try:
                    k.kill()
                except psutil.NoSuchProcess:
                    pass
            p.wait()


def finish(procs, logs: Path, timeout: float = 600) -> list[str]:
    """Wait for both nodes (killing every process of both on a timeout); returns their stderr after checking both
    exited 0."""
    deadline = time.time() + timeout
    try:
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.time()))
    except subprocess.TimeoutExpired:
        kill_all(procs)
        pytest.fail(f"the two nodes did not finish in {timeout} s; node 0's stderr ends: "
                    f"{text(logs / 'node0.err')[-3000:]}")
    errs = [text(logs / f'node{i}.err') for i in (0, 1)]
    for i, p in enumerate(procs):
        assert p.returncode == 0, f"node {i} exited {p.returncode}: {errs[i][-3000:]}"
    return errs


def text(path: Path) -> str:
    return path.read_text(errors="replace")  # progress bars of two processes can cut a character in two


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def curve(out: Path, recipe: str) -> list[float]:
    return [float(r[k]) for r in rows(out) if CURVES[recipe][0] in r for k in ("step", *CURVES[recipe])]


@pytest.mark.system
@pytest.mark.parametrize("recipe,overrides", [("dpo", DPO), ("ppo", PPO)], ids=["dpo", "ppo"])
def test_two_nodes_give_one_nodes_two_process_loss_curve(tmp_path, tiny_path, recipe, overrides):
    from transformers import AutoModelForCausalLM

    from aligntool import outputs

    one = tmp_path / "one"
    proc = subprocess.run([sys.executable, "-m", "aligntool.cli", "train", "--recipe", recipe, *overrides, *ZERO3,
                           f"output_dir={one}", "--nproc", "2"], capture_output=True, text=True, timeout=600,
                          cwd=REPO, env=env())
    assert proc.returncode == 0, proc.stderr[-3000:]

    two = tmp_path / "two"
    errs = finish(start_nodes(recipe, two, overrides, tmp_path / "logs"), tmp_path / "logs")
    want, got = curve(one, recipe), curve(two, recipe)
    steps = int(next(o for o in overrides if o.startswith("train.max_steps=")).split("=")[1])
    assert len(got) == len(want) == steps * (1 + len(CURVES[recipe]))
    assert got == pytest.approx(want, abs=1e-4)
    # written once, by the run's main process (global rank 0), though both nodes have a LOCAL_RANK 0
    assert [r["step"] for r in rows(two) if CURVES[recipe][0] in r] == list(range(1, steps + 1))
    assert sum(e.count("Done in") for e in errs) == 1 and "Done in" in errs[0]
    summary = json.loads((two / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["distributed"]["described"] == "DeepSpeed ZeRO-3"
    checkpoint = two / "checkpoints" / "checkpoint-2"
    assert (checkpoint / "COMPLETE").is_file()
    if recipe == "dpo":  # the Trainer's RNG state of each global rank, DeepSpeed's partition of each
        assert {p.name for p in checkpoint.glob("rng_state_*.pth")} == {"rng_state_0.pth", "rng_state_1.pth"}
        assert len(list((checkpoint / "global_step2").glob("zero_pp_rank_*_optim_states.pt"))) == 2
    assert outputs.model_problem(two) is None
    AutoModelForCausalLM.from_pretrained(two)


LONG = ["train.max_steps=20", "train.save_steps=5", "train.logging_steps=1", "dataset.toy.size=320",
        "train.per_device_train_batch_size=4", "train.seed=2"]
NODE_TIMEOUT_S = 10


@pytest.mark.system
@pytest.mark.parametrize("lost", [1, 0], ids=["node1", "node0"])
def test_a_lost_node_ends_the_other_in_one_line_and_both_resume(tmp_path, tiny_path, lost):
    """One node's launcher and torchrun are SIGKILLed (its process group) after the first complete checkpoint. Its
    ranks die with them (PR_SET_PDEATHSIG: torchrun starts ranks in sessions of their own). Node 1 lost: node 0
    notices its heartbeat stop; node 0 lost (the rendezvous store's host): node 1 sees the store close. The survivor
    says so in one line and exits 69 within ALIGNTOOL_NODE_TIMEOUT (10 s here) + 20 s; then (node 1 lost) both nodes
    ``--resume`` from the last complete checkpoint and finish."""
    import psutil
    from transformers import AutoModelForCausalLM

    from aligntool import outputs

    out, logs = tmp_path / "run", tmp_path / "logs"
    survivor = 1 - lost
    procs = start_nodes("dpo", out, LONG, logs, ALIGNTOOL_NODE_TIMEOUT=str(NODE_TIMEOUT_S))
    try:
        first = out / "checkpoints" / "checkpoint-5" / "COMPLETE"
        deadline = time.time() + 600
        while not first.is_file() and all(p.poll() is None for p in procs) and time.time() < deadline:
            time.sleep(0.05)
        assert first.is_file(), text(logs / 'node0.err')[-3000:]
        victims = psutil.Process(procs[lost].pid).children(recursive=True)  # torchrun's agent and the node's rank
        assert any("aligntool.cli" in " ".join(p.cmdline()) for p in victims)
        os.killpg(procs[lost].pid, signal.SIGKILL)
        killed = time.time()
        try:
            code = procs[survivor].wait(timeout=NODE_TIMEOUT_S + 50)
        except subprocess.TimeoutExpired:
            pytest.fail(f"node {survivor} still runs {NODE_TIMEOUT_S + 50} s after node {lost} was killed: "
                        f"{text(logs / f'node{survivor}.err')[-3000:]}")
        took = time.time() - killed
    finally:
        kill_all(procs)
    err = text(logs / f"node{survivor}.err")
    assert code == 69, err[-3000:]
    assert took < NODE_TIMEOUT_S + 20, took
    errors = [line for line in err.splitlines() if "error" in line.lower() and "FutureWarning" not in line]
    assert len(errors) == 1 and errors[0].startswith(f"aligntool: error: lost node {lost} (host "), err[-3000:]
    assert "Traceback" not in err and "ChildFailedError" not in err, err[-3000:]
    time.sleep(1)
    assert not [p for p in victims if p.is_running() and p.status() != psutil.STATUS_ZOMBIE], "its rank lives on"
    assert not (out / "summary.json").exists()
    if lost == 0:
        return

    last = outputs.latest_checkpoint(out / "checkpoints", log=lambda m: None)
    step = outputs.checkpoint_step(last)
    before = len(rows(out))
    errs = finish(start_nodes("dpo", out, LONG, logs, flags=["--resume"]), logs)
    assert f"Resuming from {last}" in errs[0]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["global_step"] == 20 and summary["resumed_from"] == str(last)
    resumed = [r["step"] for r in rows(out)[before:] if "loss" in r]
    assert resumed == list(range(step + 1, 21)), resumed  # the resumed run starts at the checkpoint's step
    assert outputs.model_problem(out) is None
    AutoModelForCausalLM.from_pretrained(out)


# ------------------------------------------------------------------------------- the watch, on a real TCPStore
def test_the_watch_names_a_silent_node_a_failed_one_and_ignores_one_that_ended(monkeypatch):
    """Three nodes' watches on one TCPStore (node 0 hosts it, as torchrun's agent does). After a failed collective
    with every node alive, ``verdict`` says so (None) within a few beats. Node 1 ends cleanly, node 2 stops beating
    without a word (killed) just before node 0's collective fails: node 0 names node 2, after the timeout and not
    before, and never node 1. A node that says it failed is named as failed, with another exit code."""
    from datetime import timedelta

    import torch.distributed as dist

    from aligntool.launch import nodes

    monkeypatch.setattr(nodes, "INTERVAL", 0.2)
    server = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=10))
    port = server.port
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", f"watch-test-{port}")
    verdicts = []
    watches = [nodes.Watch(n, 3, "127.0.0.1", port, beats=True, timeout=2.0) for n in range(3)]
    for w in watches:
        w.on_verdict = lambda w=w: verdicts.append((w.node, w.message))
        w.start()
    time.sleep(0.6)
    assert watches[0].verdict() is None  # all alive: this node's own failure

    watches[1].stop("ended")  # finished its part: not watched any more
    watches[2]._stop.set()  # killed: silent, no state
    watches[2]._thread.join()
    # its last beat, which node 0's watch reads only after its own collective failed
    dist.PrefixStore(f"aligntool/nodes/watch-test-{port}/0/", server).add("beat/2", 1)
    start = time.monotonic()
    message = watches[0].verdict()  # node 0's collective failed just now
    took = time.monotonic() - start
    assert message is not None and message.startswith("lost node 2 (host ") and "for 2 s" in message, message
    assert "node 1" not in message and watches[0].code == nodes.EXIT_LOST and "for 2 s (killed" in message
    assert took >= 1.5, took  # not before the 2 s timeout (a slow machine only makes this later)
    time.sleep(0.5)
    assert (0, message) in verdicts  # the watch thread's own way out (os._exit in a rank) is taken too
    watches[0].stop(None)

    # a node that failed says so; the others name it at once
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", f"watch-test-failed-{port}")
    a, b = (nodes.Watch(n, 2, "127.0.0.1", port, beats=True, timeout=30.0) for n in range(2))
    for w in (a, b):
        w.on_verdict = lambda: None
        w.start()
    time.sleep(0.6)
    b.stop("failed")
    start = time.monotonic()
    message = a.verdict()
    assert message.startswith("node 1 (host ") and "failed" in message and a.code == nodes.EXIT_PEER_FAILED
    assert time.monotonic() - start < 15  # from the node's own word, not after the 30 s timeout
    a.stop(None)

    # node 0's launcher (the store's host) ends: node 1 names node 0 at once, and stops calling the store
    other = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=10))
    a, b = (nodes.Watch(n, 2, "127.0.0.1", other.port, beats=True, timeout=30.0) for n in range(2))
    for w in (a, b):
        w.on_verdict = lambda: None
        w.start()
    time.sleep(0.6)
    a.stop(None)
    del other  # node 0's launcher gone
    start = time.monotonic()
    message = b.verdict()
    assert message.startswith("lost node 0 (host ") and "store at 127.0.0.1" in message and "closed" in message
    assert time.monotonic() - start < 15 and b.store_gone  # from the closed store, not after the 30 s timeout
    b.stop(None)


def test_the_node_timeout_is_checked(monkeypatch):
    from conftest import user_error

    from aligntool.launch import nodes

    monkeypatch.setenv(nodes.ENV_TIMEOUT, "soon")
    assert nodes.ENV_TIMEOUT in user_error(nodes.timeout_s)
    monkeypatch.setenv(nodes.ENV_TIMEOUT, "1")
    assert "3 to 86400" in user_error(nodes.timeout_s)
    monkeypatch.setenv(nodes.ENV_TIMEOUT, "45")
    assert nodes.timeout_s() == 45.0
