"""`aligntool init NAME`: a built-in recipe written for editing, every key commented with its description, loading back
to the same recipe; an existing file or an unknown name: one line, exit 2."""

from __future__ import annotations

import pytest
import yaml
from conftest import cli_error

from aligntool.cli import main
from aligntool.compress.recipe import load_compress_recipe
from aligntool.recipe.loader import builtin_recipe_names, load_recipe, safe_load
from aligntool.recipe.schema import ModelConfig, TrainConfig
from aligntool.registry import RECIPES_DIR


def _init(tmp_path, name, capsys) -> str:
    out = tmp_path / f"{name}.yaml"
    assert main(["init", name, "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    return out.read_text()


def test_every_builtin_recipe_loads_back_the_same(tmp_path, capsys):
    """The written file is the built-in recipe plus comments: the same YAML mapping, the same resolved recipe."""
    names = builtin_recipe_names()
    assert len(names) >= 30
    for name in names:
        text = _init(tmp_path, name, capsys)
        original = (RECIPES_DIR / f"{name}.yaml").read_text()
        assert yaml.safe_load(text) == yaml.safe_load(original) == safe_load(original), name
        out = tmp_path / f"{name}.yaml"
        if name.startswith("compress_"):
            assert load_compress_recipe(out) == load_compress_recipe(name), name
        else:
            assert load_recipe(out).resolved() == load_recipe(name).resolved(), name
        # comments were added: far more comment lines than the built-in recipe has
        comments = sum(line.lstrip().startswith("#") for line in text.splitlines())
        assert comments > 3 * sum(line.lstrip().startswith("#") for line in original.splitlines()), name


def test_keys_commented_with_their_schema_descriptions(tmp_path, capsys):
    """Each key's own description sits on the lines just above it (read from the pydantic schema here, not from the
    annotator), and the keys the recipe leaves unset are listed with their defaults, commented out."""
    import importlib

    text = _init(tmp_path, "dpo", capsys)
    lines = text.splitlines()

    def comment_above(key_line: str) -> str:
        i = lines.index(key_line)
        block = []
        while lines[i - 1].lstrip().startswith("# ") and not lines[i - 1].lstrip()[2:].split(":")[0].isidentifier():
            i -= 1
            block.insert(0, lines[i].strip()[2:])
        return " ".join(block)

    described = ModelConfig.model_fields["name_or_path"].description
    assert comment_above("  name_or_path: tiny") == " ".join(described.split())
    assert comment_above("  max_steps: 100") == " ".join(TrainConfig.model_fields["max_steps"].description.split())
    algo = importlib.import_module("aligntool.trainers.dpo").AlgoConfig
    assert comment_above("  beta: 0.1") == " ".join(algo.model_fields["beta"].description.split())
    assert "  # dtype: auto" in lines and "  # use_weighting: false" in lines  # unset keys, under their sections
    assert "# peft:" in lines and "  # r: 16" in lines  # an absent section, at the end
    # uncommenting an unset key gives a recipe that loads with that value
    edited = text.replace("  # dtype: auto", "  dtype: bfloat16", 1)
    (tmp_path / "edited.yaml").write_text(edited)
    assert load_recipe(tmp_path / "edited.yaml").recipe.model.dtype == "bfloat16"


def test_train_extras_described_from_the_trl_config():
    """A train.* key that is a TRL config field (not aligntool's own) is described by the TRL config's help."""
    import dataclasses

    from trl import DPOConfig

    from aligntool.recipe.annotate import annotate, trl_help
    from aligntool.recipe.schema import Recipe

    text = "algorithm: dpo\ntrain:\n  adam_beta1: 0.8\n"
    out = annotate(text, Recipe, extras={("train",): trl_help(DPOConfig)}).splitlines()
    want = next(f.metadata["help"] for f in dataclasses.fields(DPOConfig) if f.name == "adam_beta1")
    above = " ".join(line.strip()[2:] for line in out[out.index("train:") + 1:out.index("  adam_beta1: 0.8")])
    assert above == " ".join(want.split())


def test_init_refuses_an_existing_file_and_an_unknown_name(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["init", "dpo"]) == 0 and (tmp_path / "dpo.yaml").is_file()
    capsys.readouterr()
    (tmp_path / "dpo.yaml").write_text("mine\n")
    cli_error(capsys, ["init", "dpo"], "dpo.yaml already exists", "--overwrite")
    assert (tmp_path / "dpo.yaml").read_text() == "mine\n"  # untouched
    assert main(["init", "dpo", "--overwrite"]) == 0 and "algorithm: dpo" in (tmp_path / "dpo.yaml").read_text()
    cli_error(capsys, ["init", "dop"], "no built-in recipe 'dop'", "did you mean dpo")
    cli_error(capsys, ["init", "zzzz"], "no built-in recipe 'zzzz'", "known: ", "sft")
    cli_error(capsys, ["init", "dpo", "--out", str(tmp_path)], "is a folder")


@pytest.mark.parametrize("name", ["grpo", "compress_quant"])
def test_init_writes_a_runnable_recipe_header(tmp_path, capsys, name):
    text = _init(tmp_path, name, capsys)
    command = "compress" if name.startswith("compress") else "train"
    assert f"aligntool {command} --recipe {tmp_path / name}.yaml" in text.splitlines()[1]
