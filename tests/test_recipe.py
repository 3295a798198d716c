"""Recipes: built-ins load, overrides are typed like YAML, train.* and algo.* reach the TRL config."""

import subprocess
import sys

import pytest
import yaml
from conftest import REPO, user_error

from aligntool import registry
from aligntool.recipe.loader import load_recipe, parse_override


@pytest.mark.parametrize("name", list(registry.ALGORITHMS))
def test_every_registered_algorithm_has_a_loadable_recipe(name):
    spec = registry.ALGORITHMS[name]
    loaded = load_recipe(REPO / spec.recipe)
    assert loaded.spec.name == name
    # the built-in models: tiny, or tiny-arith (tiny fine-tuned on the toy addition task) for the verifiable rewards
    assert loaded.recipe.model.name_or_path in ("tiny", "tiny-arith") and loaded.recipe.dataset.path == "toy"
    assert loaded.recipe.model.trust_remote_code is False
    # the trainer module follows the registry contract
    module = spec.load()
    entry = {"trl": "build", "pipeline": "pipeline", "online": "method"}[spec.kind]
    assert hasattr(module, "AlgoConfig") and callable(getattr(module, entry))


def test_overrides_are_typed_like_yaml():
    assert parse_override("train.learning_rate=1e-4") == (["train", "learning_rate"], 1e-4)
    assert parse_override("algo.loss_type=[sigmoid, sft]") == (["algo", "loss_type"], ["sigmoid", "sft"])
    assert parse_override("model.trust_remote_code=true") == (["model", "trust_remote_code"], True)
    assert parse_override("output_dir=runs/x") == (["output_dir"], "runs/x")
    assert parse_override("description=a: b: c") == (["description"], "a: b: c")  # not YAML on its own: kept as text


def test_builtin_name_and_overrides_resolve(tmp_path):
    loaded = load_recipe("dpo", ["train.max_steps=7", "algo.beta=0.3", f"output_dir={tmp_path}/o",
                                 "algo.loss_type=[sigmoid, sft]", "algo.loss_weights=[1.0, 0.5]"])
    resolved = loaded.resolved()
    assert resolved["train"]["max_steps"] == 7
    assert resolved["algo"]["beta"] == 0.3 and resolved["algo"]["loss_weights"] == [1.0, 0.5]
    assert resolved["algo"]["f_divergence_type"] == "reverse_kl"  # defaults filled in
    assert resolved["dataset"]["toy"]["bt_temperature"] == 0.5
    yaml.safe_load(yaml.safe_dump(resolved))  # writable as the run's recipe.yaml


def test_algo_and_train_reach_the_trl_config(tmp_path):
    from aligntool.train import Run

    loaded = load_recipe("dpo", [f"output_dir={tmp_path}", "algo.loss_type=ipo", "algo.beta=0.25",
                                 "algo.f_divergence_type=alpha_divergence", "algo.f_alpha=0.3",
                                 "train.optim=adamw_torch", "train.lr_scheduler_type=cosine", "train.report_to=none"])
    config = Run(loaded, tmp_path).trl_config()
    assert type(config).__name__ == "DPOConfig"
    assert config.loss_type == ["ipo"] or config.loss_type == "ipo"
    assert config.beta == 0.25 and config.f_alpha_divergence_coef == pytest.approx(0.7)  # paper alpha 0.3
    assert str(config.f_divergence_type).endswith("alpha_divergence")
    assert config.lr_scheduler_type == "cosine" and config.optim == "adamw_torch"
    assert config.output_dir == str(tmp_path / "checkpoints")
    assert config.report_to == ["tensorboard"]
    assert config.bf16 is False  # no bf16 on a CPU machine: fp32 rather than a crash


def test_every_trl_dpo_loss_type_is_accepted():
    from aligntool.trainers.base.trl_lists import dpo_loss_types as trl_loss_types

    for loss in trl_loss_types():
        assert load_recipe("dpo", [f"algo.loss_type={loss}"]).algo.loss_type == loss


def test_f_divergence_with_an_incompatible_loss_is_refused():
    msg = user_error(load_recipe, "dpo", ["algo.loss_type=apo_zero", "algo.f_divergence_type=js_divergence"])
    assert "f_divergence_type" in msg and "apo_zero" in msg


def test_unknown_trl_field_names_the_config_class():
    msg = user_error(load_recipe, "sft", ["train.gradient_acumulation_steps=2"])
    assert "gradient_accumulation_steps" in msg and "SFTConfig" in msg


def test_console_script_help_version_and_error_exit_code(tmp_path):
    out = subprocess.run([sys.executable, "-m", "aligntool.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "train" in out.stdout and "eval" in out.stdout
    out = subprocess.run([sys.executable, "-m", "aligntool.cli", "--version"], capture_output=True, text=True)
    assert out.stdout.startswith("aligntool ")
    out = subprocess.run([sys.executable, "-m", "aligntool.cli", "train", "--recipe", str(tmp_path / "x.yaml")],
                         capture_output=True, text=True)
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "Traceback" not in out.stderr


def test_recipes_command_lists_every_algorithm(capsys):
    from aligntool.cli import main

    assert main(["recipes"]) == 0
    out = capsys.readouterr().out
    for spec in registry.ALGORITHMS.values():
        assert spec.name in out and spec.recipe in out


def test_yaml_scalars_follow_yaml_1_2():
    from aligntool.recipe.loader import safe_load

    assert safe_load("a: no\nb: on\nc: true\nd: 1e-4\ne: 2.5E+3") == {
        "a": "no", "b": "on", "c": True, "d": 1e-4, "e": 2500.0}
    assert load_recipe("sft", ["train.eval_strategy=no"]).recipe.train.eval_strategy == "no"


def test_an_overridden_key_is_blamed_on_the_override():
    msg = user_error(load_recipe, "dpo", ["train.max_steps=-2"])
    assert msg.startswith("override 'train.max_steps=-2'"), msg


def test_every_recipe_field_is_documented():
    """The schema is the user's documentation: every field of every recipe section has a description."""
    import inspect

    from pydantic import BaseModel

    from aligntool.compress import recipe as compress_recipe
    from aligntool.recipe import schema

    sections = {c for c in vars(schema).values() if inspect.isclass(c) and issubclass(c, BaseModel)}
    sections |= {c for c in vars(compress_recipe).values() if inspect.isclass(c) and issubclass(c, BaseModel)}
    sections |= {spec.load().AlgoConfig for spec in registry.ALGORITHMS.values()}
    missing = [f"{c.__name__}.{name}" for c in sections for name, field in c.model_fields.items()
               if not field.description]
    assert not missing, missing


def test_the_algo_to_trl_contract_is_declared():
    """Only declared fields reach the TRL config; a method whose own trainer reads beta does not pass it to TRL."""
    assert load_recipe("cpl").algo.trl_kwargs() == {}
    assert load_recipe("sppo").algo.trl_kwargs() == {}
    assert load_recipe("rso", ["algo.gamma=0.2", "algo.loss=hinge_norm"]).algo.trl_kwargs() == {"loss_type": "hinge",
                                                                                               "beta": 0.2}
    assert load_recipe("inpo").algo.trl_kwargs() == {"precompute_ref_log_probs": True}
    assert load_recipe("spo").algo.trl_kwargs() == {"beta": 0.1, "loss_type": "sigmoid"}


def test_warmup_ratio_reaches_transformers_5_as_a_fractional_warmup_steps(tmp_path):
    """transformers 5 has no warmup_ratio: a float warmup_steps < 1 is the ratio of the total steps."""
    from aligntool.train import Run

    loaded = load_recipe("grpo", ["train.warmup_ratio=0.1", "train.warmup_steps=null"])
    assert Run(loaded, tmp_path).trl_config().warmup_steps == 0.1
    assert "set warmup_ratio or warmup_steps, not both" in user_error(load_recipe, "sft", [
        "train.warmup_ratio=0.1", "train.warmup_steps=3"])
