"""Datasets as they are published (issue 28 item 1): compressed files, `dataset.name`/`data_files`, the `columns`
rename map and each `format`, read from the real published HH-RLHF and GSM8K slices and from fixtures built to the
documented Alpaca, ShareGPT and UltraFeedback-binarized schemas (tests/data/*/README.md)."""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

import pytest
from conftest import user_error

from aligntool import data
from aligntool.recipe.loader import load_recipe

DATA = Path(__file__).parent / "data"
HH_GZ = DATA / "hh-rlhf" / "harmless-base-test-800.jsonl.gz"
GSM8K = DATA / "gsm8k" / "test-200.jsonl"
ALPACA = DATA / "alpaca" / "alpaca-6.json"
SHAREGPT = DATA / "sharegpt" / "sharegpt-4.json"
ULTRAFEEDBACK = DATA / "ultrafeedback"


def _load(recipe: str, kind: str, *overrides, logs=None):
    loaded = load_recipe(recipe, list(overrides))
    return data.load_for_recipe(loaded.recipe, kind, log=(logs.append if logs is not None else lambda m: None))


def _lines(raw: bytes) -> list[dict]:
    return [json.loads(line) for line in raw.decode().splitlines() if line.strip()]


# ------------------------------------------------------------------------------------------------ compressed files
def test_the_published_hh_rlhf_gzip_is_read_and_split_at_the_last_assistant_turn():
    raw = _lines(gzip.decompress(HH_GZ.read_bytes()))  # read independently of datasets
    assert len(raw) == 800
    train, _ = _load("dpo", "preference", f"dataset.path={HH_GZ}", "dataset.format=hh-rlhf",
                     "dataset.split=train[100:300]")
    assert len(train) == 200
    for row, given in zip(train, raw[100:300]):
        cut = given["chosen"].rfind("\n\nAssistant:") + len("\n\nAssistant:")
        assert row["prompt"] == given["chosen"][:cut]
        assert row["chosen"] == given["chosen"][cut:] and row["rejected"] == given["rejected"][cut:]
    # the same rows as prompts for a sampling method, and as demonstrations (the chosen reply) for SFT
    prompts, _ = _load("grpo", "prompt", f"dataset.path={HH_GZ}", "dataset.format=hh-rlhf", "dataset.split=train[:5]")
    assert prompts["prompt"] == [r["chosen"][:r["chosen"].rfind("\n\nAssistant:") + 12] for r in raw[:5]]
    sft, _ = _load("sft", "language_modeling", f"dataset.path={HH_GZ}", "dataset.format=hh-rlhf",
                   "dataset.split=train[:5]")
    assert [p + c for p, c in zip(sft["prompt"], sft["completion"])] == [r["chosen"] for r in raw[:5]]


def test_zstd_bz2_and_gzipped_csv_files_are_read_and_a_bad_line_is_found_through_the_decompression(tmp_path):
    import bz2

    import zstandard

    raw = GSM8K.read_bytes()
    expected = _lines(raw)
    for name, packed in [("gsm.jsonl.zst", zstandard.ZstdCompressor().compress(raw)), ("gsm.jsonl.bz2",
                                                                                     bz2.compress(raw))]:
        (tmp_path / name).write_bytes(packed)
        train, _ = _load("sft", "language_modeling", f"dataset.path={tmp_path / name}",
                         "dataset.columns={question: prompt, answer: completion}")
        assert train["prompt"] == [r["question"] for r in expected]
        assert train["completion"] == [r["answer"] for r in expected]
    csv = "prompt,completion\nq1, a1\nq2, a2\n"
    (tmp_path / "rows.csv.gz").write_bytes(gzip.compress(csv.encode()))
    train, _ = _load("sft", "language_modeling", f"dataset.path={tmp_path / 'rows.csv.gz'}")
    assert train.to_list() == [{"prompt": "q1", "completion": " a1"}, {"prompt": "q2", "completion": " a2"}]
    lines = raw.decode().splitlines(keepends=True)
    (tmp_path / "bad.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(
        "".join(lines[:2] + ['{"question": "x", \n'] + lines[3:]).encode()))
    message = user_error(_load, "sft", "language_modeling", f"dataset.path={tmp_path / 'bad.jsonl.zst'}")
    assert message.startswith(f"{tmp_path / 'bad.jsonl.zst'}:3: malformed JSON line"), message
    (tmp_path / "broken.jsonl.gz").write_bytes(b"not gzip at all")
    assert "cannot decompress" in user_error(_load, "sft", "language_modeling",
                                             f"dataset.path={tmp_path / 'broken.jsonl.gz'}")


# ------------------------------------------------------------------------------------------------------------ GSM8K
def test_gsm8k_answer_is_the_number_after_the_hashes_and_the_solution_is_kept():
    raw = _lines(GSM8K.read_bytes())
    train, _ = _load("grpo", "prompt", f"dataset.path={GSM8K}", "dataset.format=gsm8k")
    assert len(train) == len(raw) == 200
    for row, given in zip(train, raw):
        number = re.search(r"####\s*([-0-9.,]+)\s*$", given["answer"]).group(1).replace(",", "")
        assert row["answer"] == number and float(number) == float(row["answer"])
        assert row["prompt"] == given["question"] and row["solution"] == given["answer"]
    assert train[0]["answer"] == "18"  # Janet's ducks
    sft, _ = _load("sft", "language_modeling", f"dataset.path={GSM8K}", "dataset.format=gsm8k")
    assert sft.column_names == ["prompt", "completion"] and sft[0]["completion"] == "\n" + raw[0]["answer"]
    message = user_error(_load, "dpo", "preference", f"dataset.path={GSM8K}", "dataset.format=gsm8k")
    assert message.endswith("dataset.format 'gsm8k' gives prompt or language-modeling data; dpo trains on "
                            "preference data"), message


def test_a_gsm8k_answer_without_hashes_is_named_by_row(tmp_path):
    rows = _lines(GSM8K.read_bytes())[:3]
    rows[1]["answer"] = "no final line"
    f = tmp_path / "g.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    message = user_error(_load, "grpo", "prompt", f"dataset.path={f}", "dataset.format=gsm8k")
    assert "row 2: 'answer' does not end in '#### <number>'" in message, message


# ------------------------------------------------------------------------------------------------------- columns
def test_columns_rename_from_the_users_names_and_a_missing_one_lists_the_columns_found(tmp_path):
    f = tmp_path / "qa.jsonl"
    f.write_text("".join(json.dumps({"q": f"question {i}", "good": f" yes {i}", "bad": f" no {i}", "id": i}) + "\n"
                         for i in range(4)))
    train, _ = _load("dpo", "preference", f"dataset.path={f}",
                     "dataset.columns={q: prompt, good: chosen, bad: rejected}")
    assert train[2] == {"prompt": "question 2", "chosen": " yes 2", "rejected": " no 2", "id": 2}
    message = user_error(_load, "dpo", "preference", f"dataset.path={f}",
                         "dataset.columns={question: prompt, good: chosen, bad: rejected}")
    assert message == (f"dataset.path {f}: dataset.columns names 'question', not a column of the data; found: q, "
                       "good, bad, id")
    assert "renamed to 'prompt'" in user_error(load_recipe, "dpo", ["dataset.columns={q: prompt, id: prompt}"])


def test_a_columns_error_from_the_cli_is_one_line_with_exit_2(capsys, tmp_path, tiny_path):
    from test_bad_input import expect_error

    f = tmp_path / "qa.jsonl"
    f.write_text(json.dumps({"q": "x", "a": " y"}) + "\n")
    expect_error(capsys, ["train", "--recipe", "sft", f"model.name_or_path={tiny_path}", f"dataset.path={f}",
                          "dataset.columns={question: prompt, a: completion}", f"output_dir={tmp_path / 'o'}"],
                 "dataset.columns names 'question'", "found: q, a")


# ------------------------------------------------------------------------------------------ Alpaca, ShareGPT, UF
def test_alpaca_rows_become_prompt_and_completion_with_the_input_joined():
    raw = json.loads(ALPACA.read_text())
    train, _ = _load("sft", "language_modeling", f"dataset.path={ALPACA}", "dataset.format=alpaca")
    assert train.column_names == ["prompt", "completion"]
    assert train[0] == {"prompt": raw[0]["instruction"], "completion": raw[0]["output"]}  # no input
    assert train[1]["prompt"] == "Translate the sentence into French.\n\nThe cat sleeps."
    prompts, _ = _load("rso", "prompt", f"dataset.path={ALPACA}", "dataset.format=alpaca")
    assert prompts["prompt"] == train["prompt"]
    assert "'alpaca' gives language-modeling or prompt data; dpo trains on preference" in user_error(
        _load, "dpo", "preference", f"dataset.path={ALPACA}", "dataset.format=alpaca")
    assert "expects the column(s) instruction, output; missing instruction, output; found: question, answer" in \
        user_error(_load, "sft", "language_modeling", f"dataset.path={GSM8K}", "dataset.format=alpaca")


def test_sharegpt_turns_become_messages_with_roles():
    train, _ = _load("sft", "language_modeling", f"dataset.path={SHAREGPT}", "dataset.format=sharegpt")
    assert train.column_names == ["messages"]
    assert train[0]["messages"] == [{"role": "system", "content": "You are terse."},
                                    {"role": "user", "content": "What is 2+2?"},
                                    {"role": "assistant", "content": "4."}]
    assert [m["role"] for m in train[1]["messages"]] == ["user", "assistant", "user", "assistant"]  # empty system
    assert [m["role"] for m in train[2]["messages"]] == ["user", "assistant", "tool", "assistant"]
    assert train[2]["messages"][2]["content"] == '{"temp_c": 18, "sky": "cloudy"}'
    prompts, _ = _load("rso", "prompt", f"dataset.path={SHAREGPT}", "dataset.format=sharegpt")
    assert prompts[1]["prompt"] == train[1]["messages"][:3]  # up to the last assistant turn


def test_ultrafeedback_binarized_as_published_in_parquet_shards():
    import pandas as pd

    raw = pd.read_parquet(next((ULTRAFEEDBACK / "data").glob("*.parquet"))).to_dict("records")
    train, _ = _load("dpo", "preference", f"dataset.path={ULTRAFEEDBACK}", "dataset.split=test_prefs",
                     "dataset.format=ultrafeedback")
    assert sorted(train.column_names) == ["chosen", "prompt", "rejected"]
    for row, given in zip(train, raw):
        assert row["prompt"] == [{"role": "user", "content": given["prompt"]}]
        assert row["chosen"] == [{"role": "assistant", "content": given["chosen"][1]["content"]}]
        assert row["rejected"] == [{"role": "assistant", "content": given["rejected"][1]["content"]}]
    prompts, _ = _load("grpo", "prompt", f"dataset.path={ULTRAFEEDBACK}", "dataset.split=test_prefs[:2]",
                       "dataset.format=ultrafeedback")
    assert prompts["prompt"] == [r["prompt"] for r in raw[:2]]
    sft, _ = _load("sft", "language_modeling", f"dataset.path={ULTRAFEEDBACK}", "dataset.split=test_prefs",
                   "dataset.format=ultrafeedback")
    assert sft[3]["messages"] == [dict(m) for m in raw[3]["messages"]]
    assert "'test_prefs'" in user_error(_load, "dpo", "preference", f"dataset.path={ULTRAFEEDBACK}",
                                        "dataset.format=ultrafeedback")  # split left at 'train': names the splits


def test_unpaired_data_reads_a_paired_format_through_unpaired_from_pairs():
    train, _ = _load("kto", "unpaired", f"dataset.path={HH_GZ}", "dataset.format=hh-rlhf",
                     "dataset.split=train[:10]", "dataset.unpaired_from_pairs=true")
    assert len(train) == 20 and sum(train["label"]) == 10
    assert all(p.endswith("\n\nAssistant:") for p in train["prompt"])
    assert "set dataset.unpaired_from_pairs: true" in user_error(
        _load, "kto", "unpaired", f"dataset.path={HH_GZ}", "dataset.format=hh-rlhf")


# ------------------------------------------------------------------------------------------ name and data_files
def test_a_builder_with_data_files_takes_the_splits_of_the_dict(tmp_path):
    train_rows = _lines(GSM8K.read_bytes())
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train_rows[:30]))
    (tmp_path / "b.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train_rows[30:40]))
    recipe = tmp_path / "r.yaml"
    recipe.write_text("algorithm: grpo\ndataset:\n  path: json\n  data_files: {train: a.jsonl, test: b.jsonl}\n"
                      "  format: gsm8k\n  split: test[:4]\n")
    loaded = load_recipe(str(recipe), [])
    train, _ = data.load_for_recipe(loaded.recipe, "prompt", log=lambda m: None, base_dir=loaded.base_dir)
    assert train["prompt"] == [r["question"] for r in train_rows[30:34]]


def test_a_hub_id_gets_its_config_name_and_data_files(monkeypatch):
    """No hub here: datasets.load_dataset is replaced to see what a hub id is called with (the wiring only)."""
    import datasets

    calls = []

    def fake(path, **kwargs):
        calls.append((path, kwargs))
        return datasets.Dataset.from_list([{"question": "What is 1+1?", "answer": "1+1=2\n#### 2"}])

    monkeypatch.setattr(datasets, "load_dataset", fake)
    train, _ = _load("grpo", "prompt", "dataset.path=openai/gsm8k", "dataset.name=main", "dataset.format=gsm8k",
                     "dataset.split=test", "dataset.data_files=main/test-00000-of-00001.parquet")
    assert calls == [("openai/gsm8k", {"name": "main", "data_files": "main/test-00000-of-00001.parquet",
                                       "split": "test", "streaming": False})]
    assert train[0]["answer"] == "2"


def test_a_hub_split_slice_is_checked_against_the_split(monkeypatch):
    """datasets clamps `test[:100]` on a 10-row split in silence; a slice past a hub split's end is one line, as for
    local data, and a slice inside it takes those rows (the split is loaded by name, the slice applied here)."""
    import datasets

    calls = []

    def fake(path, **kwargs):
        calls.append(kwargs["split"])
        return datasets.Dataset.from_list([{"prompt": f"{kwargs['split']} {i}"} for i in range(10)])

    monkeypatch.setattr(datasets, "load_dataset", fake)
    message = user_error(_load, "grpo", "prompt", "dataset.path=org/name", "dataset.split=test[:100]")
    assert message.startswith("dataset.split: 'test[:100]'") and "'test'" in message
    train, _ = _load("grpo", "prompt", "dataset.path=org/name", "dataset.split=test[2:5]+train[:1]")
    assert train["prompt"] == ["test 2", "test 3", "test 4", "train 0"]
    assert calls == ["test", "test", "train"]


@pytest.mark.parametrize("fmt", ["trl", "hh-rlhf", "alpaca", "sharegpt", "ultrafeedback", "gsm8k"])
def test_every_format_of_the_schema_has_a_conversion(fmt):
    from typing import get_args

    from aligntool.recipe.schema import DataSourceFields

    assert set(get_args(DataSourceFields.model_fields["format"].annotation)[0].__args__) == set(data.FORMATS)
    assert fmt in data.FORMATS


def test_a_split_slice_outside_the_data_is_one_line(tmp_path):
    message = user_error(_load, "dpo", "preference", f"dataset.path={HH_GZ}", "dataset.split=train[700:1000]")
    assert message == (f"dataset.split: 'train[700:1000]': outside the data: the split 'train' of {HH_GZ} has 800 "
                       "rows")
    assert "selects no rows" in user_error(_load, "dpo", "preference", f"dataset.path={HH_GZ}",
                                           "dataset.split=train[10:5]")
    train, _ = _load("dpo", "preference", f"dataset.path={HH_GZ}", "dataset.split=train[-3:]")
    assert len(train) == 3


def test_a_folder_of_compressed_files_names_its_splits_and_an_empty_archive_is_named(tmp_path):
    raw = GSM8K.read_bytes()
    lines = raw.decode().splitlines(keepends=True)
    folder = tmp_path / "gsm"
    folder.mkdir()
    (folder / "train.jsonl.gz").write_bytes(gzip.compress(raw))
    (folder / "test.jsonl.gz").write_bytes(gzip.compress("".join(lines[5:8]).encode()))
    train, _ = _load("grpo", "prompt", f"dataset.path={folder}", "dataset.format=gsm8k", "dataset.split=test")
    assert train["prompt"] == [json.loads(line)["question"] for line in lines[5:8]]
    (tmp_path / "empty.jsonl.gz").write_bytes(gzip.compress(b"\n"))
    assert user_error(_load, "sft", "language_modeling", f"dataset.path={tmp_path / 'empty.jsonl.gz'}") == (
        f"dataset.path: {tmp_path / 'empty.jsonl.gz'}: the file is empty")


def test_an_eval_file_is_read_whole_beside_a_builder_with_data_files(tmp_path):
    """`name`/`data_files` of the training source do not apply to an eval *file* (they would make no sense there)."""
    loaded = load_recipe("grpo", ["dataset.path=json", f"dataset.data_files={GSM8K}", "dataset.format=gsm8k",
                                  f"dataset.eval_path={GSM8K}", "dataset.eval_split=train[:3]"])
    train, evald = data.load_for_recipe(loaded.recipe, "prompt", log=lambda m: None)
    assert len(train) == 200 and len(evald) == 3 and evald["answer"] == ["18", "3", "70000"]


def test_docs_datasets_describe_every_key_and_format():
    from aligntool.recipe.schema import DatasetConfig, MixtureSource

    text = (Path(__file__).parent.parent / "docs" / "DATASETS.md").read_text()
    keys = (set(DatasetConfig.model_fields) | set(MixtureSource.model_fields)) - {"toy"}
    assert not [k for k in keys if f"`{k}`" not in text]
    assert not [f for f in data.FORMATS if f"### `{f}`" not in text]
