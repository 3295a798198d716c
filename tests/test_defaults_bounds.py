"""Every method's defaults against the paper's / the authors' code / TRL's (each value with its source), every
documented bound of the recipe (pydantic ge/gt/le/lt and the validators) with a bad input, through the recipe loader
and, for a few, through the CLI (exit 2, one line); ``dataset.max_samples`` keeps exactly N rows."""

from __future__ import annotations

import dataclasses
import math
import typing

import pytest
from conftest import RECIPES, expect_error, user_error

from aligntool import registry

# (method, key) -> (default, source). The sources: TRL's config classes (trl 1.16), trlx's PPOConfig as in Coste et
# al.'s reward-model-ensembles configs, liziniu/ReMax's training scripts, OpenRLHF's argparse defaults (3c3be62).
DEFAULTS = {
    # PPO: trlx PPOConfig / TRL PPOConfig
    ("ppo", "gamma"): (1.0, "trlx gamma=1, TRL PPOConfig gamma=1.0"),
    ("ppo", "lam"): (0.95, "trlx lam=0.95, TRL PPOConfig lam=0.95"),
    ("ppo", "clip_range"): (0.2, "trlx cliprange=0.2, TRL cliprange=0.2"),
    ("ppo", "clip_range_value"): (0.2, "trlx cliprange_value=0.2, TRL cliprange_value=0.2"),
    ("ppo", "vf_coef"): (0.1, "TRL PPOConfig vf_coef=0.1"),
    ("ppo", "ppo_epochs"): (4, "trlx ppo_epochs=4, TRL num_ppo_epochs=4"),
    ("ppo", "num_minibatches"): (1, "TRL num_mini_batches=1"),
    ("ppo", "kl_coef"): (0.1, "Coste et al.'s trlx config init_kl_coef=0.1"),
    ("ppo", "kl_target"): (6.0, "trlx target=6"),
    ("ppo", "kl_horizon"): (10000, "trlx horizon=10000"),
    ("ppo", "whiten_advantages"): (True, "trlx / TRL whiten the advantages"),
    # P3O (Wu et al. 2023 give no defaults; the clip as PPO's, aligntool's documented values)
    ("p3o", "clip_range"): (0.2, "PPO's epsilon, as the P3O paper's experiments"),
    ("p3o", "kl_coef"): (0.05, "aligntool docs/recipe"),
    ("p3o", "variant"): ("separate", "P3O V1"),
    ("p3o", "ppo_epochs"): (2, "aligntool docs"),
    # ReMax: the official training scripts
    ("remax", "kl_coef"): (0.05, "ReMax scripts kl_ctl 0.05"),
    ("remax", "gamma"): (0.99, "ReMax scripts gamma 0.99"),
    ("remax", "reward_clip"): (5.0, "ReMax scripts clip_reward_value 5"),
    ("remax", "top_p"): (0.9, "ReMax scripts top_p 0.9"),
    # the sampling settings of the online methods (recipe/base.py Sampling, docs/recipes.md): 48 new tokens
    **{(m, "max_new_tokens"): (48, "aligntool docs")
       for m in ("ppo", "p3o", "remax", "reinforce_pp", "online_dpo", "xpo")},
    **{(m, "temperature"): (1.0, "on-policy sampling") for m in ("ppo", "p3o", "remax", "reinforce_pp")},
    **{(m, "top_p"): (1.0, "no nucleus cut") for m in ("ppo", "p3o", "reinforce_pp", "online_dpo")},
    **{(m, "missing_eos_penalty"): (None, "off") for m in ("ppo", "p3o", "remax", "reinforce_pp")},
    # REINFORCE++: OpenRLHF's defaults
    ("reinforce_pp", "kl_coef"): (0.01, "OpenRLHF --algo.kl.init_coef 0.01"),
    ("reinforce_pp", "kl_estimator"): ("k1", "OpenRLHF --algo.kl.estimator k1"),
    ("reinforce_pp", "kl_in"): ("reward", "OpenRLHF: KL in the reward unless --algo.kl.use_loss"),
    ("reinforce_pp", "gamma"): (1.0, "OpenRLHF --algo.advantage.gamma 1"),
    ("reinforce_pp", "clip_range"): (0.2, "OpenRLHF --actor.eps_clip 0.2"),
    ("reinforce_pp", "reward_clip"): (10.0, "OpenRLHF --reward.clip_range (-10, 10)"),
    ("reinforce_pp", "samples_per_prompt"): (1, "OpenRLHF --rollout.n_samples_per_prompt 1"),
    ("reinforce_pp", "normalize_std"): (True, "OpenRLHF std normalisation on"),
    ("reinforce_pp", "baseline"): ("none", "OpenRLHF reinforce"),
    ("reinforce_pp", "ppo_epochs"): (1, "OpenRLHF --train.max_epochs 1"),
    # online DPO / XPO: TRL's OnlineDPOConfig / XPOConfig
    ("online_dpo", "beta"): (0.1, "TRL OnlineDPOConfig beta=[0.1]"),
    ("online_dpo", "loss_type"): ("sigmoid", "TRL OnlineDPOConfig loss_type='sigmoid'"),
    ("online_dpo", "temperature"): (0.9, "TRL OnlineDPOConfig temperature=0.9"),
    ("online_dpo", "label_smoothing"): (0.0, "TRL DPOConfig label_smoothing=0"),
    ("online_dpo", "missing_eos_penalty"): (None, "TRL OnlineDPOConfig missing_eos_penalty=None"),
    ("xpo", "alpha"): (1e-5, "TRL XPOConfig alpha=[1e-5]"),
    ("xpo", "beta"): (0.1, "TRL XPOConfig beta (OnlineDPOConfig's)"),
    ("xpo", "temperature"): (0.9, "TRL OnlineDPOConfig temperature=0.9"),
    # the offline preference family: TRL's configs (also compared field by field with TRL below)
    ("dpo", "beta"): (0.1, "TRL DPOConfig beta=0.1; Rafailov et al. 2023"),
    ("dpo", "loss_type"): ("sigmoid", "TRL DPOConfig loss_type sigmoid"),
    ("dpo", "label_smoothing"): (0.0, "TRL DPOConfig label_smoothing=0"),
    ("kto", "beta"): (0.1, "TRL KTOConfig beta=0.1"),
    ("kto", "desirable_weight"): (1.0, "TRL KTOConfig desirable_weight=1"),
    ("kto", "undesirable_weight"): (1.0, "TRL KTOConfig undesirable_weight=1"),
    ("orpo", "beta"): (0.1, "TRL ORPOConfig beta=0.1 (lambda of Hong et al.)"),
    ("cpo", "beta"): (0.1, "TRL CPOConfig beta=0.1"),
    ("cpo", "cpo_alpha"): (1.0, "TRL CPOConfig cpo_alpha=1"),
}


@pytest.mark.parametrize("name,key", sorted(DEFAULTS))
def test_method_defaults_are_the_papers_or_trls(name, key):
    expected, source = DEFAULTS[(name, key)]
    value = getattr(registry.get(name).load().AlgoConfig(), key)
    if isinstance(expected, float) and isinstance(value, float):
        assert math.isclose(value, expected), (name, key, value, expected, source)
    else:
        assert value == expected, (name, key, value, expected, source)


def test_online_dpo_and_xpo_defaults_are_trls_own():
    """Read from TRL's OnlineDPOConfig itself (trl.experimental in TRL 1.x), so the table above cannot drift."""
    pytest.importorskip("trl.experimental.online_dpo")
    from trl.experimental.online_dpo import OnlineDPOConfig

    fields = {f.name: f for f in dataclasses.fields(OnlineDPOConfig)}

    def default(key):
        f = fields[key]
        value = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        return value[0] if isinstance(value, list) and len(value) == 1 else value

    for name in ("online_dpo", "xpo"):
        algo = registry.get(name).load().AlgoConfig()
        for key in ("beta", "loss_type", "temperature", "missing_eos_penalty"):
            assert getattr(algo, key) == default(key), (name, key)


TRL_KIND = sorted({spec.module: name for name, spec in registry.ALGORITHMS.items()
                   if spec.kind == "trl" and spec.trl_config.startswith("trl:")}.values())


@pytest.mark.parametrize("name", TRL_KIND)
def test_trl_methods_algo_keys_have_trls_defaults(name):
    """As test_algo_keys_are_trls_with_trls_defaults for GRPO / RLOO, for every TRL-kind method: each ``algo`` key
    that is a field of the TRL config defaults to TRL's value (None = TRL's own default, passed through unset)."""
    spec = registry.get(name)
    algo = spec.load().AlgoConfig()
    fields = {f.name: f for f in dataclasses.fields(spec.trl_config_class())}
    for key in getattr(algo, "trl_fields", ()):
        if key not in fields or getattr(algo, key) is None:
            continue
        f = fields[key]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        value = getattr(algo, key)
        if isinstance(default, list) and len(default) == 1 and not isinstance(value, list):
            default = default[0]
        same = value == default or (isinstance(value, float) and isinstance(default, float)
                                    and math.isclose(value, default))
        assert same, (name, key, value, default)


# ------------------------------------------------------------------------------------------------------ bounds
def _bounds(field) -> list[tuple[str, float]]:
    """(kind, limit) of a pydantic field: its own metadata and that inside Annotated members of a union
    (PositiveInt | None)."""
    found = []

    def walk(meta):
        for m in meta:
            for kind in ("ge", "gt", "le", "lt"):
                if getattr(m, kind, None) is not None:
                    found.append((kind, getattr(m, kind)))

    walk(field.metadata)
    stack = [field.annotation]
    while stack:
        t = stack.pop()
        if typing.get_origin(t) is typing.Annotated:
            walk(typing.get_args(t)[1:])
        stack += [a for a in typing.get_args(t) if a is not type(None)] if typing.get_origin(t) is not None else []
    return found


def _bad(kind, limit, integer):
    step = 1 if integer else 1e-3
    return {"ge": limit - step, "gt": limit, "le": limit + step, "lt": limit}[kind]


def _models():
    from aligntool.recipe import agent, dataset, schema

    out = {f"algo:{name}": spec.load().AlgoConfig for name, spec in registry.ALGORITHMS.items()}
    for cls in vars(schema).values():  # the schema's own classes and the dataset section's (recipe/dataset.py)
        if isinstance(cls, type) and hasattr(cls, "model_fields") and cls.__module__ in (
                schema.__name__, dataset.__name__, agent.__name__):
            out[cls.__name__] = cls
    return out


def _cases():
    cases = []
    for where, cls in _models().items():
        for key, field in cls.model_fields.items():
            for kind, limit in _bounds(field):
                cases.append((where, key, kind, limit))
    return cases


CASES = _cases()


@pytest.mark.parametrize("where,key,kind,limit", CASES)
def test_every_bound_refuses_the_first_value_past_it(where, key, kind, limit):
    from pydantic import ValidationError

    cls = _models()[where]
    field = cls.model_fields[key]
    integer = isinstance(limit, int) and "int" in str(field.annotation)
    with pytest.raises(ValidationError) as info:
        cls.model_validate({key: _bad(kind, limit, integer)})
    assert any(e["loc"][:1] == (key,) for e in info.value.errors()), info.value


def test_the_bound_walk_sees_the_documented_bounds():
    """The walk above is not empty by accident: it finds the bounds the docs name."""
    seen = {(w, k, kind, limit) for w, k, kind, limit in CASES}
    for case in [("algo:dpo", "label_smoothing", "lt", 0.5), ("algo:online_dpo", "label_smoothing", "lt", 0.5),
                 ("algo:cpo", "label_smoothing", "lt", 0.5), ("algo:ppo", "lam", "le", 1),
                 ("algo:ppo", "gamma", "gt", 0), ("algo:ppo", "clip_range", "gt", 0), ("algo:dpo", "beta", "gt", 0),
                 ("algo:online_dpo", "beta", "gt", 0), ("algo:remax", "gamma", "le", 1),
                 ("algo:reinforce_pp", "num_minibatches", "ge", 1), ("DatasetConfig", "max_samples", "gt", 0),
                 ("DatasetConfig", "eval_fraction", "lt", 1), ("PeftConfig", "lora_dropout", "lt", 1)]:
        assert case in seen, case
    assert len(CASES) > 60


# Every bound of the recipe, written down (the documented limits: docs/recipes.md and the fields' descriptions), so that
# a bound removed or moved fails here; the walk above only checks that the bounds it finds refuse. "key kind limit".
PINNED_BOUNDS = {
    'DatasetConfig': "eval_fraction ge 0, eval_fraction lt 1, max_samples gt 0, mixture_size gt 0",
    'MixtureSource': "fraction gt 0, fraction le 1, weight gt 0",
    'HardwareConfig': "gpus_per_node gt 0, nodes gt 0",
    'AgentConfig': "max_total_tokens gt 0, max_turns gt 0, tool_timeout gt 0",
    'GenerationConfig': "gpu_memory_utilization gt 0, gpu_memory_utilization le 1, max_model_length gt 0",
    'PeftConfig': "lora_alpha gt 0, lora_dropout ge 0, lora_dropout lt 1, r gt 0",
    'RewardConfig': "batch_size gt 0, bt_temperature ge 0, uwo_lambda ge 0",
    'ToyDataConfig': "bt_temperature ge 0, eval_size ge 0, seed ge 0, size gt 0",
    'TrainConfig': (
        "completions_steps gt 0, eval_steps gt 0, gradient_accumulation_steps gt 0, learning_rate gt 0, "
        "logging_steps gt 0, max_grad_norm ge 0, max_length gt 0, max_steps gt 0, num_completions_to_log gt 0, "
        "num_train_epochs gt 0, "
        "per_device_eval_batch_size gt 0, per_device_train_batch_size gt 0, save_steps gt 0, "
        "save_total_limit gt 0, seed ge 0, warmup_ratio ge 0, warmup_ratio lt 1, warmup_steps ge 0, "
        "weight_decay ge 0"),
    'algo:cpl': "alpha gt 0, bc_weight ge 0, contrastive_bias gt 0, contrastive_bias le 1",
    'algo:cpo': "beta gt 0, cpo_alpha ge 0, label_smoothing ge 0, label_smoothing lt 0.5, simpo_gamma ge 0",
    'algo:dpo': (
        "beta gt 0, discopop_tau gt 0, f_alpha gt 0, f_alpha lt 1, label_smoothing ge 0, "
        "label_smoothing lt 0.5, ld_alpha ge 0, ld_alpha le 1"),
    'algo:fdpo': (
        "beta gt 0, discopop_tau gt 0, f_alpha gt 0, f_alpha lt 1, label_smoothing ge 0, "
        "label_smoothing lt 0.5, ld_alpha ge 0, ld_alpha le 1"),
    'algo:grpo': (
        "beta ge 0, delta gt 0, epsilon ge 0, epsilon_high ge 0, generation_batch_size ge 1, "
        "max_completion_length gt 0, min_p ge 0, min_p le 1, num_generations ge 2, "
        "num_generations_eval ge 1, num_iterations ge 1, ref_model_mixup_alpha ge 0, "
        "ref_model_mixup_alpha le 1, ref_model_sync_steps ge 1, repetition_penalty gt 0, "
        "steps_per_generation ge 1, temperature gt 0, top_entropy_quantile ge 0, "
        "top_entropy_quantile le 1, top_k ge 0, top_p gt 0, top_p le 1"),
    'algo:hypo': "beta gt 0, kl_coef ge 0, kl_samples ge 2, max_new_tokens gt 0, num_kl_prompts gt 0",
    'algo:inpo': (
        "eta gt 0, iterations ge 1, max_new_tokens gt 0, num_samples ge 2, ratio ge 0, ratio le 1, "
        "temperature gt 0, top_p gt 0, top_p le 1"),
    'algo:ipo': (
        "beta gt 0, discopop_tau gt 0, f_alpha gt 0, f_alpha lt 1, label_smoothing ge 0, "
        "label_smoothing lt 0.5, ld_alpha ge 0, ld_alpha le 1"),
    'algo:kto': "beta gt 0, desirable_weight gt 0, undesirable_weight gt 0",
    'algo:online_dpo': (
        "beta gt 0, discopop_tau gt 0, label_smoothing ge 0, label_smoothing lt 0.5, max_new_tokens "
        "gt 0, missing_eos_penalty ge 0, temperature gt 0, top_p gt 0, top_p le 1"),
    'algo:orpo': "beta gt 0",
    'algo:p3o': (
        "clip_range gt 0, kl_coef ge 0, max_new_tokens gt 0, missing_eos_penalty ge 0, ppo_epochs "
        "ge 1, temperature gt 0, top_p gt 0, top_p le 1"),
    'algo:ppo': (
        "clip_range gt 0, clip_range_value gt 0, gamma gt 0, gamma le 1, kl_coef ge 0, kl_horizon "
        "gt 0, kl_target gt 0, lam ge 0, lam le 1, max_new_tokens gt 0, missing_eos_penalty ge 0, "
        "num_minibatches ge 1, ppo_epochs ge 1, temperature gt 0, top_p gt 0, top_p le 1, vf_coef "
        "ge 0"),
    'algo:reinforce_pp': (
        "clip_range gt 0, gamma gt 0, gamma le 1, kl_coef ge 0, max_new_tokens gt 0, "
        "missing_eos_penalty ge 0, num_minibatches ge 1, ppo_epochs ge 1, reward_clip gt 0, "
        "samples_per_prompt ge 1, temperature gt 0, top_p gt 0, top_p le 1"),
    'algo:remax': (
        "gamma gt 0, gamma le 1, kl_coef ge 0, max_new_tokens gt 0, missing_eos_penalty ge 0, "
        "reward_clip gt 0, temperature gt 0, top_p gt 0, top_p le 1"),
    'algo:reward': "center_rewards_coefficient ge 0",
    'algo:rloo': (
        "beta ge 0, epsilon ge 0, epsilon_high ge 0, generation_batch_size ge 1, "
        "max_completion_length gt 0, min_p ge 0, min_p le 1, num_generations ge 2, "
        "num_generations_eval ge 1, num_iterations ge 1, ref_model_mixup_alpha ge 0, "
        "ref_model_mixup_alpha le 1, ref_model_sync_steps ge 1, repetition_penalty gt 0, "
        "steps_per_generation ge 1, temperature gt 0, top_k ge 0, top_p gt 0, top_p le 1"),
    'algo:robust_dpo': (
        "beta gt 0, discopop_tau gt 0, f_alpha gt 0, f_alpha lt 1, label_smoothing ge 0, "
        "label_smoothing lt 0.5, ld_alpha ge 0, ld_alpha le 1"),
    'algo:rpo': (
        "beta gt 0, discopop_tau gt 0, f_alpha gt 0, f_alpha lt 1, label_smoothing ge 0, "
        "label_smoothing lt 0.5, ld_alpha ge 0, ld_alpha le 1"),
    'algo:rso': (
        "gamma gt 0, max_new_tokens gt 0, num_candidates ge 2, num_samples ge 2, sample_beta gt 0, "
        "temperature gt 0, top_k ge 0, top_p gt 0, top_p le 1"),
    'algo:sft': "pass_n ge 1",
    'algo:simpo': "beta gt 0, cpo_alpha ge 0, label_smoothing ge 0, label_smoothing lt 0.5, simpo_gamma ge 0",
    'algo:slic': (
        "beta gt 0, discopop_tau gt 0, f_alpha gt 0, f_alpha lt 1, label_smoothing ge 0, "
        "label_smoothing lt 0.5, ld_alpha ge 0, ld_alpha le 1"),
    'algo:spo': "beta gt 0, min_key_word_length ge 1, ssl_weight ge 0",
    'algo:sppo': (
        "beta gt 0, iterations ge 1, max_new_tokens gt 0, num_samples ge 2, temperature gt 0, top_p "
        "gt 0, top_p le 1"),
    'algo:sppo_hard': (
        "beta gt 0, discopop_tau gt 0, f_alpha gt 0, f_alpha lt 1, label_smoothing ge 0, "
        "label_smoothing lt 0.5, ld_alpha ge 0, ld_alpha le 1"),
    'algo:srpo': "alpha ge 0, alpha le 1, beta gt 0",
    'algo:xpo': (
        "beta gt 0, discopop_tau gt 0, label_smoothing ge 0, label_smoothing lt 0.5, max_new_tokens "
        "gt 0, missing_eos_penalty ge 0, temperature gt 0, top_p gt 0, top_p le 1"),
}


def test_every_bound_is_the_documented_one():
    pinned = {(where, *item.split()) for where, items in PINNED_BOUNDS.items() for item in items.split(", ")}
    found = {(where, key, kind, str(limit)) for where, key, kind, limit in CASES}
    assert found - pinned == set(), "bounds not in the table (new or moved)"
    assert pinned - found == set(), "documented bounds the code no longer has"


# (recipe, override, words of the one-line error): documented bounds and validators, through the recipe loader
BAD = [
    ("dpo", "algo.label_smoothing=0.5", "label_smoothing"),
    ("robust_dpo", "algo.label_smoothing=0.5", "label_smoothing"),
    ("online_dpo", "algo.label_smoothing=0.5", "label_smoothing"),
    ("cpo", "algo.label_smoothing=0.5", "label_smoothing"),
    ("dpo", "algo.beta=0", "beta"),
    ("dpo", "algo.beta=-0.1", "beta"),
    ("online_dpo", "algo.beta=0", "beta"),
    ("dpo", "algo.label_smoothing=0.2", "label_smoothing applies only"),
    ("online_dpo", "algo.loss_type=exo_pair", "exo_pair"),
    ("online_dpo", "algo.loss_weights=[1.0, 2.0]", "loss_weights"),
    ("xpo", "algo.alpha=-0.1", "alpha"),
    ("xpo", "algo.alpha=[0.1, -1.0]", "alpha"),
    ("ppo", "algo.lam=1.01", "lam"),
    ("ppo", "algo.lam=-0.1", "lam"),
    ("ppo", "algo.gamma=0", "gamma"),
    ("ppo", "algo.gamma=1.5", "gamma"),
    ("ppo", "algo.clip_range=0", "clip_range"),
    ("ppo", "algo.clip_range_value=0", "clip_range_value"),
    ("ppo", "algo.vf_coef=-1", "vf_coef"),
    ("ppo", "algo.kl_coef=-0.1", "kl_coef"),
    ("ppo", "algo.kl_target=0", "kl_target"),
    ("ppo", "algo.ppo_epochs=0", "ppo_epochs"),
    ("ppo", "algo.num_minibatches=0", "num_minibatches"),
    ("ppo", "algo.top_p=1.5", "top_p"),
    ("ppo", "algo.temperature=0", "temperature"),
    ("ppo", "algo.max_new_tokens=0", "max_new_tokens"),
    ("p3o", "algo.clip_range=0", "clip_range"),
    ("remax", "algo.gamma=1.01", "gamma"),
    ("remax", "algo.reward_clip=0", "reward_clip"),
    ("reinforce_pp", "algo.baseline=group", "samples_per_prompt"),
    ("reinforce_pp", "algo.samples_per_prompt=0", "samples_per_prompt"),
    ("ppo", "ref_model.soup=[tiny, tiny]", None),  # accepted: the base of the two soup lines below
    ("ppo", "ref_model.soup_weights=[0.5, 0.5]", "soup_weights needs one weight per soup model"),
    ("sft", "dataset.max_samples=0", "max_samples"),
    ("sft", "dataset.eval_fraction=1.0", "eval_fraction"),
    ("sft", "dataset.toy.size=0", "size"),
    ("sft", "train.warmup_ratio=1.0", "warmup_ratio"),
    ("sft", "peft.lora_dropout=1.0", "lora_dropout"),
]


@pytest.mark.parametrize("recipe,override,words", BAD)
def test_a_bad_value_is_refused_by_the_recipe_loader(recipe, override, words):
    from aligntool.recipe.loader import load_recipe

    if words is None:
        load_recipe(RECIPES / f"{recipe}.yaml", [override])
        return
    message = user_error(load_recipe, RECIPES / f"{recipe}.yaml", [override])
    assert words in message, message


@pytest.mark.parametrize("weights", ["[1.5, -0.5]", "[-0.2, 1.2]", "[0.6, 0.6]"])
def test_soup_weights_must_be_non_negative_and_sum_to_one(weights):
    from aligntool.recipe.loader import load_recipe

    message = user_error(load_recipe, RECIPES / "ppo.yaml",
                         ["ref_model.soup=[tiny, tiny]", f"ref_model.soup_weights={weights}"])
    assert "soup_weights must be non-negative and sum to 1" in message
    load_recipe(RECIPES / "ppo.yaml", ["ref_model.soup=[tiny, tiny]", "ref_model.soup_weights=[0.0, 1.0]"])


@pytest.mark.parametrize("args,words", [
    (["--recipe", "dpo", "algo.label_smoothing=0.5"], "label_smoothing"),
    (["--recipe", "ppo", "ref_model.soup=[tiny, tiny]", "ref_model.soup_weights=[1.5, -0.5]"], "soup_weights"),
    (["--recipe", "ppo", "algo.lam=1.5"], "algo.lam"),
    (["--recipe", "sft", "dataset.max_samples=0"], "max_samples"),
])
def test_bad_values_through_the_cli_exit_2_with_one_line(capsys, tmp_path, args, words):
    expect_error(capsys, ["train", *args, f"output_dir={tmp_path}/o"], words)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("recipe,n", [("sft", 7), ("dpo", 5), ("ppo", 3), ("sft", 1)])
def test_max_samples_keeps_exactly_n_rows(recipe, n):
    from aligntool import data
    from aligntool.recipe.loader import load_recipe

    loaded = load_recipe(RECIPES / f"{recipe}.yaml", ["dataset.toy.size=20", f"dataset.max_samples={n}"])
    train, _ = data.load_for_recipe(loaded.recipe, loaded.spec.data)
    assert len(train) == n
    whole = load_recipe(RECIPES / f"{recipe}.yaml", ["dataset.toy.size=20"])
    full, _ = data.load_for_recipe(whole.recipe, whole.spec.data)
    assert train.to_list() == full.to_list()[:n]  # the first N rows


@pytest.mark.parametrize("overrides,words", [
    (["algo.baseline=group", "algo.samples_per_prompt=2", "algo.gamma=0.9"], "gamma 1"),
    (["algo.missing_eos_penalty=-1"], "missing_eos_penalty"),
])
def test_reinforce_pp_validators_refuse(overrides, words):
    from aligntool.recipe.loader import load_recipe

    message = user_error(load_recipe, RECIPES / "reinforce_pp.yaml", overrides)
    assert words in message, message
    load_recipe(RECIPES / "reinforce_pp.yaml", ["algo.baseline=group", "algo.samples_per_prompt=2",
                                                         "algo.gamma=1"])


def test_overrides_are_read_as_yaml_values():
    from aligntool.recipe.loader import load_recipe

    loaded = load_recipe(RECIPES / "ppo.yaml", ["train.max_steps=7", "algo.kl_coef=0.25",
                                                         "algo.whiten_advantages=false", "algo.kl_target=null"])
    assert loaded.recipe.train.max_steps == 7 and isinstance(loaded.recipe.train.max_steps, int)
    resolved = loaded.resolved()
    assert resolved["algo"]["kl_coef"] == 0.25 and resolved["algo"]["whiten_advantages"] is False
    assert resolved["algo"]["kl_target"] is None
