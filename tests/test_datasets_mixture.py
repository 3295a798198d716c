"""`dataset.mixture` (issue 28 item 1): several sources, each with its own columns/format, mixed at set shares with
the data seed; the realised counts logged and written to output_dir/data_mixture.json; bad shares in one line."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from conftest import user_error

from aligntool import data
from aligntool.recipe.loader import load_recipe

HH_GZ = Path(__file__).parent / "data" / "hh-rlhf" / "harmless-base-test-800.jsonl.gz"


def _pairs(path: Path, tag: str, n: int, names=("prompt", "chosen", "rejected")) -> str:
    path.write_text("".join(json.dumps({names[0]: f"{tag} q{i}", names[1]: f" good {i}", names[2]: f" bad {i}"})
                            + "\n" for i in range(n)))
    return str(path)


def _mixture(tmp_path, *overrides, kind="preference", recipe="dpo", out=None):
    logs = []
    loaded = load_recipe(recipe, list(overrides))
    train, evald = data.load_for_recipe(loaded.recipe, kind, log=logs.append, output_dir=out)
    return train, evald, logs


def _sources(train) -> Counter:
    return Counter(p.split(" ")[0] for p in train["prompt"])


def test_weights_set_the_shares_of_mixture_size_and_the_counts_are_logged_and_written(tmp_path):
    a = _pairs(tmp_path / "a.jsonl", "A", 100)
    b = _pairs(tmp_path / "b.jsonl", "B", 100, names=("question", "good", "bad"))
    mixture = (f"dataset.mixture=[{{path: {a}, weight: 3}}, {{path: {b}, weight: 1, "
               "columns: {question: prompt, good: chosen, bad: rejected}}]")
    out = tmp_path / "run"
    train, _, logs = _mixture(tmp_path, mixture, "dataset.mixture_size=40", out=out)
    assert _sources(train) == {"A": 30, "B": 10}  # 3:1 of 40
    assert len(set(train["prompt"])) == 40  # without replacement
    assert set(_sources(train.select(range(20)))) == {"A", "B"}  # shuffled together, not A's rows then B's
    lines = [m for m in logs if m.startswith("dataset.mixture[")]
    assert lines == [f"dataset.mixture[0] {a}: 30 of its 100 rows, share 75.0% of 40",
                     f"dataset.mixture[1] {b}: 10 of its 100 rows, share 25.0% of 40"]
    written = json.loads((out / "data_mixture.json").read_text())
    assert written["seed"] == 0 and written["rows"] == 40
    assert [(s["path"], s["rows"], s["rows_available"]) for s in written["sources"]] == [(a, 30, 100), (b, 10, 100)]
    again, _, _ = _mixture(tmp_path, mixture, "dataset.mixture_size=40")
    assert again["prompt"] == train["prompt"]  # the same seed draws the same rows in the same order
    other, _, _ = _mixture(tmp_path, mixture, "dataset.mixture_size=40", "dataset.toy.seed=1")
    assert _sources(other) == {"A": 30, "B": 10} and set(other["prompt"]) != set(train["prompt"])


def test_without_mixture_size_the_source_that_runs_out_first_sets_the_total_and_fractions_may_sum_below_one(
        tmp_path):
    a, b = _pairs(tmp_path / "a.jsonl", "A", 10), _pairs(tmp_path / "b.jsonl", "B", 40)
    train, _, _ = _mixture(tmp_path, f"dataset.mixture=[{{path: {a}}}, {{path: {b}}}]")
    assert _sources(train) == {"A": 10, "B": 10}  # equal shares: A's 10 rows at 1/2 -> 20 rows
    train, _, _ = _mixture(tmp_path, f"dataset.mixture=[{{path: {a}, fraction: 0.2}}, {{path: {b}, fraction: 0.5}}]")
    assert _sources(train) == {"A": 10, "B": 25}  # total min(10/0.2, 40/0.5) = 50: 10 + 25
    # a source asked for more rows than it has is taken whole, then the rest drawn
    train, _, logs = _mixture(tmp_path, f"dataset.mixture=[{{path: {a}, weight: 1}}, {{path: {b}, weight: 1}}]",
                              "dataset.mixture_size=50")
    counts = Counter(p for p in train["prompt"] if p.startswith("A"))
    assert sum(counts.values()) == 25 and set(counts.values()) == {2, 3} and len(counts) == 10
    assert any("taken 2.50 times: rows repeat" in m for m in logs)


def test_fractions_never_give_more_rows_than_mixture_size(tmp_path):
    """Fractions 0.5 + 0.5 of 3 rows: 1.5 each; rounding each up gave 4 rows. Largest remainder: 3 in all (2 + 1);
    fractions summing below 1 give their share of the total (0.3 + 0.3 of 5: 3 rows)."""
    from aligntool.data.mixture import counts

    a, b = _pairs(tmp_path / "a.jsonl", "A", 10), _pairs(tmp_path / "b.jsonl", "B", 10)
    train, _, _ = _mixture(tmp_path, f"dataset.mixture=[{{path: {a}, fraction: 0.5}}, {{path: {b}, fraction: 0.5}}]",
                           "dataset.mixture_size=3")
    assert len(train) == 3 and sorted(_sources(train).values()) == [1, 2]
    assert sum(counts([10, 10], [0.3, 0.3], 5, normalised=False)[1]) == 3
    assert counts([10, 10, 10], [0.2, 0.2, 0.2], 10, normalised=False)[1] == [2, 2, 2]


def test_sources_in_different_published_formats_mix_and_an_eval_set_still_works(tmp_path):
    b = _pairs(tmp_path / "b.jsonl", "B", 50)
    mixture = (f"dataset.mixture=[{{path: {HH_GZ}, format: hh-rlhf, split: 'train[:60]', weight: 1}}, "
               f"{{path: {b}, weight: 1}}]")
    train, evald, logs = _mixture(tmp_path, mixture, "dataset.eval_fraction=0.2")
    assert len(train) + len(evald) == 100
    assert sum(p.endswith("\n\nAssistant:") for p in list(train["prompt"]) + list(evald["prompt"])) == 50
    e = _pairs(tmp_path / "e.jsonl", "E", 6)
    train, evald, _ = _mixture(tmp_path, mixture, f"dataset.eval_path={e}")
    assert len(train) == 100 and evald["prompt"] == [f"E q{i}" for i in range(6)]


@pytest.mark.parametrize("mixture, message", [
    ("[{path: a.jsonl, weight: 0}]", "dataset.mixture.0.weight: input should be greater than 0"),
    ("[{path: a.jsonl, fraction: 1.5}]", "dataset.mixture.0.fraction: input should be less than or equal to 1"),
    ("[{path: a.jsonl, fraction: 0.7}, {path: b.jsonl, fraction: 0.5}]", "the fractions sum to 1.2, more than 1"),
    ("[{path: a.jsonl, weight: 1}, {path: b.jsonl, fraction: 0.5}]", "every source a weight or every source a frac"),
    ("[{path: a.jsonl, weight: 1}, {path: b.jsonl}]", "mixture[1] (b.jsonl): has no weight"),
])
def test_bad_shares_are_one_line_each(mixture, message):
    assert message in user_error(load_recipe, "dpo", [f"dataset.mixture={mixture}"])


def test_a_source_whose_columns_do_not_fit_is_named_and_path_with_mixture_is_refused(tmp_path):
    a = _pairs(tmp_path / "a.jsonl", "A", 5)
    b = _pairs(tmp_path / "b.jsonl", "B", 5, names=("question", "good", "bad"))
    message = user_error(_mixture, tmp_path, f"dataset.mixture=[{{path: {a}}}, {{path: {b}}}]")
    assert message.startswith(f"dataset.mixture[1] {b}: missing column(s)") and "found: question, good, bad" in message
    message = user_error(_mixture, tmp_path, f"dataset.mixture=[{{path: {a}}}, {{path: {b}, columns: {{q: prompt}}}}]")
    assert message == (f"dataset.mixture[1] {b}: dataset.columns names 'q', not a column of the data; found: question, "
                       "good, bad")
    assert "set either path or mixture" in user_error(load_recipe, "dpo", [f"dataset.path={a}",
                                                                          f"dataset.mixture=[{{path: {a}}}]"])


def test_kto_reads_a_mixture_of_pairs_as_unpaired_rows(tmp_path):
    a, b = _pairs(tmp_path / "a.jsonl", "A", 6), _pairs(tmp_path / "b.jsonl", "B", 6)
    train, _, _ = _mixture(tmp_path, f"dataset.mixture=[{{path: {a}}}, {{path: {HH_GZ}, format: hh-rlhf}}, "
                           f"{{path: {b}}}]", "dataset.unpaired_from_pairs=true", kind="unpaired", recipe="kto")
    assert len(train) == 36 and sum(train["label"]) == 18  # 3 x 6 pairs, two rows each
    assert sum(p.endswith("\n\nAssistant:") for p in train["prompt"]) == 12


def test_overwrite_removes_the_previous_runs_mixture_record(tmp_path):
    """--overwrite without a mixture must not leave the old run's data_mixture.json describing the new run."""
    from aligntool.outputs import clear_previous_run

    (tmp_path / "data_mixture.json").write_text("{}")
    (tmp_path / "summary.json").write_text("{}")
    clear_previous_run(tmp_path)
    assert not (tmp_path / "data_mixture.json").exists() and not (tmp_path / "summary.json").exists()
