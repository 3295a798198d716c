"""Launchers and the final model (issue 26, items 1, 12, 13 and "never Done without a loadable model").

- ``accelerate launch --config_file X``: the DeepSpeed / FSDP plugin the launcher configured becomes the run's
  ``distributed`` section (recipe.yaml and summary.json record it), the model is saved whole under every backend, and
  a recipe naming another backend is refused in one line. The launcher configs are TRL's own
  (tests/data/accelerate_configs, copied from TRL's repository, Apache-2.0).
- Every rank has the DeepSpeed config at once (TrainingArguments get the dict; deepspeed.json is a record): a rank
  building its arguments before the main process wrote the file failed the run.
- ``aligntool slurm`` creates output_dir, where SLURM opens the job's log before the script runs.
- "Done" is printed only after ``outputs.model_problem`` found a loadable model in output_dir.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, user_error

from aligntool import outputs
from aligntool.errors import UserError
from aligntool.launch import distributed
from aligntool.recipe.loader import load_recipe

CONFIGS = REPO / "tests" / "data" / "accelerate_configs"
# what accelerate's launcher (accelerate/utils/launch.py) puts in each rank's environment for TRL's two configs
ZERO3_ENV = {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3",
             "ACCELERATE_CONFIG_DS_FIELDS": "zero_stage", "ACCELERATE_MIXED_PRECISION": "no"}
FSDP2_ENV = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_RESHARD_AFTER_FORWARD": "true",
             "FSDP_OFFLOAD_PARAMS": "false", "ACCELERATE_MIXED_PRECISION": "no"}
LAUNCH_VARS = {*ZERO3_ENV, *FSDP2_ENV, "ACCELERATE_DEEPSPEED_CONFIG_FILE", "FSDP_SHARDING_STRATEGY"}


@pytest.fixture
def launcher(monkeypatch):
    """Set a launcher's environment for this test (the per-process cache of it is reset before and after)."""
    for var in LAUNCH_VARS:
        monkeypatch.delenv(var, raising=False)
    vars(distributed).get("_LAUNCHER", {}).clear()

    def set_env(env: dict):
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        vars(distributed).get("_LAUNCHER", {}).clear()

    yield set_env
    vars(distributed).get("_LAUNCHER", {}).clear()


# ------------------------------------------------------------------------------------ the launcher's backend
def test_launcher_backend_reads_what_accelerate_launch_sets(tmp_path):
    assert distributed.launcher_backend({}) is None
    assert distributed.launcher_backend({"ACCELERATE_MIXED_PRECISION": "no"}) is None  # MULTI_CPU / MULTI_GPU: DDP
    zero3 = distributed.launcher_backend(ZERO3_ENV)
    assert (zero3["backend"], zero3["zero_stage"], zero3["offload_params"]) == ("deepspeed", 3, False)
    fsdp = distributed.launcher_backend(FSDP2_ENV)
    assert (fsdp["backend"], fsdp["fsdp_sharding"]) == ("fsdp", "full_shard")
    assert distributed.launcher_backend({**FSDP2_ENV, "FSDP_RESHARD_AFTER_FORWARD": "false"})["fsdp_sharding"] \
        == "shard_grad_op"
    ds_json = tmp_path / "ds.json"
    ds_json.write_text(json.dumps({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}))
    from_file = distributed.launcher_backend({"ACCELERATE_USE_DEEPSPEED": "true",
                                              "ACCELERATE_DEEPSPEED_CONFIG_FILE": str(ds_json)})
    assert (from_file["zero_stage"], from_file["offload_optimizer"]) == (2, True)
    for env, needle in (({**FSDP2_ENV, "FSDP_VERSION": "1"}, "fsdp_version: 2"),
                        ({**ZERO3_ENV, "ACCELERATE_DEEPSPEED_ZERO_STAGE": "1"}, "ZeRO stage 1"),
                        ({**ZERO3_ENV, "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE": "nvme"}, "nvme")):
        assert needle in user_error(distributed.launcher_backend, env)


def test_the_launchers_backend_becomes_the_recipes_and_a_disagreeing_recipe_is_refused(launcher, tmp_path):
    launcher(ZERO3_ENV)
    recipe = load_recipe("dpo", [f"output_dir={tmp_path}"]).recipe
    assert "ZeRO-3" in distributed.adopt_launcher(recipe)
    assert (recipe.distributed.backend, recipe.distributed.zero_stage) == ("deepspeed", 3)
    assert "ACCELERATE_CONFIG_DS_FIELDS" not in os.environ  # accelerate refuses it beside a DeepSpeed config
    # the recipe's own keys must agree with the launcher
    message = user_error(distributed.adopt_launcher, load_recipe("dpo", ["distributed.backend=ddp"]).recipe)
    assert "DeepSpeed ZeRO-3" in message and "distributed.backend: 'ddp'" in message
    message = user_error(distributed.adopt_launcher, load_recipe(
        "dpo", ["distributed.backend=deepspeed", "distributed.zero_stage=2"]).recipe)
    assert "distributed.zero_stage: 2" in message
    same = load_recipe("dpo", ["distributed.backend=deepspeed", "distributed.zero_stage=3"]).recipe
    distributed.adopt_launcher(same)
    launcher(FSDP2_ENV | {"ACCELERATE_USE_DEEPSPEED": "false"})
    recipe = load_recipe("dpo", ["distributed.zero_stage=3"]).recipe  # a DeepSpeed-only key: not a disagreement
    distributed.adopt_launcher(recipe)
    assert recipe.distributed.backend == "fsdp" and recipe.distributed.fsdp_sharding == "full_shard"


# --------------------------------------------------------------------------- item 12: the DeepSpeed config race
def test_a_rank_builds_its_deepspeed_arguments_before_the_main_process_wrote_deepspeed_json(tmp_path, launcher):
    """A non-main rank (write=False) whose main process has not written deepspeed.json yet: its TrainingArguments
    must build (they failed with "Expected a string path to an existing deepspeed config ... deepspeed.json")."""
    from transformers import TrainingArguments

    recipe = load_recipe("dpo", ["distributed.backend=deepspeed", "distributed.zero_stage=3",
                                 f"output_dir={tmp_path}"]).recipe
    kwargs = distributed.trainer_kwargs(recipe, tmp_path, write=False)
    assert not (tmp_path / "deepspeed.json").exists()
    args = TrainingArguments(output_dir=str(tmp_path / "checkpoints"), report_to=[], **kwargs)
    assert args.hf_deepspeed_config.config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"]
    distributed.trainer_kwargs(recipe, tmp_path, write=True)  # the main process: the same config, as a record
    assert json.loads((tmp_path / "deepspeed.json").read_text()) == kwargs["deepspeed"]


def test_a_launchers_deepspeed_json_is_used_and_zero3_saves_whole_weights(tmp_path, launcher):
    user_json = tmp_path / "mine.json"
    user_json.write_text(json.dumps({"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
                                     "zero_optimization": {"stage": 3, "overlap_comm": True}}))
    launcher({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_CONFIG_FILE": str(user_json)})
    recipe = load_recipe("dpo", [f"output_dir={tmp_path}"]).recipe
    distributed.adopt_launcher(recipe)
    zero = distributed.trainer_kwargs(recipe, tmp_path)["deepspeed"]["zero_optimization"]
    assert zero == {"stage": 3, "overlap_comm": True, "stage3_gather_16bit_weights_on_model_save": True}


# ------------------------------------------------------------------------------------- the final model check
def _save_tiny(tiny_path, folder: Path) -> None:
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(tiny_path).save_pretrained(folder)


def test_model_problem_finds_what_a_run_can_leave_instead_of_a_model(tmp_path, tiny_path):
    import torch
    from safetensors.torch import load_file, save_file

    good = tmp_path / "good"
    _save_tiny(tiny_path, good)
    assert outputs.model_problem(good) is None
    outputs.check_model_saved(good)
    # ZeRO-3 without gathered weights: only DeepSpeed's shards
    shards = tmp_path / "zero3"
    (shards / "global_step2").mkdir(parents=True)
    (shards / "config.json").write_text((good / "config.json").read_text())
    assert "global_step2" in outputs.model_problem(shards) and "no loadable model" in outputs.model_problem(shards)
    # ... or placeholders: every weight an empty partition
    names = load_file(str(good / "model.safetensors"))
    save_file({k: torch.empty(0) for k in names}, str(shards / "model.safetensors"))
    assert "not gathered" in outputs.model_problem(shards)
    # a cut write
    cut = tmp_path / "cut"
    _save_tiny(tiny_path, cut)
    data = (cut / "model.safetensors").read_bytes()
    (cut / "model.safetensors").write_bytes(data[: len(data) // 2])
    assert "truncated" in outputs.model_problem(cut)
    # a sharded save whose index names a missing shard, or a weight no shard holds
    sharded = tmp_path / "sharded"
    _save_tiny(tiny_path, sharded)
    (sharded / "model.safetensors").rename(sharded / "model-00001-of-00001.safetensors")
    weight_map = {k: "model-00001-of-00001.safetensors" for k in load_file(str(good / "model.safetensors"))}
    index = sharded / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    assert outputs.model_problem(sharded) is None
    index.write_text(json.dumps({"weight_map": {**weight_map, "lm_head.extra": "model-00001-of-00001.safetensors"}}))
    assert "lm_head.extra" in outputs.model_problem(sharded)
    index.write_text(json.dumps({"weight_map": {"x": "model-00002-of-00002.safetensors"}}))
    assert "missing" in outputs.model_problem(sharded)
    # no config, and the one-line error a command ends with
    (good / "config.json").unlink()
    assert "config.json" in outputs.model_problem(good)
    message = user_error(outputs.check_model_saved, good)
    assert message.startswith(f"output_dir: {good}: the run finished but its model is not loadable")


def test_model_problem_accepts_a_lora_adapter_folder(tmp_path, tiny_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_path), LoraConfig(r=4, task_type="CAUSAL_LM"))
    model.save_pretrained(tmp_path / "adapter")
    assert outputs.model_problem(tmp_path / "adapter") is None
    (tmp_path / "adapter" / "adapter_model.safetensors").unlink()
    assert "adapter_model.safetensors" in outputs.model_problem(tmp_path / "adapter")


STEP = ["train.max_steps=1", "dataset.toy.size=16", "train.logging_steps=1", "train.save_steps=1000"]


@pytest.mark.slow
def test_a_run_whose_model_was_not_saved_ends_in_one_line_not_done(tmp_path, tiny_path, monkeypatch, capsys):
    """A trl method and an online one whose save writes nothing loadable: the CLI's last line is the error (exit 2),
    never "Done", and no summary.json claims a finished run."""
    from transformers import Trainer

    from aligntool.cli import main
    from aligntool.online.engine import Engine

    save = Trainer.save_model  # checkpoints are still written; the final save (Run.fit's) writes nothing

    monkeypatch.setattr(Trainer, "save_model", lambda self, output_dir=None, _internal_call=False:
                        save(self, output_dir, _internal_call) if _internal_call else None)
    monkeypatch.setattr(Engine, "_save_model", lambda self, folder, lm_state: None)
    for recipe, extra in (("dpo", []), ("remax", ["algo.max_new_tokens=4"])):
        out = tmp_path / recipe
        capsys.readouterr()
        assert main(["train", "--recipe", recipe, *STEP, *extra, f"output_dir={out}"]) == 2
        err = capsys.readouterr().err
        assert "Done" not in err, err
        assert err.splitlines()[-1].startswith(f"aligntool: error: output_dir: {out}: the run finished but its "
                                               "model is not loadable"), err
        assert not (out / "summary.json").exists()


# ---------------------------------------------------------------------------------------- item 13: SLURM
def test_slurm_creates_the_output_dir_where_slurm_opens_the_jobs_log(tmp_path):
    from aligntool.cli import main

    out = tmp_path / "runs" / "dpo"
    script = tmp_path / "job.sbatch"
    assert main(["slurm", "--recipe", "dpo", f"output_dir={out}", "--time", "00:10:00", "--out", str(script)]) == 0
    log_line = next(line for line in script.read_text().splitlines() if line.startswith("#SBATCH --output="))
    assert Path(log_line.split("=", 1)[1]).parent == out and out.is_dir()


def test_slurm_refuses_an_output_dir_it_cannot_create(tmp_path, capsys):
    from aligntool.cli import main

    (tmp_path / "file").write_text("")
    assert main(["slurm", "--recipe", "dpo", f"output_dir={tmp_path / 'file' / 'run'}", "--time", "00:10:00",
                 "--out", str(tmp_path / "job.sbatch")]) == 2
    assert "output_dir" in capsys.readouterr().err.splitlines()[-1]


# ------------------------------------------------------------------------- item 1: accelerate launch, end to end
def _accelerate_launch(config: str, out: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / config),
           "-m", "aligntool.cli", "train", "--recipe", "dpo", *STEP, "train.max_steps=2", *overrides,
           f"output_dir={out}"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=REPO)


@pytest.mark.slow
@pytest.mark.parametrize("config,backend", [("zero3.yaml", "deepspeed"), ("fsdp2.yaml", "fsdp")])
def test_accelerate_launch_with_trls_configs_runs_that_backend_and_saves_a_loadable_model(tmp_path, tiny_path,
                                                                                         config, backend):
    import yaml
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    proc = _accelerate_launch(config, out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Done" in proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["distributed"]["backend"] == backend
    assert summary["distributed"]["launcher"] == "accelerate launch"
    assert yaml.safe_load((out / "recipe.yaml").read_text())["distributed"]["backend"] == backend
    if backend == "deepspeed":
        assert summary["distributed"]["zero_stage"] == 3 and "ZeRO-3: weights loaded sharded" in proc.stderr
    else:
        assert "FSDP: parameters sharded over 2 processes" in proc.stderr
    assert outputs.model_problem(out) is None
    AutoModelForCausalLM.from_pretrained(out)
    if backend == "fsdp":  # the launcher's backend is the run's before --resume compares recipes: not a change
        proc = _accelerate_launch(config, out, "--resume")
        assert proc.returncode == 0 and "nothing to resume" in proc.stderr, proc.stderr[-3000:]


@pytest.mark.slow
def test_accelerate_launch_refuses_a_recipe_that_names_another_backend(tmp_path, tiny_path):
    out = tmp_path / "run"
    proc = _accelerate_launch("zero3.yaml", out, "distributed.backend=fsdp")
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("aligntool: error:")]
    assert errors and all(line == errors[0] for line in errors), proc.stderr[-3000:]
    assert "DeepSpeed ZeRO-3" in errors[0] and "distributed.backend: 'fsdp'" in errors[0]
    assert not (out / "summary.json").exists()


def test_user_error_is_raised_for_an_unreadable_launcher_config(tmp_path):
    with pytest.raises(UserError, match="cannot be read"):
        distributed.launcher_backend({"ACCELERATE_USE_DEEPSPEED": "true",
                                      "ACCELERATE_DEEPSPEED_CONFIG_FILE": str(tmp_path / "missing.json")})


@pytest.mark.slow
def test_one_process_zero3_without_a_launcher_saves_a_loadable_model(tmp_path, tiny_path):
    """One process, distributed.backend deepspeed (no torchrun): aligntool gives DeepSpeed a one-process rendezvous
    on a port the store binds itself (MASTER_PORT 0: no probed port to lose), and the ZeRO-3 model is saved whole."""
    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT")}
    proc = subprocess.run([sys.executable, "-m", "aligntool.cli", "train", "--recipe", "dpo", *STEP,
                           "distributed.backend=deepspeed", "distributed.zero_stage=3", f"output_dir={out}"],
                          capture_output=True, text=True, timeout=600, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((out / "summary.json").read_text())["distributed"]["described"] == "DeepSpeed ZeRO-3"
    assert outputs.model_problem(out) is None


def test_the_launchers_deepspeed_training_keys_fill_the_recipe_or_are_refused_when_they_differ(launcher):
    """gradient_accumulation_steps / gradient_clipping in the accelerate config's deepspeed_config: DeepSpeed's
    "auto" entries come from train.*, so the launcher's values go there (or a different recipe value is refused)."""
    launcher({**ZERO3_ENV, "ACCELERATE_CONFIG_DS_FIELDS": "zero_stage,gradient_accumulation_steps,gradient_clipping",
              "ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "4", "ACCELERATE_GRADIENT_CLIPPING": "0.5"})
    recipe = load_recipe("dpo").recipe
    distributed.adopt_launcher(recipe)
    assert (recipe.train.gradient_accumulation_steps, recipe.train.max_grad_norm) == (4, 0.5)
    message = user_error(distributed.adopt_launcher, load_recipe("dpo", ["train.gradient_accumulation_steps=2"]).recipe)
    assert "gradient_accumulation_steps 4" in message and "train.gradient_accumulation_steps 2" in message
