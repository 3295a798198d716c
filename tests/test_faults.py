"""Bad input and faults as a new user meets them: their own data, odd rows and files, broken model and checkpoint
files, a full disk, reruns and concurrent runs, signals. Each ends in one line (exit code 2, no traceback), or works."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from conftest import RECIPES, user_error
from test_bad_input import expect_error

from aligntool.cli import main
from aligntool.recipe.loader import load_recipe
from aligntool.train import train

QUICK = ["train.max_steps=1", "train.per_device_train_batch_size=2", "train.logging_steps=1"]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def user_rows(kind: str, n: int = 12) -> list[dict]:
    """Rows in the shape a user brings for each data kind (built from the toy world, written to a file)."""
    from aligntool.toy import world

    if kind == "preference":
        return [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in world.preference_pairs(n, seed=4)]
    if kind == "language_modeling":
        return [{"prompt": r["prompt"], "completion": r["completion"]} for r in world.sft_rows(n, seed=4)]
    if kind == "unpaired":  # KTO: each pair's chosen as a desirable row, its rejected as an undesirable one
        return [{"prompt": r["prompt"], "completion": r[col], "label": col == "chosen"}
                for r in world.preference_pairs((n + 1) // 2, seed=4) for col in ("chosen", "rejected")][:n]
    return [{"prompt": p} for p in world.prompts("train", n, seed=4)]


def recipe_names() -> list[str]:
    from aligntool.registry import ALGORITHMS

    return sorted(ALGORITHMS)


# ------------------------------------------------------------------------ 1. every recipe with the user's own file
@pytest.mark.parametrize("name", recipe_names())
def test_every_recipe_takes_a_users_file_without_an_eval_set(name, tmp_path, tiny_path):
    """The built-in recipes evaluate every N steps on toy eval rows; with the user's own file there is no eval set:
    evaluation is switched off (and said so), not a TRL error at start-up. TRL-trainer recipes are built (the failure
    was in the Trainer's constructor); the sampling methods get their prompts from the file."""
    from aligntool import data, models
    from aligntool.train import Run

    loaded = load_recipe(name, [f"output_dir={tmp_path / 'out'}"])
    data_file = write_jsonl(tmp_path / "mine.jsonl", user_rows(loaded.spec.data))
    loaded = load_recipe(name, [f"output_dir={tmp_path / 'out'}", f"dataset.path={data_file}", "train.max_steps=1"])
    module = loaded.spec.load()
    run = Run(loaded, tmp_path / "out")
    run.model_path = models.resolve("tiny")
    run.tokenizer = models.load_tokenizer(run.model_path)
    run.train_dataset, run.eval_dataset = data.load_for_recipe(loaded.recipe, loaded.spec.data, run.tokenizer)
    assert run.eval_dataset is None and len(run.train_dataset) == 12
    if loaded.spec.kind == "trl":
        trainer = module.build(run)
        assert trainer.args.eval_strategy == "no"
    else:
        assert run.trl_config().eval_strategy == "no"


def test_sft_on_a_users_file_trains_and_eval_fraction_holds_out_rows(tmp_path, tiny_path, capsys):
    data_file = write_jsonl(tmp_path / "mine.jsonl", user_rows("language_modeling", 20))
    out = tmp_path / "sft"
    assert main(["train", "--recipe", "sft", f"dataset.path={data_file}", *QUICK, f"output_dir={out}"]) == 0
    assert "train.eval_strategy 'steps' is switched off" in capsys.readouterr().err
    out2 = tmp_path / "sft2"
    assert main(["train", "--recipe", "sft", f"dataset.path={data_file}", "dataset.eval_fraction=0.25", *QUICK,
                 "train.eval_steps=1", f"output_dir={out2}"]) == 0
    summary = json.loads((out2 / "summary.json").read_text())
    assert "eval_loss" in summary["final_metrics"]
    assert "5 of 20 rows held out for evaluation" in capsys.readouterr().err


# --------------------------------------------------------------------------------------- 2, 13. odd rows and cells
@pytest.mark.parametrize("cell,needle", [
    (None, "row 3: column 'chosen' is null"),
    (7, "row 3: column 'chosen' is an int (7)"),
    ([{"role": "assistant", "content": "hi"}],
     "row 3: column 'chosen' is a conversation but earlier rows hold strings"),
    ({"a": 1}, "row 3: column 'chosen' is a dict"),
])
def test_a_bad_cell_is_named_by_row_and_column_or_dropped_on_request(cell, needle, tmp_path, capsys):
    rows = user_rows("preference", 6)
    rows[2]["chosen"] = cell
    data_file = write_jsonl(tmp_path / "pairs.jsonl", rows)
    recipe = load_recipe("dpo", [f"dataset.path={data_file}"]).recipe
    from aligntool import data

    message = user_error(data.load_for_recipe, recipe, "preference")
    assert needle in message and "drop_invalid_rows" in message
    logs = []
    recipe = load_recipe("dpo", [f"dataset.path={data_file}", "dataset.drop_invalid_rows=true"]).recipe
    train_set, _ = data.load_for_recipe(recipe, "preference", log=logs.append)
    assert len(train_set) == 5 and "dropped 1 of 6 rows" in logs[0]


def test_a_whole_null_column_and_a_null_prompt(tmp_path):
    from aligntool import data

    rows = user_rows("preference", 4)
    for r in rows:
        r["rejected"] = None
    recipe = load_recipe("dpo", [f"dataset.path={write_jsonl(tmp_path / 'a.jsonl', rows)}"]).recipe
    message = user_error(data.load_for_recipe, recipe, "preference")
    assert "row 1: column 'rejected' is null" in message and "(4 bad rows in all)" in message
    rows = user_rows("preference", 4)
    rows[1]["prompt"] = None
    recipe = load_recipe("dpo", [f"dataset.path={write_jsonl(tmp_path / 'b.jsonl', rows)}"]).recipe
    assert "row 2: column 'prompt' is null" in user_error(data.load_for_recipe, recipe, "preference")


@pytest.mark.parametrize("content,needles", [
    (b"", ["the file is empty"]),
    (b"\n\n   \n", ["the file is empty"]),
    (b'{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "\xff\xfe", "chosen": "b"}\n',
     ["pairs.jsonl:2", "not UTF-8", "0xff"]),
    (b'[1, 2]\n', ["pairs.jsonl:1", "one JSON object per line"]),
])
def test_empty_blank_and_non_utf8_files(content, needles, capsys, tmp_path):
    data_file = tmp_path / "pairs.jsonl"
    data_file.write_bytes(content)
    expect_error(capsys, ["train", "--recipe", "dpo", f"dataset.path={data_file}", f"output_dir={tmp_path}/o"],
                 *needles)


def test_empty_csv_and_parquet_files(capsys, tmp_path):
    for name in ("pairs.csv", "pairs.parquet"):
        (tmp_path / name).write_bytes(b"")
        expect_error(capsys, ["train", "--recipe", "dpo", f"dataset.path={tmp_path / name}",
                              f"output_dir={tmp_path}/o"], name, "empty")


def test_conversational_prompts_for_an_online_method_go_through_the_chat_template(tmp_path, tiny_path):
    rows = [{"prompt": [{"role": "user", "content": p["prompt"]}]} for p in user_rows("prompt", 8)]
    data_file = write_jsonl(tmp_path / "chat.jsonl", rows)
    summary = train(load_recipe("remax", [f"dataset.path={data_file}", *QUICK, "algo.max_new_tokens=4",
                                          f"output_dir={tmp_path / 'o'}"]))
    assert summary["global_step"] == 1
    from aligntool import data, models

    recipe = load_recipe("remax", [f"dataset.path={data_file}"]).recipe
    prompts, _ = data.load_for_recipe(recipe, "prompt", models.load_tokenizer(str(tiny_path)))
    assert prompts[0]["prompt"].startswith("<|user|>") and prompts[0]["prompt"].endswith("<|assistant|>")


# --------------------------------------------------------------------------------- 3, 4, 16. odd recipes and files
def test_error_messages_survive_exceptions_without_text():
    from aligntool.errors import first_line

    assert first_line(ValueError()) == "ValueError"
    assert first_line(ValueError("\n  \nsecond")) == "second"


@pytest.mark.parametrize("content,needles", [
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xd8", ["not a text file"]),
    ("algorithm: dpo\ntrain:\n  max_steps: 3\n  seed: 1\n  max_steps: 5\n".encode(),
     [":5:", "duplicate key 'max_steps' (first at line 3)"]),
    (b"algorithm: dpo\nx: !!python/object/apply:os.system ['echo hi']\n",
     [":2:", "YAML tag '!!python/object/apply:os.system' is not allowed"]),
    (b"algorithm: dpo\ntrain:\n  learning_rate: .inf\n", [":3", "train.learning_rate", "finite number"]),
    (b"algorithm: dpo\nalgo:\n  beta: .nan\n", [":3", "algo.beta", "finite number"]),
])
def test_odd_recipe_files(content, needles, capsys, tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_bytes(content)
    expect_error(capsys, ["train", "--recipe", str(path)], *needles)
    assert not (tmp_path / "runs").exists()


def test_non_finite_and_mistyped_train_extras(capsys):
    expect_error(capsys, ["train", "--recipe", "dpo", "train.adam_beta1=nan"], "train.adam_beta1", "expected float")
    expect_error(capsys, ["train", "--recipe", "dpo", "train.adam_beta1=.nan"], "adam_beta1", "not a finite number")


def test_unpack_to_a_file_and_bon_with_a_half_written_reward_folder(capsys, tmp_path, tiny_path):
    target = tmp_path / "file"
    target.write_text("")
    expect_error(capsys, ["unpack", str(tmp_path), "--out", str(target)], "--out", "is a file")
    half = tmp_path / "rm-half"
    half.mkdir()
    (half / "tokenizer.json").write_text("{}")
    good = tmp_path / "rm-good"
    shutil.copytree(tiny_path, good)
    expect_error(capsys, ["bon", "--reward", str(good), "--reward", str(half), "--n", "2"], "rm-half", "no model here")


# ------------------------------------------------------------------------------------------ 5. nothing survives
@pytest.mark.parametrize("recipe", ["dpo", "sft"])
def test_max_length_that_drops_every_row(recipe, capsys, tmp_path, tiny_path):
    expect_error(capsys, ["train", "--recipe", recipe, "train.max_length=3", *QUICK, "dataset.toy.size=8",
                          f"output_dir={tmp_path}/o"], "train.max_length", "all 8 training rows were dropped")


# -------------------------------------------------------------------------------- 6, 7. wrong and broken models
def reward_model(tiny_path, out):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(tiny_path, num_labels=1)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_path).save_pretrained(out)
    return out


def test_a_reward_model_given_as_policy_or_reference(capsys, tmp_path, tiny_path):
    rm = reward_model(tiny_path, tmp_path / "rm")
    capsys.readouterr()  # transformers' load report of the new head
    expect_error(capsys, ["train", "--recipe", "dpo", f"model.name_or_path={rm}", *QUICK, "dataset.toy.size=4",
                          f"output_dir={tmp_path}/a"], "model.name_or_path", "LlamaForSequenceClassification",
                 "needs a causal language model")
    expect_error(capsys, ["train", "--recipe", "dpo", f"ref_model.name_or_path={rm}", *QUICK, "dataset.toy.size=4",
                          f"output_dir={tmp_path}/b"], "ref_model.name_or_path", "needs a causal language model")
    expect_error(capsys, ["train", "--recipe", "remax", f"model.name_or_path={rm}", *QUICK, "dataset.toy.size=4",
                          f"output_dir={tmp_path}/c"], "model.name_or_path", "needs a causal language model")


def test_a_truncated_model_file_is_named_in_every_command(capsys, tmp_path, tiny_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_path, broken)
    weights = broken / "model.safetensors"
    with weights.open("r+b") as fh:
        fh.truncate(weights.stat().st_size // 2)
    needles = ["model.safetensors", "truncated or corrupted"]
    expect_error(capsys, ["eval", "--model", str(broken), "--num-prompts", "2"], *needles)
    expect_error(capsys, ["train", "--recipe", "dpo", f"model.name_or_path={broken}", *QUICK, "dataset.toy.size=4",
                          f"output_dir={tmp_path}/o"], *needles)
    expect_error(capsys, ["soup", str(tiny_path), str(broken), "--out", str(tmp_path / "s")], *needles)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(broken),
                                                             "peft_type": "LORA", "task_type": "CAUSAL_LM"}))
    expect_error(capsys, ["merge-lora", str(adapter), "--out", str(tmp_path / "m")], *needles)


# ------------------------------------------------------------------------------------------------ 8. full disk
def test_a_full_disk_ends_in_one_line_and_resume_works_once_space_is_freed(capsys, tmp_path, tiny_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=12m", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here")
    try:
        args = ["train", "--recipe", "dpo", "train.max_steps=8", "train.save_steps=2", "dataset.toy.size=64",
                "train.per_device_train_batch_size=8", f"output_dir={disk}/run"]
        last = expect_error(capsys, args, "no space left on the device", "a checkpoint here takes",
                            "checkpoint-2 is intact", "--resume")
        assert str(disk / "run") in last
        subprocess.run(["mount", "-o", "remount,size=80m", str(disk)], check=True)
        assert main([*args, "--resume"]) == 0
        summary = json.loads((disk / "run" / "summary.json").read_text())
        assert summary["global_step"] == 8 and summary["resumed_from"].endswith("checkpoint-2")
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)


# ------------------------------------------------------------------------------------------------ 9. divergence
def test_a_diverging_run_stops_with_the_step_and_the_last_good_checkpoint(capsys, tmp_path, tiny_path):
    last = expect_error(capsys, ["train", "--recipe", "dpo", "train.learning_rate=1e30", "train.max_steps=6",
                                 "train.save_steps=1", "train.logging_steps=1", "train.per_device_train_batch_size=4",
                                 "dataset.toy.size=32", f"output_dir={tmp_path}/o"], "training diverged", "at step")
    assert "last good checkpoint" in last
    assert not (tmp_path / "o" / "summary.json").exists()


# ---------------------------------------------------------------------------- 10, 11. reruns and concurrent runs
def test_a_finished_run_is_not_overwritten_without_asking(capsys, tmp_path, tiny_path):
    args = ["train", "--recipe", "dpo", *QUICK, "dataset.toy.size=4", f"output_dir={tmp_path}/o"]
    assert main(args) == 0
    stamp = (tmp_path / "o" / "model.safetensors").stat().st_mtime_ns
    expect_error(capsys, args, "already holds a finished run", "--resume", "--overwrite")
    assert (tmp_path / "o" / "model.safetensors").stat().st_mtime_ns == stamp
    assert main([*args, "--overwrite"]) == 0
    assert not (tmp_path / "o" / ".aligntool.lock").exists()


def test_a_second_run_into_the_same_folder_is_refused_while_the_first_runs(capsys, tmp_path, tiny_path):
    out = tmp_path / "o"
    first = subprocess.Popen([sys.executable, "-m", "aligntool.cli", "train", "--recipe", "dpo", "train.max_steps=400",
                              "dataset.toy.size=64", "train.per_device_train_batch_size=2", f"output_dir={out}"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        lock = out / ".aligntool.lock"
        while first.poll() is None and not (lock.is_file() and lock.read_text().startswith("pid")):
            time.sleep(0.05)
        assert first.poll() is None
        expect_error(capsys, ["train", "--recipe", "dpo", *QUICK, f"output_dir={out}"],
                     "in use by another aligntool run", f"pid {first.pid}")
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()


# ------------------------------------------------------------------------------- 12. a corrupted checkpoint file
@pytest.mark.parametrize("name,damage", [
    ("model.safetensors", "truncate"), ("optimizer.pt", "truncate"), ("scheduler.pt", "truncate"),
    ("rng_state.pth", "truncate"), ("trainer_state.json", "garbage"),
])
def test_checkpoint_problems_are_found_by_a_cheap_check(name, damage, tmp_path, tiny_path, dpo_checkpoints):
    from aligntool.outputs import checkpoint_problem

    ckpt = tmp_path / "checkpoint-4"
    shutil.copytree(dpo_checkpoints / "checkpoint-4", ckpt)
    assert checkpoint_problem(ckpt) is None
    file = ckpt / name
    if damage == "truncate":
        with file.open("r+b") as fh:
            fh.truncate(file.stat().st_size // 2)
    else:
        file.write_text("{not json")
    assert name in checkpoint_problem(ckpt)


@pytest.fixture(scope="module")
def dpo_checkpoints(tmp_path_factory, tiny_path):
    out = tmp_path_factory.mktemp("dpo")
    train(load_recipe("dpo", ["train.max_steps=4", "train.save_steps=2", "train.per_device_train_batch_size=4",
                              "dataset.toy.size=32", f"output_dir={out}"]))
    return out / "checkpoints"


def test_resume_falls_back_past_a_corrupted_latest_checkpoint(capsys, tmp_path, tiny_path, dpo_checkpoints):
    out = tmp_path / "o"
    shutil.copytree(dpo_checkpoints.parent, out)
    (out / "summary.json").unlink()  # as if cut after checkpoint-4
    weights = out / "checkpoints" / "checkpoint-4" / "model.safetensors"
    with weights.open("r+b") as fh:
        fh.truncate(100)
    summary = train(load_recipe("dpo", ["train.max_steps=6", "train.save_steps=2",
                                        "train.per_device_train_batch_size=4", "dataset.toy.size=32",
                                        f"output_dir={out}"]), resume=True, accept_changes=True)
    assert summary["resumed_from"].endswith("checkpoint-2") and summary["global_step"] == 6
    assert "skipping" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------- security
class Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['EXPLOIT_MARK']}",))


def test_a_crafted_pickle_in_an_online_checkpoint_is_refused(capsys, tmp_path, tiny_path, monkeypatch):
    import torch

    args = ["train", "--recipe", "remax", "train.save_steps=1", "train.per_device_train_batch_size=2",
            "algo.max_new_tokens=4", "dataset.toy.size=4", f"output_dir={tmp_path}/o"]
    assert main([*args, "train.max_steps=1"]) == 0
    mark = tmp_path / "pwned"
    monkeypatch.setenv("EXPLOIT_MARK", str(mark))
    torch.save({"optimizer": Exploit()}, tmp_path / "o" / "checkpoints" / "checkpoint-1" / "optimizer.pt")
    expect_error(capsys, [*args, "train.max_steps=2", "--resume", "--accept-changes"], "optimizer.pt", "refused")
    assert not mark.exists()


def test_reward_functions_are_found_beside_the_recipe(tmp_path, tiny_path, monkeypatch):
    folder = tmp_path / "project"
    folder.mkdir()
    (folder / "my_scores.py").write_text("def length(prompts, completions):\n"
                                         "    return [float(len(c)) for c in completions]\n")
    recipe = folder / "r.yaml"
    recipe.write_text((RECIPES / "remax.yaml").read_text() + "\n")
    monkeypatch.chdir(tmp_path)  # neither the working directory nor sys.path holds the module
    summary = train(load_recipe(recipe, ["reward.source=my_scores:length", *QUICK, "algo.max_new_tokens=4",
                                         "dataset.toy.size=4", f"output_dir={tmp_path / 'o'}"]))
    assert summary["global_step"] == 1 and "my_scores" not in sys.modules or sys.modules.pop("my_scores")


# ------------------------------------------------------------------------------------------------ 14, 15. signals
def test_sigterm_stops_a_tiny_model_build_at_once_and_leaves_nothing(tmp_path):
    env = dict(os.environ, ALIGNTOOL_CACHE=str(tmp_path / "cache"))
    proc = subprocess.Popen([sys.executable, "-m", "aligntool.cli", "tiny"], env=env, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    seen = ""
    while proc.poll() is None and "pretraining the tiny model" not in seen:
        seen += proc.stderr.read(1)
    proc.send_signal(signal.SIGTERM)
    proc.wait()
    # stopped by the signal (an ignored SIGTERM would let the build finish and exit 0), and cleaned up
    assert proc.returncode == 128 + signal.SIGTERM, proc.returncode
    assert "Building the built-in tiny model" in seen
    assert not list((tmp_path / "cache").glob(".tiny-build-*")) and not list((tmp_path / "cache").glob("tiny-v*"))


@pytest.mark.parametrize("nproc,sig", [(1, signal.SIGUSR1), (2, signal.SIGTERM)])
def test_a_preempted_run_exits_75_after_its_checkpoint(tmp_path, tiny_path, nproc, sig):
    """So `aligntool train ... && aligntool eval ...` does not evaluate a half-trained model. With 2 processes the
    launcher passes the signal to the ranks, which checkpoint and end cleanly (no torchrun failure report)."""
    out = tmp_path / "o"
    proc = subprocess.Popen([sys.executable, "-m", "aligntool.cli", "train", "--recipe", "dpo", "--nproc", str(nproc),
                             "train.max_steps=400", "train.logging_steps=1", "train.save_steps=1000",
                             "dataset.toy.size=128", "train.per_device_train_batch_size=2", f"output_dir={out}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    metrics = out / "metrics.jsonl"
    while proc.poll() is None and not (metrics.is_file() and metrics.read_text().count("\n") >= 2):
        time.sleep(0.05)
    proc.send_signal(sig)
    err = proc.communicate()[1]
    assert proc.returncode == 75, err[-2000:]
    assert err.count("aligntool: preempted") == 1 and "Traceback" not in err, err[-2000:]
    assert not (out / "summary.json").exists()
    from aligntool.outputs import latest_checkpoint

    assert latest_checkpoint(out / "checkpoints") is not None


def test_build_threads_on_a_busy_machine(monkeypatch):
    import torch

    from aligntool.toy import tiny

    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    monkeypatch.setattr(os, "getloadavg", lambda: (3.8, 3.0, 3.0))
    messages = []
    with tiny.build_threads(messages.append) as n:
        assert n == 1 and torch.get_num_threads() == 1
    assert torch.get_num_threads() == before and "OMP_NUM_THREADS" in messages[0]
    monkeypatch.setattr(os, "getloadavg", lambda: (0.2, 0.2, 0.2))
    with tiny.build_threads(messages.append) as n:
        assert n == before and len(messages) == 1


def test_doctor_reports_versions_and_devices(capsys):
    assert main(["doctor", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    import torch
    import trl

    assert report["environment"]["torch"] == torch.__version__ and report["environment"]["trl"] == trl.__version__
    assert "CPU cores" in report["environment"] and isinstance(report["warnings"], list)


def test_doctor_finds_a_requirement_conflict(monkeypatch):
    from aligntool import doctor

    monkeypatch.setattr(doctor.md, "requires", lambda name: ["transformers>=99"] if name == "vllm" else [])
    assert doctor.requirement_conflicts({"vllm": "0.32.0", "transformers": "5.24.0"}) == [
        "vllm 0.32.0 requires transformers>=99, found 5.24.0"]
