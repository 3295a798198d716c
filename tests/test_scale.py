"""Scale and operations: 8-bit optimizers (bitsandbytes on CPU), ..."""

import pytest
import torch
from conftest import RECIPES, REPO, train_two_processes

from aligntool.recipe.loader import load_recipe
from aligntool.train import train

pytestmark = pytest.mark.slow


def quant_state(checkpoint):
    saved = torch.load(checkpoint / "optimizer.pt", weights_only=False)
    state = saved.get("optimizer", saved)["state"]  # the online engine saves {"optimizer": ..., "scheduler": ...}
    return [s["__bnb_optimizer_quant_state__"] for s in state.values() if "__bnb_optimizer_quant_state__" in s]


@pytest.mark.parametrize("optim", ["AdamW8bit", "PagedAdamW8bit", "Lion8bit"])
def test_8bit_optimizers_train_and_keep_uint8_state(tmp_path, tiny_path, optim):
    summary = train(load_recipe(RECIPES / "sft.yaml", [
        f"output_dir={tmp_path}", f"train.optim={optim}", "train.max_steps=2", "train.save_steps=2",
        "train.eval_strategy=no", "train.per_device_train_batch_size=4", "dataset.toy.size=16",
        "dataset.toy.eval_size=0"]))
    assert summary["global_step"] == 2
    states = quant_state(tmp_path / "checkpoints" / "checkpoint-2")
    assert states and any(t.dtype == torch.uint8 for s in states for t in s.values() if torch.is_tensor(t))


def test_online_engine_uses_the_recipes_optimizer(tmp_path, tiny_path):
    train(load_recipe(RECIPES / "remax.yaml", [
        f"output_dir={tmp_path}", "train.optim=AdamW8bit", "train.max_steps=2", "train.save_steps=2",
        "train.per_device_train_batch_size=2", "algo.max_new_tokens=8", "dataset.toy.size=8"]))
    states = quant_state(tmp_path / "checkpoints" / "checkpoint-2")
    assert any(t.dtype == torch.uint8 for s in states for t in s.values() if torch.is_tensor(t))


@pytest.mark.parametrize("recipe", ["dpo", "spo"])
def test_sigkill_mid_training_then_resume_gives_bitwise_the_uninterrupted_weights(tmp_path, tiny_path, recipe):
    """Data order, RNG states, scheduler and optimizer are restored: on CPU the resumed run is bitwise equal. For SPO
    the degree head (whose gradient also reaches the policy) is restored from the checkpoint too."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from safetensors.torch import load_file

    args = ["train.max_steps=40", "train.save_steps=5", "train.per_device_train_batch_size=8", "train.logging_steps=5",
            "dataset.toy.size=320", "train.seed=3"]
    if recipe == "spo":  # half the steps: each SPO step runs a second forward for the degree head
        args = [a.replace("max_steps=40", "max_steps=20") for a in args]
    full = tmp_path / "full"
    train(load_recipe(RECIPES / f"{recipe}.yaml", [*args, f"output_dir={full}"]))

    cut = tmp_path / "cut"
    cmd = [sys.executable, "-m", "aligntool.cli", "train", "--recipe", str(RECIPES / f"{recipe}.yaml"), *args,
           f"output_dir={cut}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    marker = cut / "checkpoints" / "checkpoint-10" / "COMPLETE"
    while not marker.is_file() and proc.poll() is None:  # the run ends by itself: no clock needed
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert marker.is_file() and not (cut / "summary.json").is_file(), "the run was not cut mid-training"

    summary = train(load_recipe(RECIPES / f"{recipe}.yaml", [*args, f"output_dir={cut}"]), resume=True)
    steps = 20 if recipe == "spo" else 40
    assert (summary["global_step"] == steps
            and summary["resumed_from"].startswith(str(cut / "checkpoints" / "checkpoint-")))
    files = ["model.safetensors"] + (["spo_head.safetensors"] if recipe == "spo" else [])
    for name in files:
        a, b = load_file(str(full / name)), load_file(str(cut / name))
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (name, k)


@pytest.mark.system  # beside the real SLURM cluster's test (test_slurm_real.py), in CI's system stage
def test_slurm_script_preemption_checkpoints_requeues_and_resumes(tmp_path, tiny_path):
    """The generated sbatch script, run by bash with stand-ins for srun/scontrol and a SLURM-like environment:
    2 processes train; SIGUSR1 to the batch shell (SLURM's warning) -> checkpoint at a step end, clean exit, requeue;
    running the script again (the requeued job) resumes and finishes."""
    import json
    import os
    import signal
    import subprocess
    import time

    from aligntool.cli import main

    out = tmp_path / "run"
    script = tmp_path / "job.sbatch"
    overrides = [f"output_dir={out}", "train.max_steps=60", "train.save_steps=1000", "train.logging_steps=1",
                 "train.per_device_train_batch_size=4", "dataset.toy.size=480"]
    assert main(["slurm", "--recipe", "dpo", *overrides, "--nodes", "1", "--gpus-per-node", "2", "--time", "00:30:00",
                 "--out", str(script)]) == 0
    text = script.read_text()
    assert "#SBATCH --requeue" in text and "#SBATCH --signal=B:USR1@120" in text and "--slurm" in text

    log = tmp_path / "scontrol.log"
    env = dict(os.environ, PATH=f"{REPO / 'tests' / 'fake_slurm'}:{os.environ['PATH']}", SLURM_JOB_ID="4242",
               SLURM_NNODES="1", SLURM_JOB_NODELIST="node0", FAKE_SLURM_LOG=str(log))
    job = subprocess.Popen(["bash", str(script)], env=env, cwd=tmp_path, start_new_session=True,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = out / "metrics.jsonl"
    while job.poll() is None:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.05)
    assert job.poll() is None, job.stdout.read()[-3000:]
    os.kill(job.pid, signal.SIGUSR1)
    output = job.communicate()[0]
    assert job.returncode == 0, output[-3000:]
    assert "scontrol requeue 4242" in log.read_text()
    ckpts = [p for p in (out / "checkpoints").glob("checkpoint-*") if (p / "COMPLETE").is_file()]
    assert len(ckpts) == 1, output[-3000:]
    stopped_at = int(ckpts[0].name.split("-")[1])
    assert 3 <= stopped_at < 60 and not (out / "summary.json").exists()
    assert "preempted" in output

    again = subprocess.run(["bash", str(script)], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["global_step"] == 60 and summary["world_size"] == 2
    assert summary["resumed_from"].endswith(f"checkpoint-{stopped_at}")


def test_lora_dpo_reference_is_the_adapter_disabled_base_and_merge_lora_round_trips(tmp_path, tiny_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from aligntool import data, models
    from aligntool.cli import main
    from aligntool.train import Run

    overrides = [f"output_dir={tmp_path / 'run'}", "peft.r=4", "peft.target_modules=[q_proj, v_proj]",
                 "train.max_steps=3", "train.per_device_train_batch_size=4", "dataset.toy.size=32",
                 "train.learning_rate=1e-2"]
    loaded = load_recipe(RECIPES / "dpo.yaml", overrides)
    run = Run(loaded, tmp_path / "run")
    run.model_path = models.resolve("tiny")
    run.tokenizer = models.load_tokenizer(run.model_path)
    run.train_dataset, run.eval_dataset = data.load_for_recipe(loaded.recipe, loaded.spec.data)
    trainer = loaded.spec.load().build(run)
    assert isinstance(trainer.model, PeftModel) and trainer.ref_model is None  # no second copy of the model
    trainable = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    run.fit(trainer)
    adapter = tmp_path / "run"
    assert (adapter / "adapter_model.safetensors").is_file() and not (adapter / "model.safetensors").exists()

    assert main(["merge-lora", str(adapter), "--out", str(tmp_path / "merged")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    live = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_path), str(adapter)).eval()
    ids = torch.tensor([[2, 10, 20, 30, 40, 50]])
    with torch.no_grad():
        a, b = merged(ids).logits, live(ids).logits
        base = AutoModelForCausalLM.from_pretrained(tiny_path)(ids).logits
    assert torch.allclose(a, b, atol=1e-4) and not torch.allclose(a, base, atol=1e-4)


def test_lora_reward_model_and_eval_of_an_adapter_folder(tmp_path, tiny_path, capsys):
    import json

    from aligntool.cli import main

    train(load_recipe(RECIPES / "reward.yaml", [
        f"output_dir={tmp_path}", "peft.r=4", "train.max_steps=2", "train.per_device_train_batch_size=4",
        "dataset.toy.size=16", "dataset.toy.eval_size=0", "train.eval_strategy=no"]))
    assert json.loads((tmp_path / "adapter_config.json").read_text())["task_type"] == "SEQ_CLS"
    assert main(["eval", "--model", str(tmp_path), "--num-prompts", "8", "--json"]) == 0
    assert "pairwise_accuracy" in json.loads(capsys.readouterr().out.strip().splitlines()[-1])


SINGLE = ["train.max_steps=4", "train.logging_steps=1", "dataset.toy.size=64", "train.seed=1"]


@pytest.fixture(scope="module")
def single_process_losses(tmp_path_factory, tiny_path):
    out = tmp_path_factory.mktemp("single")
    train(load_recipe(RECIPES / "dpo.yaml",
                      [*SINGLE, "train.per_device_train_batch_size=8", f"output_dir={out}"]))
    return losses(out)


def losses(out):
    import json

    return [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


@pytest.mark.parametrize("backend", [["distributed.backend=ddp"],
                                     ["distributed.backend=deepspeed", "distributed.zero_stage=2"],
                                     ["distributed.backend=deepspeed", "distributed.zero_stage=3"],
                                     ["distributed.backend=fsdp"]], ids=["ddp", "zero2", "zero3", "fsdp"])
def test_two_processes_match_the_single_process_loss_curve(tmp_path, single_process_losses, backend):
    """2 ranks x batch 4 see the same 8 rows per step as 1 rank x batch 8 (accelerate shards each global batch), and
    the gradient is the mean over ranks: the loss curves agree to float32 reduction-order noise (tolerance 1e-4).
    DeepSpeed runs for real on CPU (its CPU accelerator, gloo): its checkpoints are DeepSpeed's (global_stepN). FSDP
    is PyTorch's FSDP2 over gloo: parameters are DTensors sharded along dim 0."""
    import json

    out = tmp_path / "run"
    _, stderr = train_two_processes("dpo", out, *SINGLE, "train.per_device_train_batch_size=4", "train.save_steps=4",
                                    *backend)
    got = losses(out)
    assert len(got) == len(single_process_losses) == 4
    assert got == pytest.approx(single_process_losses, abs=1e-4)
    if "deepspeed" in backend[0]:
        ds = json.loads((out / "deepspeed.json").read_text())
        assert ds["zero_optimization"]["stage"] == int(backend[1][-1])
    if "ddp" not in backend[0]:
        assert "distributed_type" in (out / "accelerate_config.yaml").read_text()
    if "zero_stage=3" in backend[1:]:  # built inside deepspeed.zero.Init: no rank ever held the whole model
        assert "ZeRO-3: weights loaded sharded" in stderr
    if "deepspeed" in backend[0]:  # the DeepSpeed engine wrote this checkpoint (ZeRO-partitioned states)
        assert (out / "checkpoints" / "checkpoint-4" / "global_step4").is_dir()
    if "fsdp" in backend[0]:  # FSDP2 for real, on CPUs too: each rank holds a shard of every parameter
        assert "FSDP: parameters sharded over 2 processes ((Shard(dim=0),))" in stderr
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out)  # whole weights, also after ZeRO-3 / FSDP sharding


def test_spo_head_is_trained_on_the_global_batch_with_two_processes(tmp_path, tiny_path):
    """SPO's degree head is a module of the policy, so DDP averages its gradients like any weight: 2 processes x 4 rows
    give the single-process loss curve (8 rows) and the same head. A head outside the model would train on each rank's
    4 rows alone and drift apart from the single-process one."""
    from safetensors.torch import load_file

    overrides = ["train.max_steps=3", "train.logging_steps=1", "dataset.toy.size=48", "train.seed=1",
                 "train.max_length=48"]
    single = tmp_path / "single"
    train(load_recipe(RECIPES / "spo.yaml", [*overrides, "train.per_device_train_batch_size=8",
                                                        f"output_dir={single}"]))
    double = tmp_path / "double"
    train_two_processes("spo", double, *overrides, "train.per_device_train_batch_size=4")
    assert losses(double) == pytest.approx(losses(single), abs=1e-4)
    one, two = load_file(str(single / "spo_head.safetensors")), load_file(str(double / "spo_head.safetensors"))
    for k in one:
        assert torch.allclose(one[k], two[k], atol=1e-5), k


@pytest.mark.parametrize("recipe", ["cpl", "hypo", "srpo", "spo", "sppo", "inpo", "rso"])
def test_lora_runs_with_the_other_preference_methods(tmp_path, tiny_path, recipe):
    short = ["algo.max_new_tokens=8"]
    extra = {"sppo": ["algo.iterations=1", "algo.num_samples=2", *short],
             "inpo": ["algo.iterations=1", "algo.num_samples=2", *short],
             "rso": ["algo.num_candidates=4", "algo.num_samples=2", *short], "hypo": short}.get(recipe, [])
    summary = train(load_recipe(RECIPES / f"{recipe}.yaml", [
        f"output_dir={tmp_path}", "peft.r=4", "train.max_steps=2", "train.per_device_train_batch_size=4",
        "dataset.toy.size=16", *extra]))
    assert summary["global_step"] >= 1
    adapters = list(tmp_path.rglob("adapter_model.safetensors"))
    assert adapters, "a LoRA run writes an adapter"


def test_lora_online_rl_uses_the_adapter_disabled_policy_as_reference_and_resumes(tmp_path, tiny_path):
    import json

    args = [f"output_dir={tmp_path}", "peft.r=4", "train.save_steps=2", "train.per_device_train_batch_size=4",
            "train.logging_steps=1", "algo.max_new_tokens=8", "dataset.toy.size=16", "train.learning_rate=1e-2"]
    train(load_recipe(RECIPES / "ppo.yaml", [*args, "train.max_steps=2"]))
    assert (tmp_path / "checkpoints" / "checkpoint-2" / "adapter_model.safetensors").is_file()
    summary = train(load_recipe(RECIPES / "ppo.yaml", [*args, "train.max_steps=4"]), resume=True,
                    accept_changes=True)
    assert summary["global_step"] == 4
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-5)  # a fresh adapter is the base: KL to it is 0
    assert rows[-1]["kl"] != 0.0  # the resumed adapter was trained, not re-initialised
