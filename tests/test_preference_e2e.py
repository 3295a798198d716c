"""Each preference recipe trains on the tiny model and raises its own objective's preference accuracy."""

import json

import pytest
from conftest import RECIPES, SUMMARY_KEYS

from aligntool.recipe.loader import load_recipe
from aligntool.train import train

pytestmark = pytest.mark.slow

SHORT = ["train.max_steps=30", "train.per_device_train_batch_size=8", "train.save_steps=30", "train.logging_steps=10",
         "train.eval_strategy=no", "train.eval_on_start=true", "dataset.toy.size=240", "dataset.toy.eval_size=48"]


# IPO's eval loss starts at its zero-variance value: every margin is 0, so the loss is exactly 1/(4 tau^2) = 0.25.
# Learning adds the spread of the per-pair margins (Var h) to the loss before the mean margin's approach to 1/(2 tau)
# pays it back: after 30 steps the two nearly cancel (eval loss 0.2508 on transformers 5.25 / TRL 1.16, just below
# 0.25 on earlier versions), a coin toss on the library version; after 60 steps over 480 rows the loss is 0.189 and
# still falling (0.222, 0.217, 0.200 at steps 15, 30, 45).
LONGER = {"ipo": ["train.max_steps=60", "dataset.toy.size=480", "train.save_steps=60"]}


def evals(out):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "eval_loss" in r]


@pytest.mark.parametrize("name", ["ipo", "slic", "robust_dpo", "sppo_hard", "fdpo", "rpo", "cpl", "hypo", "srpo",
                                  "spo"])
def test_dpo_variant_recipe_learns_the_preferences(name, tmp_path, tiny_path):
    summary = train(load_recipe(RECIPES / f"{name}.yaml",
                                [*SHORT, *LONGER.get(name, []), f"output_dir={tmp_path}"]))
    before, after = evals(tmp_path)[0], summary["final_metrics"]
    assert after["eval_loss"] < before["eval_loss"], (before, after)
    assert after["eval_rewards/accuracies"] > max(0.55, before["eval_rewards/accuracies"]), (before, after)
    assert after["eval_rewards/margins"] > before["eval_rewards/margins"]


def test_rso_pipeline_saves_and_reuses_its_stages(tmp_path, tiny_path):
    from aligntool.trainers.base.stages import read_jsonl

    args = ["dataset.toy.size=12", "algo.num_candidates=6", "algo.num_samples=4", "algo.max_new_tokens=24",
            "train.max_steps=6", "train.per_device_train_batch_size=4", "train.save_steps=6", "train.logging_steps=2",
            f"output_dir={tmp_path}"]
    summary = train(load_recipe(RECIPES / "rso.yaml", args))
    for stage in ("candidates", "scored", "pairs"):
        assert (tmp_path / f"{stage}.jsonl").is_file()
    scored = read_jsonl(tmp_path / "scored.jsonl")
    assert len(scored) == 12 and all(len(r["candidates"]) == 6 == len(r["rewards"]) for r in scored)
    pairs = read_jsonl(tmp_path / "pairs.jsonl")
    assert summary["pairs"] == len(pairs) and 0 < len(pairs) <= 12 * 2  # first-round: num_samples/2 pairs per prompt
    assert all(p["score_chosen"] > p["score_rejected"] for p in pairs)
    # completions.jsonl: the first train.num_completions_to_log (8) selected pairs, tagged with the stage, step 0
    logged = read_jsonl(tmp_path / "completions.jsonl")
    assert logged == [{"step": 0, "stage": "rso/pairs", **p} for p in pairs[:8]]
    stamp = (tmp_path / "candidates.jsonl").stat().st_mtime_ns
    # select+train
    train(load_recipe(RECIPES / "rso.yaml", [*args, "algo.pairing=tournament"]), overwrite=True)
    assert (tmp_path / "candidates.jsonl").stat().st_mtime_ns == stamp
    assert len(read_jsonl(tmp_path / "pairs.jsonl")) > len(pairs) / 2
    # --overwrite started the file over; the reselected pairs were logged (the reused samples were not)
    assert read_jsonl(tmp_path / "completions.jsonl") == [
        {"step": 0, "stage": "rso/pairs", **p} for p in read_jsonl(tmp_path / "pairs.jsonl")[:8]]
    train(load_recipe(RECIPES / "rso.yaml", [*args, "algo.start_from=sample"]), overwrite=True)
    assert (tmp_path / "candidates.jsonl").stat().st_mtime_ns != stamp


def test_sppo_iterates_with_a_refreshed_reference(tmp_path, tiny_path):
    args = ["dataset.toy.size=24", "algo.iterations=2", "algo.num_samples=3", "algo.max_new_tokens=24",
            "train.per_device_train_batch_size=16", "train.num_train_epochs=2", "train.logging_steps=1",
            "algo.beta=0.1", f"output_dir={tmp_path}"]
    summary = train(load_recipe(RECIPES / "sppo.yaml", args))
    assert [s["iteration"] for s in summary["per_iteration"]] == [1, 2]
    assert SUMMARY_KEYS <= summary.keys() and summary["kind"] == "pipeline"
    for t in (1, 2):
        assert ((tmp_path / f"iter-{t}" / "model.safetensors").is_file()
                and (tmp_path / f"iter-{t}" / "samples.jsonl").is_file())
    rows = [json.loads(line) for line in (tmp_path / "iter-2" / "samples.jsonl").read_text().splitlines()]
    assert all(0.5 < r["p_chosen"] <= 1 and 0 <= r["p_rejected"] < 0.5 for r in rows)
    # iteration 2 starts from (and is regularised toward) iteration 1's model
    assert json.loads((tmp_path / "iter-2" / "stages.json").read_text())
    assert (tmp_path / "model.safetensors").is_file()
    logs = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert {r.get("stage") for r in logs} >= {"iter-1", "iter-2"}
    first = [r for r in logs if r.get("stage") == "iter-2" and "loss" in r][0]
    assert first["rewards/margins"] == pytest.approx(0.0, abs=0.05)  # the policy equals its new reference at first
    # iteration 1's first batch holds all its rows (<= 12 prompts, batch 16) and the policy is its reference, so
    # lr = 0 and the loss is the authors' halved sum: mean of ((P_w - 1/2)^2 + (P_l - 1/2)^2) / (2 beta^2)
    rows1 = [json.loads(line) for line in (tmp_path / "iter-1" / "samples.jsonl").read_text().splitlines()]
    first1 = [r for r in logs if r.get("stage") == "iter-1" and "loss" in r][0]
    beta = 0.1
    expected = sum(((r["p_chosen"] - 0.5) ** 2 + (r["p_rejected"] - 0.5) ** 2) / (2 * beta**2)
                   for r in rows1) / len(rows1)
    assert first1["loss"] == pytest.approx(expected, rel=1e-4)
    # completions.jsonl: each iteration's first train.num_completions_to_log (8) pairs, at its step
    logged = [json.loads(line) for line in (tmp_path / "completions.jsonl").read_text().splitlines()]
    rows2 = [json.loads(line) for line in (tmp_path / "iter-2" / "samples.jsonl").read_text().splitlines()]
    assert logged == ([{"step": 1, "stage": "sppo/iter-1", **r} for r in rows1[:8]]
                      + [{"step": 2, "stage": "sppo/iter-2", **r} for r in rows2[:8]])
    (tmp_path / "summary.json").unlink()  # as if cut after the last iteration
    again = train(load_recipe(RECIPES / "sppo.yaml", args), resume=True)  # both iterations are done
    assert again["per_iteration"] == []
    assert (tmp_path / "completions.jsonl").read_text().count("\n") == len(logged)  # nothing logged twice


def test_eval_with_self_revision(tmp_path, tiny_path):
    from aligntool.eval.toy import evaluate

    result = evaluate("tiny", reference="tiny", num_prompts=6, max_new_tokens=12, revise=1)
    assert result["revision_steps"] == 1 and result["kl_to_reference"] == pytest.approx(0.0, abs=1e-5)
