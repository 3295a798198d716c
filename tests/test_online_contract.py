"""The contract between an online method and the rollout engine (aligntool.online.contract.OnlineMethod): every
online entry of the registry meets it, a method that breaks it is refused by name before any model loads, the engine
reads no optional attribute of a method, and group sampling (``Engine.sample_groups``) groups rows per prompt."""

import ast
from pathlib import Path

import pytest
import torch
from conftest import RECIPES, REPO

from aligntool.online.contract import MethodBase, OnlineMethod, check_method, contract_problems
from aligntool.recipe.loader import load_recipe
from aligntool.registry import ALGORITHMS

ONLINE = sorted(name for name, spec in ALGORITHMS.items() if spec.kind == "online")


def make_run(out, recipe, *overrides):
    from aligntool.train import Run

    return Run(load_recipe(RECIPES / f"{recipe}.yaml", [f"output_dir={out}", *overrides]), out)


def test_the_registry_lists_the_engine_methods():
    assert ONLINE == ["online_dpo", "p3o", "ppo", "reinforce_pp", "remax", "xpo"]


@pytest.mark.parametrize("name", ONLINE)
def test_every_online_method_of_the_registry_meets_the_contract(tmp_path, name):
    """Its module lives beside the engine and its ``method(run)`` returns an object with every member of the
    Protocol, of the declared type."""
    spec = ALGORITHMS[name]
    assert spec.module == f"aligntool.online.{name}"
    method = spec.load().method(make_run(tmp_path, name))
    assert contract_problems(method) == []
    assert isinstance(method, OnlineMethod) and isinstance(method, MethodBase)
    assert check_method(method, name) is method


def test_the_capabilities_each_method_declares(tmp_path):
    got = {}
    for name in ONLINE:
        m = ALGORITHMS[name].load().method(make_run(tmp_path / name, name))
        got[name] = (m.value_head, m.samples_from_reference, m.uses_preferences, m.updates_per_iteration,
                     m.initial_kl_coef)
    assert got == {"ppo": (True, False, False, 4 * 2, 0.05), "p3o": (False, False, False, 2, 0.05),
                   "remax": (False, False, False, 1, 0.05), "reinforce_pp": (False, False, False, 2, 0.01),
                   "online_dpo": (False, False, True, 1, 0.0), "xpo": (False, True, True, 1, 0.0)}
    run = make_run(tmp_path / "sep", "ppo", "algo.critic=separate")
    assert ALGORITHMS["ppo"].load().method(run).critic == "separate"


class Broken:
    """Forgets updates_per_iteration, gives value_head a string and step the wrong arguments."""

    value_head = "yes"
    critic = "both"
    samples_from_reference = False
    uses_preferences = False
    initial_kl_coef = 0.0

    def step(self, engine):
        return {}


def test_a_method_that_breaks_the_contract_is_refused_by_name_before_any_model_loads(tmp_path, monkeypatch):
    from aligntool.online.engine import Engine

    run = make_run(tmp_path, "ppo")
    monkeypatch.setattr(type(run), "policy", lambda self: pytest.fail("a model was loaded"))
    with pytest.raises(TypeError) as info:
        Engine(run, Broken())
    message = str(info.value)
    for needle in ("'ppo'", "Broken", "updates_per_iteration is missing", "value_head = 'yes' is not bool",
                   "critic = 'both'", "does not take (engine, prompts)"):
        assert needle in message, (needle, message)


def test_a_zero_updates_per_iteration_is_refused():
    class NoUpdates(MethodBase):
        updates_per_iteration = 0

        def step(self, engine, prompts):
            return {}

    assert contract_problems(NoUpdates()) == ["updates_per_iteration = 0 is not >= 1"]
    with pytest.raises(TypeError, match="'none'.*NoUpdates"):
        check_method(NoUpdates(), "none")


def test_the_engine_reads_no_optional_attribute_of_a_method_or_its_config():
    """No ``getattr(method, ...)`` / ``getattr(self.method, ...)`` / ``getattr(self.cfg, ...)`` in the engine's
    modules: what the engine reads of a method is the contract, declared by every method."""
    online = Path(REPO / "aligntool" / "online")
    found = []
    for module in ("engine", "setup", "rollout", "checkpoint", "ops"):
        tree = ast.parse((online / f"{module}.py").read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("getattr",
                                                                                                     "hasattr"):
                target = ast.unparse(node.args[0])
                if target in ("method", "self.method", "self.cfg", "cfg", "self.run.algo"):
                    found.append(f"{module}.py:{node.lineno}: {ast.unparse(node)}")
    assert found == []


def test_sample_groups_rows_are_grouped_per_prompt_and_are_the_repeated_prompts_samples(tmp_path, tiny_path):
    from aligntool import data, models
    from aligntool.online.engine import Engine

    run = make_run(tmp_path, "reinforce_pp", "dataset.toy.size=8", "algo.max_new_tokens=4")
    run.model_path = models.resolve("tiny")
    run.tokenizer = models.load_tokenizer(run.model_path)
    run.train_dataset, run.eval_dataset = data.load_for_recipe(run.recipe, run.loaded.spec.data)
    engine = Engine(run, run.loaded.spec.load().method(run))
    prompts = engine.prompts[:2]
    group = engine.sample_groups(prompts, 3)
    assert group.prompts == [prompts[0]] * 3 + [prompts[1]] * 3 and group.input_ids.shape[0] == 6
    engine._calls = 0  # the same call of the same iteration: the same seeds
    (flat,) = engine.samples([p for p in prompts for _ in range(3)], ["sample"])
    assert torch.equal(group.input_ids, flat.input_ids) and group.texts == flat.texts
    engine._calls = 0
    one = engine.sample_groups(prompts, 1)
    engine._calls = 0
    assert torch.equal(one.input_ids, engine.sample(prompts).input_ids)  # a group of one is a plain sample
