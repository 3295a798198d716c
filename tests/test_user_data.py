"""A user's own data and settings (issue 26 items 6, 8 and 10): what a recipe names is what the run uses, or a
one-line error says why not."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import user_error

from aligntool import data
from aligntool.recipe.loader import load_recipe

HH = Path(__file__).parent / "data" / "hh-rlhf" / "harmless-base-test-50.jsonl"


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ------------------------------------------------------------------------------ item 8: implicit prompts, HH-RLHF
def test_hh_dialogues_split_at_the_last_assistant_turn_not_mid_word():
    """15 of these 50 HH rows have replies that start alike (`Assistant: D` | `uckduckgo`): the common start ran into
    the reply; the prompt now ends at the last "\\n\\nAssistant:" as TRL's HH conversion script splits it."""
    logs = []
    recipe = load_recipe("dpo", [f"dataset.path={HH}"]).recipe
    train, _ = data.load_for_recipe(recipe, "preference", log=logs.append)
    raw = _rows(HH)
    assert len(train) == len(raw) == 50
    for row, given in zip(train, raw):
        assert row["prompt"].endswith("\n\nAssistant:"), row["prompt"][-30:]
        assert row["prompt"] + row["chosen"] == given["chosen"] and row["prompt"] + row["rejected"] == given["rejected"]
        assert row["chosen"].startswith(" ") and row["rejected"].startswith(" ")
        assert "\n\nAssistant:" not in row["chosen"] and "\n\nAssistant:" not in row["rejected"]
    duck = next(r for r in train if "dark web" in r["prompt"] and "uckduckgo" in r["chosen"])
    assert duck["chosen"].startswith(" Duckduckgo") and duck["rejected"].startswith(" DDG")
    assert any("last '\\n\\nAssistant:' turn" in line and "50 of 50 rows are dialogues" in line for line in logs)


def test_hh_pairs_read_as_unpaired_rows_are_split_the_same_way():
    recipe = load_recipe("kto", [f"dataset.path={HH}", "dataset.unpaired_from_pairs=true"]).recipe
    train, _ = data.load_for_recipe(recipe, "unpaired", log=lambda m: None)
    assert len(train) == 100
    assert all(r["prompt"].endswith("\n\nAssistant:") and r["completion"].startswith(" ") for r in train)


def test_plain_text_pairs_keep_trls_common_start():
    rows = [{"chosen": "The sky is blue.", "rejected": "The sky is green."}]
    split = data.split_implicit_prompt(rows[0])
    assert split == {"prompt": "The sky is", "chosen": " blue.", "rejected": " green."}


# ------------------------------------------------------------------ item 6: dataset.split on files and folders
def _pairs(n: int, start: int = 0) -> list[dict]:
    return [{"prompt": f"q{i}", "chosen": f" good {i}", "rejected": f" bad {i}"} for i in range(start, start + n)]


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _load(*overrides, recipe="dpo", kind="preference", base_dir=None):
    loaded = load_recipe(recipe, list(overrides))
    return data.load_for_recipe(loaded.recipe, kind, log=lambda m: None, base_dir=base_dir)


def test_dataset_split_on_a_file_is_applied_with_slices_and_checked(tmp_path):
    f = _jsonl(tmp_path / "pairs.jsonl", _pairs(20))
    train, _ = _load(f"dataset.path={f}", "dataset.split=train[:10%]")
    assert [r["prompt"] for r in train] == ["q0", "q1"]
    train, _ = _load(f"dataset.path={f}", "dataset.split=train[15:]")
    assert len(train) == 5 and train[0]["prompt"] == "q15"
    message = user_error(_load, f"dataset.path={f}", "dataset.split=validation")
    assert message.startswith("dataset.split: 'validation'") and "'train'" in message and str(f) in message
    assert "train[:10%]" in message
    assert "Unrecognized" in user_error(_load, f"dataset.path={f}", "dataset.split=train[:abc]")
    # an eval file with eval_split left at its default ('test') is taken whole; a split named explicitly is applied
    e = _jsonl(tmp_path / "eval.jsonl", _pairs(6, 100))
    _, evald = _load(f"dataset.path={f}", f"dataset.eval_path={e}")
    assert len(evald) == 6
    _, evald = _load(f"dataset.path={f}", f"dataset.eval_path={e}", "dataset.eval_split=train[:2]")
    assert len(evald) == 2
    # judged by value: a run's own recipe.yaml writes every default out (eval_split: test) and must read the data
    # as the first run did
    _, evald = _load(f"dataset.path={f}", f"dataset.eval_path={e}", "dataset.eval_split=test")
    assert len(evald) == 6
    assert "dataset.eval_split: 'validation'" in user_error(_load, f"dataset.path={f}", f"dataset.eval_path={e}",
                                                            "dataset.eval_split=validation")


def test_a_saved_dataset_dict_takes_slices_and_names_its_splits(tmp_path):
    import datasets

    folder = tmp_path / "saved"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(_pairs(10)),
                          "validation": datasets.Dataset.from_list(_pairs(4, 50))}).save_to_disk(str(folder))
    train, _ = _load(f"dataset.path={folder}", "dataset.split=validation[:2]")
    assert [r["prompt"] for r in train] == ["q50", "q51"]
    message = user_error(_load, f"dataset.path={folder}", "dataset.split=test")
    assert "'train', 'validation'" in message


# ------------------------------------------------------------ item 10: folders of shards, globs, relative paths
def test_a_folder_of_parquet_shards_and_a_glob_are_read(tmp_path):
    import datasets

    folder = tmp_path / "shards"
    folder.mkdir()
    for i in range(3):
        datasets.Dataset.from_list(_pairs(4, 10 * i)).to_parquet(str(folder / f"train-0000{i}-of-00003.parquet"))
    train, _ = _load(f"dataset.path={folder}")
    assert len(train) == 12
    train, _ = _load(f"dataset.path={folder}/*.parquet", "dataset.split=train[:5]")
    assert len(train) == 5
    (tmp_path / "empty").mkdir()
    message = user_error(_load, f"dataset.path={tmp_path / 'empty'}")
    assert "save_to_disk" in message and ".parquet" in message
    message = user_error(_load, f"dataset.path={tmp_path}/nothing-*.jsonl")
    assert "not found" in message


def test_relative_data_paths_are_resolved_against_the_recipe_folder(tmp_path, monkeypatch):
    recipes = tmp_path / "project" / "recipes"
    _jsonl(recipes / "data" / "pairs.jsonl", _pairs(8))
    recipe = recipes / "mine.yaml"
    recipe.write_text("algorithm: dpo\ndataset:\n  path: data/pairs.jsonl\n  eval_path: data/missing.jsonl\n")
    monkeypatch.chdir(tmp_path)  # not the recipe's folder
    loaded = load_recipe(str(recipe))
    message = user_error(data.load_for_recipe, loaded.recipe, "preference", log=lambda m: None,
                         base_dir=loaded.base_dir)
    assert message.startswith("dataset.eval_path: data/missing.jsonl: dataset file not found")
    assert str(recipes / "data" / "missing.jsonl") in message and str(tmp_path / "data" / "missing.jsonl") in message
    loaded = load_recipe(str(recipe), ["dataset.eval_path=null"])
    train, _ = data.load_for_recipe(loaded.recipe, "preference", log=lambda m: None, base_dir=loaded.base_dir)
    assert len(train) == 8
    loaded = load_recipe(str(recipe), ["dataset.eval_path=null"])  # later errors name the file that was read
    message = user_error(data.load_for_recipe, loaded.recipe, "unpaired",
                         log=lambda m: None, base_dir=loaded.base_dir)
    assert message.startswith(f"dataset.path {recipes / 'data' / 'pairs.jsonl'}: missing column")


# ------------------------------------------------------------------ item 6: settings accepted and ignored
FAST = ["dataset.toy.size=16", "train.per_device_train_batch_size=4", "train.logging_steps=1", "train.save_steps=100"]


@pytest.mark.slow
def test_max_steps_minus_one_unsets_it_and_both_set_says_which_wins(tmp_path, tiny_path, capsys):
    from aligntool.train import train

    assert load_recipe("dpo", ["train.max_steps=-1"]).recipe.train.max_steps is None
    result = train(load_recipe("dpo", [*FAST, "train.max_steps=-1", "train.num_train_epochs=0.5",
                                       f"output_dir={tmp_path / 'epochs'}"]))
    assert result["global_step"] == 2  # half of 16 rows in batches of 4
    assert "both set" not in capsys.readouterr().err
    result = train(load_recipe("dpo", [*FAST, "train.max_steps=3", "train.num_train_epochs=0.5",
                                       f"output_dir={tmp_path / 'steps'}"]))
    assert result["global_step"] == 3
    err = capsys.readouterr().err
    assert ("note: train.max_steps=3 and train.num_train_epochs=0.5 are both set: max_steps wins" in err
            and "train.max_steps=-1" in err)


def test_fp16_on_a_cpu_is_refused_in_one_line(tmp_path, tiny_path):
    import torch

    from aligntool.train import train

    if torch.cuda.is_available():
        pytest.skip("a CUDA machine honours fp16")
    message = user_error(train, load_recipe("dpo", [*FAST, "train.fp16=true", f"output_dir={tmp_path}"]))
    assert "train.fp16" in message and "CUDA GPU" in message and "train.bf16" in message


# --------------------------------------------------------------- item 10: settings named with what is expected
def test_train_deepspeed_given_an_accelerate_yaml_says_what_is_expected(tmp_path, tiny_path):
    from aligntool.train import train

    config = tmp_path / "zero3.yaml"  # TRL's tests/distributed/data/accelerate_configs/zero3.yaml, in short
    config.write_text("compute_environment: LOCAL_MACHINE\ndistributed_type: DEEPSPEED\ndeepspeed_config:\n"
                      "  zero_stage: 3\nnum_processes: 2\n")
    message = user_error(train, load_recipe("dpo", [*FAST, f"train.deepspeed={config}", f"output_dir={tmp_path}/o"]))
    assert f"train.deepspeed: {config} is an accelerate config" in message
    assert "DeepSpeed JSON" in message and "distributed.backend: deepspeed" in message and "--config_file" in message
    message = user_error(train, load_recipe("dpo", [*FAST, f"train.deepspeed={tmp_path}/none.json",
                                                    f"output_dir={tmp_path}/o"]))
    assert "file not found" in message


def test_report_to_a_logger_that_is_not_installed_names_the_package(tmp_path, tiny_path):
    import importlib.util

    from aligntool.train import train

    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed here")
    message = user_error(train, load_recipe("dpo", [*FAST, "train.report_to=wandb", f"output_dir={tmp_path}"]))
    assert "train.report_to: wandb needs the wandb package" in message
    assert "pip install 'aligntool[trackers]'" in message
    message = user_error(train, load_recipe("dpo", [*FAST, "train.report_to=[wandbb]", f"output_dir={tmp_path}"]))
    assert "unknown logger 'wandbb'" in message and "wandb" in message


def test_max_length_beyond_learned_positions_is_refused_and_beyond_rotary_context_noted(tmp_path, capsys):
    from aligntool.toy.families import family_model_path
    from aligntool.train import prepare

    gpt2 = family_model_path("gpt2")  # learned positions: n_positions 512
    loaded = load_recipe("dpo", [*FAST, f"model.name_or_path={gpt2}", "train.max_length=1024",
                                 f"output_dir={tmp_path}/a"])
    message = user_error(prepare, loaded, tmp_path / "a")
    assert "train.max_length: 1024 tokens" in message and "positions for 512 tokens only" in message
    llama = family_model_path("llama3")  # rotary, max_position_embeddings 512
    loaded = load_recipe("dpo", [*FAST, f"model.name_or_path={llama}", "train.max_length=1024",
                                 f"output_dir={tmp_path}/b"])
    prepare(loaded, tmp_path / "b")
    assert "note: train.max_length=1024 is beyond the model's configured context (max_position_embeddings 512)" \
        in capsys.readouterr().err


def test_a_bare_hub_name_is_tried_as_a_hub_id_after_the_local_folder(tmp_path, tiny_path, monkeypatch):
    import shutil

    from aligntool import models

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.try_to_load_from_cache", lambda *a, **k: None)  # not in the HF cache
    message = user_error(models.resolve, "gpt2")
    assert "model.name_or_path: 'gpt2' is a hub id" in message and "HF_HUB_OFFLINE is set" in message
    assert "does not exist" not in message and str(tmp_path / "gpt2") in message
    shutil.copytree(tiny_path, tmp_path / "gpt2")  # a local folder of that name comes first
    assert models.resolve("gpt2") == "gpt2"
