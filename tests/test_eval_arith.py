"""The built-in ``tiny-arith`` model and ``aligntool eval --task arithmetic``: the unbiased pass@k against
``math.comb`` and hand-computed values, tiny-arith built once and cached, better than ``tiny`` on held-out questions,
the eval CLI on the task, and its bad input."""

import json
import math

import pytest

from aligntool.cli import main
from aligntool.toy import arith, world


# ---------------------------------------------------------------------------------------------------- pass@k
def comb_pass_at_k(n, c, k):
    """Chen et al. 2021, eq. 1 with exact integers: 1 - C(n - c, k) / C(n, k) (math.comb is 0 when k > n - c)."""
    return 1 - math.comb(n - c, k) / math.comb(n, k)


@pytest.mark.parametrize("n", [1, 3, 8, 16, 50])
def test_pass_at_k_equals_the_binomial_formula(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert arith.pass_at_k(n, c, k) == pytest.approx(comb_pass_at_k(n, c, k), abs=1e-12), (n, c, k)


def test_pass_at_k_hand_computed_values():
    assert arith.pass_at_k(8, 1, 1) == pytest.approx(1 / 8)
    assert arith.pass_at_k(8, 2, 4) == pytest.approx(1 - 15 / 70)  # C(6,4) = 15 of the C(8,4) = 70 subsets miss
    assert arith.pass_at_k(8, 3, 8) == 1.0 and arith.pass_at_k(8, 5, 4) == 1.0  # every subset holds a right one
    assert arith.pass_at_k(5, 0, 3) == 0.0
    assert arith.pass_at_k(4, 2, 2) == pytest.approx(5 / 6)  # 1 of the 6 pairs is {wrong, wrong}


# ---------------------------------------------------------------------------------------------------- the model
def test_tiny_arith_trains_on_the_train_split_only():
    from aligntool.toy.tiny import ARITH_SFT

    rows = arith.sft_rows(ARITH_SFT["steps"] * ARITH_SFT["batch_size"], seed=ARITH_SFT["seed"], split="train")
    assert not any(world.is_eval_prompt(r["prompt"]) for r in rows)


def test_tiny_arith_is_built_once_and_cached(tiny_arith_path):
    from aligntool.models import resolve

    weights = tiny_arith_path / "model.safetensors"
    before = (weights.stat().st_mtime_ns, sorted(p.name for p in tiny_arith_path.iterdir()))
    assert resolve("tiny-arith", log=lambda m: None) == str(tiny_arith_path)
    # no rebuild: a build renames a new folder into place (new files, new modification times)
    assert (weights.stat().st_mtime_ns, sorted(p.name for p in tiny_arith_path.iterdir())) == before
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(before[1])


def test_cached_build_calls_its_builder_once(tmp_path):
    """The caching both built-ins use: one build, into a temporary folder renamed into place."""
    from aligntool.toy.tiny import cached_build

    calls = []

    def build(out, progress):
        calls.append(out)
        (out / "model.safetensors").write_text("weights")

    target = tmp_path / "cache" / "m-v1"
    assert cached_build(target, "m", "no time", build, log=lambda m: None) == target
    assert cached_build(target, "m", "no time", build, log=lambda m: None) == target
    assert len(calls) == 1 and calls[0].name.startswith(".m-build-") and not calls[0].exists()
    assert (target / "model.safetensors").read_text() == "weights"


def test_cached_build_repairs_a_half_copied_folder_and_sweeps_killed_builds(tmp_path):
    """A target without weights is rebuilt (a plain rename onto it would fail every time), a temporary folder a killed
    build left is removed, and the built folder is readable by others (a shared cache)."""
    from aligntool.toy.tiny import cached_build

    target = tmp_path / "m-v1"
    target.mkdir()
    (target / "config.json").write_text("{}")  # no weights
    stale = tmp_path / ".m-build-dead"
    stale.mkdir()

    def build(out, progress):
        (out / "model.safetensors").write_text("weights")

    assert cached_build(target, "m", "no time", build, log=lambda m: None) == target
    assert sorted(p.name for p in target.iterdir()) == ["model.safetensors"] and not stale.exists()
    assert target.stat().st_mode & 0o755 == 0o755


def test_tiny_arith_beats_tiny_on_held_out_questions(tiny_arith_path, tiny_path):
    """Greedy accuracy over all held-out questions: tiny has never seen a number (about 0); tiny-arith is built to
    solve some (about 0.26), paired gain above 4 standard errors."""
    from aligntool.eval.toy import evaluate_arithmetic

    r = evaluate_arithmetic("tiny-arith", reference="tiny", samples=1, pass_k=[1], batch_size=512)
    assert r["num_questions"] == len(arith.prompts("eval"))
    assert r["reference_greedy_accuracy"] < 0.05
    assert 0.1 < r["greedy_accuracy"] < 0.6
    assert r["greedy_accuracy"] > r["reference_greedy_accuracy"]
    assert r["greedy_accuracy_gain_in_stderrs"] > 4
    n = r["num_questions"]
    p = r["greedy_accuracy"]
    assert r["greedy_accuracy_stderr"] == pytest.approx(math.sqrt(p * (1 - p) / (n - 1)))  # 0/1 scores: binomial


# ---------------------------------------------------------------------------------------------------- the CLI
def test_eval_cli_arithmetic_json(tiny_arith_path, tiny_path, capsys):
    assert main(["eval", "--model", "tiny-arith", "--task", "arithmetic", "--num-prompts", "24", "--samples", "4",
                 "--pass-k", "1,2,4", "--reference", "tiny", "--batch-size", "256", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["task"] == "arithmetic" and r["num_questions"] == 24 and r["samples_per_question"] == 4
    for name in ("greedy_accuracy", "pass@1", "pass@2", "pass@4"):
        for key in (name, f"{name}_stderr", f"reference_{name}", f"{name}_gain", f"{name}_gain_stderr"):
            assert isinstance(r[key], float) and math.isfinite(r[key]), key
        assert 0 <= r[name] <= 1
        assert r[f"{name}_gain"] == pytest.approx(r[name] - r[f"reference_{name}"])
    assert r["pass@1"] <= r["pass@2"] <= r["pass@4"]
    for s in r["samples"]:
        assert s["correct"] == arith.is_correct(s["prompt"], s["completion"])


def test_eval_cli_arithmetic_table(tiny_arith_path, capsys):
    assert main(["eval", "--model", "tiny-arith", "--task", "arithmetic", "--num-prompts", "8", "--samples", "2"]) == 0
    out = capsys.readouterr().out
    for key in ("greedy_accuracy", "greedy_accuracy_stderr", "pass@1", "pass@2_stderr"):
        assert key in out, key


@pytest.mark.parametrize("args, needle", [
    (["--task", "sums"], "--task: expected one of reviews, arithmetic, got 'sums'"),
    (["--task", "arithmetic", "--samples", "4", "--pass-k", "1,8"], "--pass-k: every k must be between 1 and"),
    (["--task", "arithmetic", "--pass-k", "one"], "--pass-k: expected comma-separated integers"),
    (["--task", "arithmetic", "--pass-k", "0"], "--pass-k: every k must be between 1 and"),
    (["--task", "arithmetic", "--revise", "1"], "--revise: applies to --task reviews only"),
])
def test_eval_cli_bad_input_is_one_line_exit_2(args, needle, capsys):
    assert main(["eval", "--model", "tiny", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and "\n" not in err, err
