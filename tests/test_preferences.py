"""Preference sources and the labelling of online DPO / XPO pairs: ties, the missing-EOS penalty, option checks."""

import pytest
import torch
from conftest import RECIPES, REPO, user_error

from aligntool.online.online_dpo import AlgoConfig, OnlineDPO
from aligntool.online.rollout import Rollout
from aligntool.preferences import PreferenceSource
from aligntool.recipe.loader import load_recipe
from aligntool.recipe.schema import RewardConfig


def rollout(texts, missing_eos):
    """A rollout as the engine's sample() returns it, reduced to what labelling reads (texts, EOS flags)."""
    n = len(texts)
    return Rollout(["Review:"] * n, list(texts), torch.zeros(n, 2, dtype=torch.long), torch.ones(n, 2), 1,
                   torch.ones(n, 1), torch.tensor(missing_eos))


def test_hard_labels_give_ties_to_the_first_sample_as_trl():
    """TRL's OnlineDPO/XPO label `first >= second`; equal gold rewards (common: they are word counts) must not be
    coin flips: with 64 tied pairs a coin would give the second sample some wins."""
    source = PreferenceSource(RewardConfig(source="gold"), seed=0)
    a, b = [" the room was fine ."] * 64, [" the room was okay ."] * 64
    wins, p = source.prefer(["Review:"] * 64, a, b)
    assert p == [0.5] * 64 and wins == [True] * 64
    wins, _ = source.prefer(["Review:"] * 2, [" bad"] * 2, [" great"] * 2)  # gold 0 vs +1: the second wins
    assert wins == [False, False]


def test_soft_labels_keep_the_coin_flip_for_a_tie():
    source = PreferenceSource(RewardConfig(source="gold", bt_temperature=1.0), seed=0)
    wins, p = source.prefer(["Review:"] * 200, [" fine"] * 200, [" okay"] * 200)
    assert p == [0.5] * 200 and 60 < sum(wins) < 140  # Bernoulli(1/2), a 6-sigma band


def test_missing_eos_penalty_lowers_the_preference_score_before_labelling():
    """The first sample is better by gold reward (+1 vs 0) but was cut off before EOS: with a penalty of 2 the
    second wins (TRL: rewards[~contain_eos_token] -= missing_eos_penalty); without one, the first wins."""
    source = PreferenceSource(RewardConfig(source="gold"), seed=0)
    a = rollout([" great", " great", " great"], [True, False, True])
    b = rollout([" fine", " fine", " fine"], [False, False, True])
    penalised = OnlineDPO(AlgoConfig(missing_eos_penalty=2.0), source)
    wins, p = penalised.label(a.prompts, a, b)
    assert wins == [False, True, True] and p == [0.0, 1.0, 1.0]  # row 3: both cut off, both lowered by 2
    plain = OnlineDPO(AlgoConfig(), source)
    assert plain.label(a.prompts, a, b)[0] == [True, True, True]


def test_a_judge_rejects_the_missing_eos_penalty(tmp_path, monkeypatch, tiny_path):
    from aligntool.train import train

    monkeypatch.syspath_prepend(str(REPO / "tests"))
    loaded = load_recipe(RECIPES / "online_dpo.yaml", [
        f"output_dir={tmp_path}", "reward.judge=test_online_pref_e2e:soft_judge", "algo.missing_eos_penalty=1.0",
        "dataset.toy.size=8", "train.max_steps=1"])
    message = user_error(train, loaded)
    assert "missing_eos_penalty" in message and "judge" in message


@pytest.mark.parametrize("recipe", ["online_dpo", "xpo"])
def test_online_label_smoothing_is_refused_where_the_loss_ignores_it(recipe):
    message = user_error(load_recipe, RECIPES / f"{recipe}.yaml", ["algo.label_smoothing=0.1"])
    assert "label_smoothing" in message and "robust" in message
    loaded = load_recipe(RECIPES / f"{recipe}.yaml", ["algo.label_smoothing=0.1", "algo.loss_type=robust"])
    assert loaded.algo.label_smoothing == 0.1
