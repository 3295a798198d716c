"""The online methods under DeepSpeed ZeRO-3 and FSDP2, 2 processes on CPU (gloo): the same loss curves as one process.

One process with 4 prompts per iteration and two processes with 2 each train on the same global batch: the prompts
are drawn per iteration for the whole batch (``Engine.batch_prompts``), every row is sampled from its own seeded
stream (``sampling.RowSampler``), token means and advantage whitening run over the global batch, so the curves agree
to float32 reduction-order noise (tolerance 1e-4). A run stopped at iteration 2 and resumed from its ZeRO / FSDP
checkpoint gives the uninterrupted run's iteration 3.
"""

import json
import re
import subprocess
import sys

import pytest
from conftest import RECIPES, REPO

from aligntool.recipe.loader import load_recipe
from aligntool.train import train

pytestmark = pytest.mark.slow

COMMON = ["train.logging_steps=1", "algo.max_new_tokens=8", "dataset.toy.size=32", "train.seed=1",
          "train.lr_scheduler_type=constant"]
PPO = ["algo.num_minibatches=1", "algo.ppo_epochs=2"]  # several minibatches are drawn per process (as OpenRLHF)
METHODS = {"ppo": ("ppo", PPO), "ppo_separate": ("ppo", [*PPO, "algo.critic=separate"]), "remax": ("remax", []),
           "online_dpo": ("online_dpo", [])}
KEYS = {"ppo": ("policy_loss", "value_loss", "kl"), "remax": ("loss", "kl", "reward"),
        "online_dpo": ("loss", "kl", "grad_norm")}


def curve(out, recipe):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [float(v) for r in rows for v in (r["step"], *(r[k] for k in KEYS[recipe]))]  # flat: approx compares it


def launch(cmd: list[str], timeout: float) -> subprocess.CompletedProcess:
    """``cmd`` (a torchrun launch) in a session of its own. On a timeout every process of it is killed, the ranks
    included (subprocess.run would kill torchrun alone and leave its ranks running, loading the machine for the tests
    after it), and the failure names what was seen: the stderr tail, and a DeepSpeed extension lock left behind."""
    import os
    import signal

    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"the 2-process launch did not finish in {timeout} s{stale_extension_lock()}; its stderr ends: "
                    f"{err[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def stale_extension_lock() -> str:
    """Every DeepSpeed process JIT-loads its shared-memory comm op through torch.utils.cpp_extension, which holds a
    lock file in the extension's build folder while ninja checks the build; a process killed in that window leaves
    the file, and every later DeepSpeed start waits on it for ever (torch's FileBaton has no expiry)."""
    import os
    import time
    from pathlib import Path

    root = os.environ.get("TORCH_EXTENSIONS_DIR")  # else torch's default, per Python version and device kind
    version = f"py{sys.version_info[0]}{sys.version_info[1]}_cpu"
    root = Path(root) if root else Path.home() / ".cache" / "torch_extensions" / version
    lock = root / "deepspeed_shm_comm" / "lock"
    age = time.time() - lock.stat().st_mtime if lock.exists() else 0.0  # seconds since it was taken
    if age > 60:
        return f" (a lock left by a killed DeepSpeed process blocks every DeepSpeed start: {lock}; remove it)"
    return ""


@pytest.fixture(scope="module")
def single(tmp_path_factory, tiny_path):
    """Each method in one process, 4 prompts per iteration, 3 iterations."""
    root = tmp_path_factory.mktemp("single")
    curves = {}
    for name, (recipe, extra) in METHODS.items():
        train(load_recipe(RECIPES / f"{recipe}.yaml", [*COMMON, *extra, "train.max_steps=3",
                                                               "train.per_device_train_batch_size=4",
                                                               f"output_dir={root / name}"]))
        curves[name] = curve(root / name, recipe)
    return curves


@pytest.mark.parametrize("backend,resumed", [
    (["distributed.backend=deepspeed", "distributed.zero_stage=3"], "ppo_separate"),
    (["distributed.backend=fsdp"], "remax")], ids=["zero3", "fsdp2"])
def test_sharded_online_methods_match_one_process_and_resume(tmp_path, single, backend, resumed):
    """2 processes x 2 prompts, iterations 1-2, checkpoint at 2; then ``resumed`` continues from that checkpoint to
    iteration 3. All four methods run in one torchrun launch (tests/online_sharded_driver.py)."""
    from transformers import AutoModelForCausalLM

    runs = [f"{name}:{recipe}{''.join(',' + e for e in extra)}" for name, (recipe, extra) in METHODS.items()]
    recipe, extra = METHODS[resumed]
    runs.append(f"+{resumed}:{recipe}{''.join(',' + e for e in extra)},train.max_steps=3")
    # --standalone: torchrun's rendezvous binds a port of its own choosing (a port probed free and handed over could
    # be taken by another process before torchrun bound it: EADDRINUSE)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
           str(REPO / "tests" / "online_sharded_driver.py"), str(tmp_path), *runs, "--", *COMMON, *backend,
           "train.max_steps=2", "train.save_steps=2", "train.per_device_train_batch_size=2"]
    proc = launch(cmd, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name, (recipe, _) in METHODS.items():
        got, want = curve(tmp_path / name, recipe), single[name]
        if name != resumed:
            want = want[: 2 * (1 + len(KEYS[recipe]))]  # iterations 1-2
        assert len(got) == len(want), name
        assert got == pytest.approx(want, abs=1e-4), name
        checkpoint = tmp_path / name / "checkpoints" / "checkpoint-2"
        assert (checkpoint / "COMPLETE").is_file() and (checkpoint / "training_state").is_dir()
        AutoModelForCausalLM.from_pretrained(checkpoint)  # whole weights, gathered from the shards
        AutoModelForCausalLM.from_pretrained(tmp_path / name)
    assert f"Resuming from {tmp_path / resumed / 'checkpoints' / 'checkpoint-2'}" in proc.stderr
    if "distributed.backend=fsdp" in backend:
        assert proc.stderr.count("FSDP: parameters sharded over 2 processes ((Shard(dim=0),)") == len(METHODS) + 1
    else:  # the policy (and the separate critic) built inside deepspeed.zero.Init, then partitioned by the engine
        assert proc.stderr.count("ZeRO-3: weights loaded sharded (deepspeed.zero.Init)") >= len(METHODS) + 1
        held = [tuple(map(int, m)) for m in re.findall(r"this process holds (\d+) of the policy's (\d+)", proc.stderr)]
        assert len(held) == len(METHODS) + 1
        assert all(local <= total // 2 + 1024 for local, total in held), held  # about half each, never the whole
        assert (tmp_path / "ppo_separate" / "checkpoints" / "checkpoint-2" / "value_head.safetensors").is_file()


@pytest.mark.parametrize("backend", [["distributed.backend=deepspeed", "distributed.zero_stage=3"],
                                     ["distributed.backend=fsdp"]], ids=["zero3", "fsdp2"])
def test_xpo_under_zero3_or_fsdp_is_refused_in_one_line(tmp_path, tiny_path, backend):
    """XPO samples from the frozen reference, which ZeRO-3 and FSDP keep partitioned: refused before any model loads."""
    cmd = [sys.executable, "-m", "aligntool.cli", "train", "--recipe", str(RECIPES / "xpo.yaml"), *backend,
           f"output_dir={tmp_path}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert "xpo" in last and "distributed.backend" in last and "Traceback" not in proc.stderr, proc.stderr[-2000:]


@pytest.mark.parametrize("recipe,extra", [("ppo", ["algo.max_new_tokens=8"])])
def test_one_process_zero3_runs_without_a_launcher(tmp_path, tiny_path, recipe, extra):
    """`aligntool train ... distributed.backend=deepspeed` in one process (no torchrun, as on a one-GPU machine):
    DeepSpeed gets the one-process rendezvous instead of looking for MPI (mpi4py)."""
    cmd = [sys.executable, "-m", "aligntool.cli", "train", "--recipe", str(RECIPES / f"{recipe}.yaml"),
           "train.max_steps=2", "train.per_device_train_batch_size=4", "dataset.toy.size=32", *extra,
           "distributed.backend=deepspeed", "distributed.zero_stage=3", f"output_dir={tmp_path}"]
    env = {k: v for k, v in __import__("os").environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((tmp_path / "summary.json").read_text())["global_step"] == 2
