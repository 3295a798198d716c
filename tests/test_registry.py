"""The registry is the one list of facts about methods: every list elsewhere is derived from it, the README's tables
are written from it, and its capability fields agree with the method code."""

import dataclasses
import subprocess
import sys
import typing

import pytest
from conftest import REPO, user_error

from aligntool import registry
from aligntool.registry import AlgorithmSpec

FAKE = dict(name="fake_method", summary="A method added to the registry by a test.", family="online-rl",
            module="aligntool.online.remax", trl_config="transformers:TrainingArguments", data="prompt",
            recipe="aligntool/recipes/remax.yaml", kind="online", samples=True, vllm="engine", preferences=True,
            batch_unit="prompts")


@pytest.fixture
def fake_method(monkeypatch):
    """A method added to the registry: every derived list must name it."""
    spec = AlgorithmSpec(**FAKE)
    monkeypatch.setitem(registry.ALGORITHMS, spec.name, spec)
    return spec


def test_readme_tables_are_the_registrys():
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "registry_tables.py"), "--check"],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_readme_tables_follow_a_new_method(fake_method):
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import registry_tables
    finally:
        sys.path.remove(str(REPO / "scripts"))
    row = "| `fake_method` | A method added to the registry by a test. | online | prompt |"
    assert row in registry_tables.algorithms()
    assert "| `fake_method` | yes | hf, vllm (aligntool's engine) | yes | — | prompts per iteration | yes |" in \
        registry_tables.capabilities()


def test_specs_take_keyword_arguments_only_and_check_their_fields():
    with pytest.raises(TypeError):
        AlgorithmSpec(*FAKE.values())
    for bad in ({"kind": "offline"}, {"data": "pairs"}, {"batch_unit": "tokens"}, {"vllm": "server"},
                {"kind": "trl"},  # vLLM on the engine is the online methods' only
                {"vllm": None},  # an online method generates on the engine, so it may use vLLM there
                {"samples": False}):  # preferences and vLLM label / generate samples
        with pytest.raises(ValueError, match="fake_method"):
            AlgorithmSpec(**{**FAKE, **bad})


def test_registry_imports_without_torch_or_trl():
    code = ("import sys\nfor m in ('torch', 'transformers', 'trl', 'datasets', 'pydantic'): sys.modules[m] = None\n"
            "from aligntool import registry\nprint(len(registry.ALGORITHMS), registry.listing(kind='online'))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split(" ", 1)[1].strip() == ", ".join(registry.names(kind="online"))


def test_names_select_by_fields_in_the_tables_order():
    assert registry.names(kind="online") == [s.name for s in registry.ALGORITHMS.values() if s.kind == "online"]
    assert "reinforce_pp" in registry.names(kind="online")  # three hand-written lists had left it out
    assert registry.names(vllm="trl") == ["grpo", "rloo"]
    assert registry.names(preferences=True) == ["online_dpo", "xpo", "inpo"]
    assert registry.names(sharded=False) == ["xpo"] and registry.names(value_head=True) == ["ppo"]
    assert registry.names(lambda s: s.samples, kind="trl") == ["grpo", "rloo"]
    assert registry.listing(vllm="trl") == "grpo, rloo"


def test_data_kinds_are_the_data_readers():
    from aligntool import data

    assert set(registry.DATA_KINDS) == set(data.DATA_KINDS)


def _method_class(spec):
    return typing.get_type_hints(spec.load().method)["return"]


@pytest.mark.parametrize("name", registry.names(kind="online"))
def test_online_capabilities_are_the_method_classes(name):
    """The engine reads these from the method object; the registry states them for everything else (checks, tables)."""
    spec = registry.ALGORITHMS[name]
    cls = _method_class(spec)
    assert spec.value_head == getattr(cls, "value_head", False)
    assert spec.preferences == getattr(cls, "uses_preferences", False)
    assert spec.sharded == (not getattr(cls, "samples_from_reference", False))
    assert spec.batch_unit == "prompts" and spec.samples and spec.data == "prompt"


def test_the_other_capabilities_agree_with_the_code():
    for spec in registry.ALGORITHMS.values():
        if spec.vllm == "trl":  # TRL's trainer takes generation.backend vllm through its use_vllm fields
            assert "use_vllm" in {f.name for f in dataclasses.fields(spec.trl_config_class())}
        if spec.kind == "pipeline":
            assert spec.batch_unit == "generated" and spec.samples
        if spec.kind == "trl":
            assert spec.batch_unit == ("completions" if spec.samples else "rows")
    # the pipeline that labels pairs with a preference source: its pairing refuses best_worst with a judge
    assert [s.name for s in registry.ALGORITHMS.values() if s.preferences and s.kind != "online"] == ["inpo"]


def test_vllm_message_lists_every_method_that_takes_it(fake_method):
    from aligntool.recipe.loader import load_recipe

    message = user_error(load_recipe, "dpo", ["generation.backend=vllm"])
    engine = registry.names(vllm="engine")
    assert "reinforce_pp" in engine and "fake_method" in engine
    assert f"applies to the online methods ({', '.join(engine)}) and to grpo, rloo (TRL's vLLM generation)" in message
    # the methods the message names are the ones the check lets through
    for name in registry.names(lambda s: s.vllm is not None and s.name != "fake_method"):
        assert load_recipe(name, ["generation.backend=vllm"]).recipe.generation.backend == "vllm"


def test_judge_message_and_description_list_every_method_that_takes_one(fake_method):
    from aligntool import rewards
    from aligntool.recipe.schema import RewardConfig

    message = user_error(rewards.terms, RewardConfig(judge="m:f"))
    assert message.endswith(f"(a judge applies to {', '.join(registry.names(preferences=True))})")
    assert "fake_method" in message and "inpo" in message
    # a field description is written when the schema is imported: it names the registry's methods as they were then
    described = RewardConfig.model_fields["judge"].description
    assert all(f"{name}" in described for name in registry.names(preferences=True) if name != "fake_method")


@pytest.mark.parametrize("unit,refused", [("generated", True), ("completions", True), ("rows", False),
                                          ("prompts", False)])
def test_step_law_reads_the_batch_unit(monkeypatch, unit, refused):
    """Training tokens D are known beforehand unless the method trains on what it samples during the run."""
    from aligntool.errors import UserError
    from aligntool.recipe import steplaw
    from aligntool.recipe.loader import load_recipe

    spec = AlgorithmSpec(**{**FAKE, "kind": "pipeline" if unit == "generated" else "trl", "vllm": None,
                            "preferences": False, "batch_unit": unit, "trl_config": "trl:DPOConfig"})

    class Loaded:
        recipe = load_recipe("dpo", ["train.learning_rate=auto"]).recipe
        source, algo = "r.yaml", None

    Loaded.spec = spec
    monkeypatch.setattr("transformers.AutoConfig.from_pretrained", lambda *a, **k: 1 / 0)  # stop after the check
    with pytest.raises(UserError) as info:
        steplaw.for_run(Loaded, "model", None, [{"prompt": "x"}])
    generated = "fake_method trains on rows it generates during the run" in str(info.value)
    assert generated == refused, str(info.value)


def test_every_method_names_its_paper():
    """The model card cites a method's paper from the registry (registry.PAPERS): every algorithm has one, with an
    arXiv id of the form YYMM.NNNNN, and no entry names a method that does not exist (SFT has no one paper)."""
    import re

    assert set(registry.PAPERS) == set(registry.names()) - {"sft"}
    for name, (title, authors, year, arxiv) in registry.PAPERS.items():
        assert title and authors and 2017 <= year <= 2026 and re.fullmatch(r"\d{4}\.\d{5}", arxiv), name
        assert str(year)[2:] <= arxiv[:2], (name, year, arxiv)  # published no earlier than its preprint
