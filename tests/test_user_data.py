"""A user's own data and settings (issue 26 items 6, 8 and 10): what a recipe names is what the run uses, or a
one-line error says why not."""

from __future__ import annotations

import json
from pathlib import Path

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
