"""The toy world: gold reward by hand, splits, Bradley-Terry labels, data rows."""

import math
import random

from aligntool.toy import world


def test_gold_reward_counts_lexicon_words_by_hand():
    assert world.gold_reward(" the hotel was great . the staff was rude .") == 0.0
    assert world.gold_reward(" the cafe was Lovely and WONDERFUL . i loved the food .") == 2.0
    assert world.gold_reward(" the room was dirty , cold and noisy .") == -3.0
    # whole words only: "greatest" and "coldness" are not lexicon words
    assert world.gold_reward("greatest coldness") == 0.0
    assert world.gold_reward("") == 0.0


def test_eval_prompts_are_held_out_and_deterministic():
    train, held_out = world.prompts("train"), world.prompts("eval")
    assert not set(train) & set(held_out)
    assert len(train) + len(held_out) == len(world.all_prompts())
    assert 0.10 < len(held_out) / len(world.all_prompts()) < 0.15  # about 1/8
    assert world.prompts("eval", 5, seed=3) == world.prompts("eval", 5, seed=3)
    assert world.prompts("eval", 5, seed=3) != world.prompts("eval", 5, seed=4)


def test_noiseless_pairs_prefer_the_higher_gold_reward():
    for row in world.preference_pairs(200, seed=1, bt_temperature=0.0):
        assert world.gold_reward(row["chosen"]) > world.gold_reward(row["rejected"])
        assert row["score_chosen"] == world.gold_reward(row["chosen"])
        assert not world.is_eval_prompt(row["prompt"])


def test_bradley_terry_noise_matches_the_sigmoid():
    rng = random.Random(0)
    t, n = 0.5, 20000
    hits = sum(world.bt_label(1.0, 0.0, rng, t) for _ in range(n))
    expected = 1 / (1 + math.exp(-1.0 / t))  # 0.8808
    assert abs(hits / n - expected) < 0.01


def test_noisy_pairs_flip_some_labels_and_eval_split_is_separate():
    rows = world.preference_pairs(500, seed=2, bt_temperature=1.0)
    flipped = sum(r["score_chosen"] < r["score_rejected"] for r in rows)
    assert 0.05 * len(rows) < flipped < 0.45 * len(rows)
    assert all(world.is_eval_prompt(r["prompt"]) for r in world.preference_pairs(50, split="eval"))


def test_sft_rows_are_positive_demonstrations():
    rows = world.sft_rows(100, seed=0)
    assert len(rows) == 100 and set(rows[0]) == {"prompt", "completion"}
    assert all(world.gold_reward(r["completion"]) >= 1 for r in rows)
    assert all(world.topic_of(r["prompt"]) in r["completion"] for r in rows)


def test_corpus_has_mixed_gold_reward():
    rewards = [world.gold_reward(c) for _, c in world.corpus(2000, seed=0)]
    assert min(rewards) < 0 < max(rewards)
    assert abs(sum(rewards) / len(rewards)) < 0.3
