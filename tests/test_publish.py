"""Sharing a run (docs/SHARING.md): `aligntool push` and train.push_to_hub upload the final model folder (never
checkpoints/) with a generated model card. No network here: HfApi's methods are replaced at that boundary only, and
the folder and card they would upload are checked with huggingface_hub's own readers (ModelCard.load, its pattern
filter)."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml
from conftest import cli_error
from huggingface_hub import HfApi, ModelCard
from huggingface_hub.utils import filter_repo_objects

import aligntool
from aligntool.cli import main

FAST = ["train.max_steps=2", "train.per_device_train_batch_size=4", "train.logging_steps=1", "train.save_steps=2",
        "train.max_length=48", "dataset.toy.size=16", "dataset.toy.eval_size=0", "train.eval_strategy=no"]
REPO_ID = "me/tiny-dpo"


class Calls(list):
    """HfApi.create_repo / create_branch / upload_folder, recorded instead of sent."""

    def install(self, mp):
        for name in ("create_repo", "create_branch", "upload_folder"):
            mp.setattr(HfApi, name, lambda api, *args, _name=name, **kwargs: self.append((_name, args, kwargs)))

    def named(self, name):
        return [kwargs | {"args": args} for n, args, kwargs in self if n == name]


def _no_token(mp, tmp_path):
    mp.delenv("HF_TOKEN", raising=False)
    mp.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    mp.delenv("HF_OIDC_RESOURCE", raising=False)
    from huggingface_hub import constants

    mp.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))


@pytest.fixture(scope="module")
def pushed_run(tmp_path_factory, tiny_path):
    """A 2-step DPO run of the tiny model through `aligntool train ... train.push_to_hub=true`, its push recorded."""
    out = tmp_path_factory.mktemp("run") / "dpo"
    calls = Calls()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_TOKEN", "hf_test_token")
        calls.install(mp)
        assert main(["train", "--recipe", "dpo", *FAST, f"output_dir={out}", "train.push_to_hub=true",
                     f"train.hub_model_id={REPO_ID}", "train.hub_private_repo=true"]) == 0
    return out, calls


def test_train_push_to_hub_uploads_the_final_folder_not_checkpoints(pushed_run):
    import torch

    out, calls = pushed_run
    (repo,) = calls.named("create_repo")
    assert repo["args"] == (REPO_ID,) and repo["private"] is True
    (upload,) = calls.named("upload_folder")
    assert upload["folder_path"] == str(out) and upload["repo_id"] == REPO_ID
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert any(f.startswith("checkpoints/checkpoint-2/") for f in files)  # there is something to leave out
    sent = list(filter_repo_objects(files, allow_patterns=upload.get("allow_patterns"),
                                    ignore_patterns=upload.get("ignore_patterns")))
    final = {"model.safetensors", "config.json", "tokenizer.json", "README.md", "recipe.yaml", "summary.json"}
    assert final <= set(sent)
    assert not [f for f in sent if "/" in f or f.endswith((".pt", ".bin", ".lock"))], sent
    # transformers' own push_to_hub (it would upload output_dir/checkpoints) stayed off in the Trainer's arguments
    args = torch.load(out / "checkpoints" / "checkpoint-2" / "training_args.bin", weights_only=False)
    assert args.push_to_hub is False and args.hub_model_id is None


def test_model_card_holds_the_run(pushed_run, tmp_path, capsys):
    """The card read back with huggingface_hub: metadata, method and paper, data, final metrics, the eval results
    found in the folder, the recipe, the version."""
    out, _ = pushed_run
    folder = tmp_path / "run"
    shutil.copytree(out, folder)
    assert main(["eval", "--model", str(folder), "--reference", "tiny", "--num-prompts", "4", "--max-new-tokens", "4",
                 "--out", str(folder / "eval_toy.json")]) == 0
    capsys.readouterr()
    assert main(["push", str(folder), "--repo-id", REPO_ID, "--dry-run"]) == 0
    listed = capsys.readouterr().out.split()
    assert "eval_toy.json" in listed and "model.safetensors" in listed and not any("/" in f for f in listed)
    card = ModelCard.load(folder / "README.md")
    assert {"aligntool", "dpo"} <= set(card.data.tags) and card.data.library_name == "transformers"
    assert card.data.base_model is None and not card.data.datasets  # the built-in tiny model and toy data: no hub ids
    assert "built-in tiny model" in card.text and "2305.18290" in card.text  # DPO, Rafailov et al. 2023
    summary = json.loads((folder / "summary.json").read_text())
    loss = summary["final_metrics"]["train_loss"]
    assert f"| train_loss | {loss:.4g} |" in card.text
    result = json.loads((folder / "eval_toy.json").read_text())
    got = {r.metric_type: r.metric_value for r in card.data.eval_results}
    assert got["gold_reward"] == result["gold_reward"] and got["win_rate"] == result["win_rate"]
    recipe = card.text.split("```yaml\n", 1)[1].split("```", 1)[0]
    assert yaml.safe_load(recipe) == yaml.safe_load((folder / "recipe.yaml").read_text())
    assert f"- aligntool: {aligntool.__version__}" in card.text


def test_card_names_hub_models_and_datasets(pushed_run, tmp_path):
    """A recipe on a hub model and a hub dataset: both in the card's metadata (base_model, datasets)."""
    from aligntool.publish import prepare

    out, _ = pushed_run
    folder = tmp_path / "run"
    shutil.copytree(out, folder, ignore=shutil.ignore_patterns("README.md"))
    recipe = yaml.safe_load((folder / "recipe.yaml").read_text())
    recipe["model"]["name_or_path"] = "Qwen/Qwen2.5-0.5B"
    recipe["dataset"]["path"] = "trl-lib/ultrafeedback_binarized"
    (folder / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    card = ModelCard.load(prepare(folder, REPO_ID))
    assert card.data.base_model == "Qwen/Qwen2.5-0.5B" and card.data.datasets == ["trl-lib/ultrafeedback_binarized"]


def test_push_command_sends_the_folder(pushed_run, tmp_path, monkeypatch):
    out, _ = pushed_run
    folder = tmp_path / "run"
    shutil.copytree(out, folder)
    calls = Calls()
    calls.install(monkeypatch)
    _no_token(monkeypatch, tmp_path)
    assert main(["push", str(folder), "--repo-id", REPO_ID, "--token", "hf_x", "--revision", "v1"]) == 0
    assert [n for n, _, _ in calls] == ["create_repo", "create_branch", "upload_folder"]
    (upload,) = calls.named("upload_folder")
    assert upload["folder_path"] == str(folder) and upload["revision"] == "v1"
    assert calls.named("create_repo")[0]["private"] is False


def test_push_bad_input_is_one_line(pushed_run, tmp_path, capsys, monkeypatch):
    out, _ = pushed_run
    calls = Calls()
    calls.install(monkeypatch)
    _no_token(monkeypatch, tmp_path)
    cli_error(capsys, ["push", str(out), "--repo-id", REPO_ID], "no Hugging Face token", "HF_TOKEN")
    cli_error(capsys, ["push", str(out), "--repo-id", "tiny-dpo", "--token", "x"], "--repo-id", "OWNER/NAME")
    cli_error(capsys, ["push", str(out), "--repo-id", "me/bad name", "--token", "x"], "--repo-id", "OWNER/NAME")
    empty = tmp_path / "empty"
    empty.mkdir()
    cli_error(capsys, ["push", str(empty), "--repo-id", REPO_ID, "--token", "x"], "holds no complete model")
    cli_error(capsys, ["push", str(out / "checkpoints" / "checkpoint-2"), "--repo-id", REPO_ID, "--token", "x"],
              "is a checkpoint")
    cut = tmp_path / "cut"
    shutil.copytree(out, cut, ignore=shutil.ignore_patterns("checkpoints", "tensorboard"))
    data = (cut / "model.safetensors").read_bytes()
    (cut / "model.safetensors").write_bytes(data[: len(data) // 2])  # a model cut while written
    cli_error(capsys, ["push", str(cut), "--repo-id", REPO_ID, "--token", "x"], "holds no complete model", "truncated")
    (cut / "model.safetensors").write_bytes(data)
    (cut / "README.md").write_text("# my own notes\n")
    cli_error(capsys, ["push", str(cut), "--repo-id", REPO_ID, "--token", "x"], "README.md", "--overwrite")
    assert (cut / "README.md").read_text() == "# my own notes\n"
    # train.push_to_hub: the token and the repo id are checked before anything trains
    cli_error(capsys, ["train", "--recipe", "dpo", f"output_dir={tmp_path / 'never'}", "train.push_to_hub=true",
                       f"train.hub_model_id={REPO_ID}"], "no Hugging Face token")
    cli_error(capsys, ["train", "--recipe", "dpo", "train.push_to_hub=true"], "push_to_hub needs hub_model_id")
    cli_error(capsys, ["train", "--recipe", "dpo", "train.hub_token=hf_secret"], "hub_token", "HF_TOKEN")
    assert not (tmp_path / "never").exists() and calls == []


def test_the_python_api_pushes_as_the_command_does(tmp_path, tiny_path, monkeypatch):
    """aligntool.train with train.push_to_hub: the token is checked before training (no token: UserError and no
    run folder) and the final folder is uploaded after it, as `aligntool train` does (the API skipped it before)."""
    from aligntool.errors import UserError

    keys = {"output_dir": str(tmp_path / "dpo"), "overrides": FAST,
            "train": {"push_to_hub": True, "hub_model_id": REPO_ID}}
    with pytest.MonkeyPatch.context() as mp:
        _no_token(mp, tmp_path)
        with pytest.raises(UserError, match="token"):
            aligntool.train("dpo", **keys)
    assert not (tmp_path / "dpo" / "summary.json").exists()
    calls = Calls()
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    calls.install(monkeypatch)
    result = aligntool.train("dpo", **keys)
    (upload,) = calls.named("upload_folder")
    assert upload["folder_path"] == str(result.output_dir) and upload["repo_id"] == REPO_ID
