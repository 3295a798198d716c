"""``train.report_to`` for every method, read back with each tracker's own reader: TensorBoard event files
(tensorboard's EventAccumulator), an offline W&B run (its .wandb file: wandb's protobuf records) and an MLflow file
store (MlflowClient.get_metric_history), each equal to metrics.jsonl; completions.jsonl (its rows, fields and
interval, the rewards recomputed here); the online evaluation on held-out prompts (its interval, and its mean and
standard error recomputed here from the completions the reward function saw); and a tracker whose package is missing
(one line, exit code 2). One online method (REINFORCE++) and one TRL-based method (GRPO), each in one run with all
three trackers."""

from __future__ import annotations

import json
import math
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import RECIPES, REPO

# a reward with a value per completion that the test recomputes; it records each call (prompts, completions, values)
REWARD = '''\
import json, os

def vowels(prompts, completions, **columns):
    values = [sum(ch in "aeiou" for ch in c) / max(1, len(c)) for c in completions]
    with open(os.environ["TRK_CALLS"], "a") as fh:
        fh.write(json.dumps([prompts, completions, values]) + "\\n")
    return values
'''


def vowels(completion: str) -> float:
    return sum(ch in "aeiou" for ch in completion) / max(1, len(completion))


def run_cli(tmp_path: Path, recipe: str, *overrides: str) -> Path:
    (tmp_path / "trk_reward.py").write_text(REWARD)
    out = tmp_path / "out"
    env = {**{k: v for k, v in os.environ.items() if k not in ("WANDB_PROJECT", "MLFLOW_EXPERIMENT_NAME")},
           "WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path), "WANDB_SILENT": "true",
           "MLFLOW_TRACKING_URI": f"file:{tmp_path / 'mlruns'}", "MLFLOW_ALLOW_FILE_STORE": "true",
           "TRK_CALLS": str(tmp_path / "calls.jsonl"), "PYTHONPATH": f"{REPO}:{tmp_path}"}
    proc = subprocess.run([sys.executable, "-m", "aligntool.cli", "train", "--recipe",
                           str(RECIPES / f"{recipe}.yaml"), f"output_dir={out}", "model.name_or_path=tiny",
                           "reward.function=trk_reward:vowels", "train.report_to=[tensorboard,wandb,mlflow]",
                           *overrides], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def jsonl(path: Path) -> list:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ----------------------------------------------------------------------------------------- the trackers' readers
def tensorboard_scalars(folder: Path) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def wandb_history(root: Path) -> list[dict]:
    """The history rows of the one offline W&B run under ``root``: its .wandb file is a LevelDB-style log (a 7-byte
    ":W&B" header, 32 KiB blocks of records with a 7-byte header: crc, length, type full/first/middle/last) of
    wandb's own protobuf ``Record`` messages."""
    from wandb.proto import wandb_internal_pb2 as pb

    (file,) = root.glob("**/offline-run-*/run-*.wandb")
    data, pos, block, records, part = file.read_bytes(), 7, 32768, [], b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if length == 0 and kind == 0:
            pos += left
            continue
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        part = chunk if kind in (1, 2) else part + chunk
        if kind in (1, 4):
            records.append(part)
    rows, projects = [], set()
    for raw in records:
        record = pb.Record()
        record.ParseFromString(raw)
        if record.WhichOneof("record_type") == "history":
            rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item})
        elif record.WhichOneof("record_type") == "run":
            projects.add(record.run.project)
    # the same project for every method: 'aligntool' (transformers' callback alone would use 'huggingface')
    assert projects == {"aligntool"}, projects
    return rows


def mlflow_history(tracking: Path, keys: list[str]) -> dict[str, dict[int, float]]:
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"file:{tracking}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1, runs
    # the same experiment for every method: 'aligntool' (transformers' callback alone would use MLflow's Default)
    names = {e.experiment_id: e.name for e in client.search_experiments()}
    assert names[runs[0].info.experiment_id] == "aligntool", names
    run_id = runs[0].info.run_id
    return {k: {m.step: m.value for m in client.get_metric_history(run_id, k)} for k in keys}


def series(rows: list[dict], key: str) -> dict[int, float]:
    return {r["step"]: r[key] for r in rows if key in r and r[key] is not None}


def assert_same(got: dict[int, float], want: dict[int, float], what: str) -> None:
    assert want, what
    assert sorted(got) == sorted(want), (what, got, want)
    for step, value in want.items():
        assert got[step] == pytest.approx(value, rel=1e-6, abs=1e-6), (what, step)


def final_kl(policy: Path, reference: Path, prompts: list[str], completions: list[str]) -> list[float]:
    """Per completion: sum over its tokens of log pi(y_t | x, y_<t) - log pi_ref(y_t | x, y_<t), each sequence run
    alone (no padding); the completion's text tokenized again (8 tokens each: cut off at max_new_tokens)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from aligntool.tokens import encode_prompts

    tok = AutoTokenizer.from_pretrained(policy)
    models = [AutoModelForCausalLM.from_pretrained(m).eval() for m in (policy, reference)]
    out = []
    for prompt_ids, completion in zip(encode_prompts(tok, prompts), completions):
        ids = tok(completion, add_special_tokens=False)["input_ids"]
        assert len(ids) == 8 and tok.decode(ids) == completion, completion
        seq = torch.tensor([prompt_ids + ids])
        logps = []
        with torch.no_grad():
            for model in models:
                lp = torch.log_softmax(model(seq).logits[0].float(), -1)
                logps.append(sum(lp[len(prompt_ids) - 1 + t, y].item() for t, y in enumerate(ids)))
        out.append(logps[0] - logps[1])
    return out


# ----------------------------------------------------------------------------------------------------- online
def test_online_method_reports_to_every_tracker_evaluates_and_samples(tmp_path, tiny_path):
    """REINFORCE++, 3 iterations, an eval set of 4 held-out prompts evaluated every 2 iterations and at the end,
    completions every 2 iterations: TensorBoard, W&B and MLflow hold exactly metrics.jsonl's values at its steps."""
    out = run_cli(tmp_path, "reinforce_pp", "train.max_steps=3", "train.per_device_train_batch_size=2",
                  "algo.num_minibatches=1", "algo.max_new_tokens=8", "dataset.toy.size=16",
                  "dataset.eval_fraction=0.25", "train.eval_steps=2", "train.logging_steps=1",
                  "train.completions_steps=2", "train.num_completions_to_log=3", "train.seed=3",
                  "train.per_device_eval_batch_size=3")
    rows = jsonl(out / "metrics.jsonl")
    train_rows = [r for r in rows if "reward" in r]
    eval_rows = [r for r in rows if "eval_reward" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3]
    assert [r["step"] for r in eval_rows] == [2, 3]  # every eval_steps, and the final model
    for r in train_rows:  # TRL's names for the same quantities
        assert {"reward", "reward_std", "kl", "entropy", "completions/mean_length", "completions/clipped_ratio",
                "clip_ratio/region_mean"} <= r.keys()

    # the evaluation: one sample per held-out prompt, scored by the reward source; recomputed from its calls
    calls = jsonl(tmp_path / "calls.jsonl")
    # training calls score 2 rows each (the batch); an evaluation scores its 4 prompts in chunks of 3 and 1
    # (per_device_eval_batch_size: the memory bound), each chunk one call
    chunks = [c for c in calls if len(c[0]) != 2]
    assert [len(c[0]) for c in chunks] == [3, 1, 3, 1] and len(calls) == 3 + 4
    evals = [(a[0] + b[0], a[1] + b[1]) for a, b in zip(chunks[::2], chunks[1::2])]
    for call, row in zip(evals, eval_rows):
        values = [vowels(c) for c in call[1]]
        mean = sum(values) / 4
        stderr = math.sqrt(sum((v - mean) ** 2 for v in values) / 3 / 4)
        assert row["eval_reward"] == pytest.approx(mean, abs=1e-9)
        assert row["eval_reward_stderr"] == pytest.approx(stderr, abs=1e-9)
        assert row["eval_num_prompts"] == 4 and math.isfinite(row["eval_kl"])
    # the final evaluation's KL: the saved final model and the reference on the same completions, a plain forward
    kl = final_kl(out, tiny_path, evals[1][0], evals[1][1])
    assert eval_rows[1]["eval_kl"] == pytest.approx(sum(kl) / 4, abs=1e-4)
    assert eval_rows[1]["eval_kl_stderr"] == pytest.approx(
        math.sqrt(sum((k - sum(kl) / 4) ** 2 for k in kl) / 3 / 4), abs=1e-4)
    train_prompts = {p for c in calls if len(c[0]) == 2 for p in c[0]}
    assert not train_prompts & set(evals[0][0]) and evals[0][0] == evals[1][0]  # held out; the same prompts

    # completions.jsonl: at iteration 2 only, up to 3 rows of the iteration's sampled completions with their rewards
    done = jsonl(out / "completions.jsonl")
    assert [r["step"] for r in done] == [2, 2]  # the batch's 2 rows (of at most 3)
    second = calls[1]  # iteration 2's training call (iteration 1's, then 2's, then evaluation)
    assert [(r["prompt"], r["completion"]) for r in done] == list(zip(second[0], second[1]))[:3]
    assert [r["reward"] for r in done] == pytest.approx([vowels(r["completion"]) for r in done])

    keys = ["reward", "kl", "entropy", "completions/mean_length", "learning_rate"]
    tb = tensorboard_scalars(out / "tensorboard")
    for key in keys:
        assert_same(tb[f"train/{key}"], series(train_rows, key), f"tensorboard {key}")
    for key in ("reward", "reward_stderr", "kl"):
        assert_same(tb[f"eval/{key}"], series(eval_rows, f"eval_{key}"), f"tensorboard eval {key}")

    history = wandb_history(tmp_path)
    for key in keys:
        got = {h["_step"]: h[f"train/{key}"] for h in history if f"train/{key}" in h}
        assert_same(got, series(train_rows, key), f"wandb {key}")
    got = {h["_step"]: h["eval/reward"] for h in history if "eval/reward" in h}
    assert_same(got, series(eval_rows, "eval_reward"), "wandb eval reward")
    (table,) = tmp_path.glob("**/offline-run-*/files/media/table/completions_2_*.table.json")
    data = json.loads(table.read_text())
    assert [row[data["columns"].index("completion")] for row in data["data"]] == [r["completion"] for r in done]

    ml = mlflow_history(tmp_path / "mlruns", [*keys, "eval_reward", "eval_kl"])
    for key in keys:
        assert_same(ml[key], series(train_rows, key), f"mlflow {key}")
    for key in ("eval_reward", "eval_kl"):
        assert_same(ml[key], series(eval_rows, key), f"mlflow {key}")


# ------------------------------------------------------------------------------------------------ TRL-based
def test_trl_method_reports_to_every_tracker_and_samples(tmp_path, tiny_path):
    """GRPO, 3 steps: transformers' integrations hold metrics.jsonl's values; completions.jsonl has the first 3 of
    step 2's generation batch with their rewards (recomputed here) and advantages."""
    out = run_cli(tmp_path, "grpo", "train.max_steps=3", "train.per_device_train_batch_size=8", "train.logging_steps=1",
                  "train.save_steps=100", "algo.num_generations=4", "algo.max_completion_length=6",
                  "dataset.toy.size=16", "train.completions_steps=2", "train.num_completions_to_log=3")
    rows = [r for r in jsonl(out / "metrics.jsonl") if "reward" in r]
    assert [r["step"] for r in rows] == [1, 2, 3]
    done = jsonl(out / "completions.jsonl")
    assert [r["step"] for r in done] == [2, 2, 2]
    calls = jsonl(tmp_path / "calls.jsonl")  # one call per generation batch of 8: steps 1, 2, 3
    assert len(calls) == 3 and [(r["prompt"], r["completion"]) for r in done] == list(zip(*calls[1][:2]))[:3]
    assert [r["reward"] for r in done] == pytest.approx([vowels(r["completion"]) for r in done])
    assert all(isinstance(r["advantage"], float) for r in done)
    # and as a W&B table (the offline run's media files): the same rows
    (table,) = tmp_path.glob("**/offline-run-*/files/media/table/completions_*.table.json")
    data = json.loads(table.read_text())
    got = [dict(zip(data["columns"], row)) for row in data["data"]]
    assert [(g["step"], g["prompt"], g["completion"]) for g in got] == [(2, r["prompt"], r["completion"]) for r in done]
    assert [g["reward"] for g in got] == pytest.approx([r["reward"] for r in done])

    keys = ["reward", "reward_std", "loss", "completions/mean_length"]
    tb = tensorboard_scalars(out / "tensorboard")
    history = wandb_history(tmp_path)
    ml = mlflow_history(tmp_path / "mlruns", keys)
    for key in keys:
        want = series(rows, key)
        assert_same(tb[f"train/{key}"], want, f"tensorboard {key}")
        assert_same({h["train/global_step"]: h[f"train/{key}"] for h in history if f"train/{key}" in h}, want,
                    f"wandb {key}")
        assert_same(ml[key], want, f"mlflow {key}")


# ------------------------------------------------------------------------------------------ missing package
CHILD = r'''
import sys
sys.modules["wandb"] = None  # not installed, as far as this process can tell
from aligntool.cli import main
for recipe in sys.argv[2:]:
    rc = main(["train", "--recipe", recipe, f"output_dir={sys.argv[1]}", "train.report_to=[tensorboard,wandb]"])
    print(f"rc {rc}", file=sys.stderr, flush=True)
'''


def test_a_tracker_that_is_not_installed_is_one_line_naming_the_package(tmp_path):
    """For an online method (ReMax: accelerate's trackers) and a TRL-based one (DPO: transformers' integrations)."""
    recipes = [str(RECIPES / f"{name}.yaml") for name in ("remax", "dpo")]
    proc = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path / "out"), *recipes], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert lines[1::2] == ["rc 2", "rc 2"], proc.stderr  # one line each, then the exit code
    for line in lines[0::2]:
        assert "train.report_to: wandb needs the wandb package" in line, line
        assert "pip install 'aligntool[trackers]'" in line, line
    assert not (tmp_path / "out" / "metrics.jsonl").exists()  # refused before anything ran
