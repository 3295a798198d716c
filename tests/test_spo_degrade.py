"""SPO's key-content removal (the self-supervised degrees)."""

import random

from aligntool.trainers.spo import degrade

TEXT = " the hotel was lovely . the staff was friendly and the breakfast was fresh ."


def test_degree_zero_keeps_the_response_and_one_removes_every_key_word():
    assert degrade(TEXT, 0.0, random.Random(0)) == TEXT
    assert degrade(TEXT, 1.0, random.Random(0)) == " the was . the was and the was ."


def test_half_removes_half_of_the_key_words_deterministically():
    key = ["hotel", "lovely", "staff", "friendly", "breakfast", "fresh"]
    out = degrade(TEXT, 0.5, random.Random(3))
    assert sum(w in out.split() for w in key) == 3
    assert out == degrade(TEXT, 0.5, random.Random(3))
    assert out.startswith(" the ")
