"""Online DPO, XPO and INPO on the tiny model: pairs from a preference source, the shared rollout engine, iterations."""

import json
import math

import pytest
from conftest import RECIPES, REPO, train_two_processes

from aligntool.recipe.loader import load_recipe
from aligntool.train import train

pytestmark = pytest.mark.slow

QUICK = ["train.max_steps=4", "train.per_device_train_batch_size=4", "train.logging_steps=1", "train.save_steps=2",
         "algo.max_new_tokens=12", "dataset.toy.size=32"]


def rows(path):
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]


def soft_judge(prompts, a, b):
    """A pairwise judge: P(a > b) from the gold reward with Bradley-Terry temperature 1."""
    import math

    from aligntool.toy import world

    return [1 / (1 + math.exp(world.gold_reward(y) - world.gold_reward(x))) for x, y in zip(a, b)]


@pytest.mark.parametrize("loss_type,first_loss", [("sigmoid", math.log(2)), ("ipo", 25.0), ("[ipo, sft]", None)])
def test_online_dpo_runs_with_any_loss_type(tmp_path, tiny_path, loss_type, first_loss):
    """At the first step the policy is the reference: every log-ratio is 0, so sigmoid gives -log sigmoid(0) = log 2
    and IPO (1/(2 beta))^2 = 25 at beta 0.1, whatever the samples and their labels."""
    extra = ["algo.loss_weights=[1.0, 0.1]"] if "," in loss_type else []
    summary = train(load_recipe(RECIPES / "online_dpo.yaml",
                                [*QUICK, f"output_dir={tmp_path}", f"algo.loss_type={loss_type}", *extra]))
    assert summary["global_step"] == 4
    got = rows(tmp_path)
    assert [r["step"] for r in got] == [1, 2, 3, 4]
    assert got[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-5)
    if first_loss is not None:
        assert got[0]["loss"] == pytest.approx(first_loss, rel=1e-5)
    else:  # 25 plus 0.1 x the chosen samples' token-mean NLL (> 0)
        assert got[0]["loss"] > 25.0
    assert got[-1]["loss"] != got[0]["loss"]
    assert (tmp_path / "checkpoints" / "checkpoint-2" / "COMPLETE").is_file()


def test_online_dpo_with_a_pairwise_judge_function(tmp_path, tiny_path, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "tests"))
    train(load_recipe(RECIPES / "online_dpo.yaml",
                      [*QUICK, f"output_dir={tmp_path}", "reward.source=gold",
                       "reward.judge=test_online_pref_e2e:soft_judge"]))
    probs = [r["preference_prob"] for r in rows(tmp_path)]
    assert all(0 < p < 1 for p in probs)  # a soft judge: never exactly 0 or 1 on these pairs


def test_xpo_alpha_schedule_and_reference_samples(tmp_path, tiny_path):
    train(load_recipe(RECIPES / "xpo.yaml", [*QUICK, f"output_dir={tmp_path}", "algo.alpha=[0.1, 0.0]"]))
    got = rows(tmp_path)
    assert [r["alpha"] for r in got] == [0.1, 0.1, 0.0, 0.0]  # two values over four iterations
    assert all(r["ref_sample_logp"] < 0 for r in got)
    # step 1: policy = reference, so the DPO part is log 2 and the loss log 2 + alpha * mean log pi(reference sample)
    assert got[0]["loss"] == pytest.approx(math.log(2) + 0.1 * got[0]["ref_sample_logp"], rel=1e-5)
    assert got[2]["alpha"] == 0.0 and got[2]["loss"] != pytest.approx(math.log(2) + 0.1 * got[2]["ref_sample_logp"])


def test_inpo_iterations_first_loss_resume_and_saved_stages(tmp_path, tiny_path):
    args = [f"output_dir={tmp_path}", "train.max_steps=2", "train.per_device_train_batch_size=4",
            "train.logging_steps=1", "algo.max_new_tokens=12", "dataset.toy.size=24", "algo.iterations=2",
            "algo.eta=0.1"]
    summary = train(load_recipe(RECIPES / "inpo.yaml", args))
    assert [s["iteration"] for s in summary["per_iteration"]] == [1, 2]
    got = rows(tmp_path)
    first = next(r for r in got if r.get("stage") == "iter-1")
    # at the first step pi = pi_ref = pi_t, so h = 0 exactly when the reference and last-iterate log-probs were
    # precomputed with the same tokens and masks as training: L = (1/(2 eta))^2 = 25
    assert first["loss"] == pytest.approx(25.0, rel=1e-5)
    for t in (1, 2):
        stage = tmp_path / f"iter-{t}"
        assert (stage / "iteration.done").is_file() and (stage / "model.safetensors").is_file()
        pairs = [json.loads(line) for line in (stage / "samples.jsonl").read_text().splitlines()]
        assert pairs and all(p["p_chosen_over_rejected"] > 0.5 for p in pairs)
    # a rerun continues after the finished iterations and keeps their data (as if cut after the last one)
    before = (tmp_path / "iter-1" / "samples.jsonl").stat().st_mtime_ns
    (tmp_path / "summary.json").unlink()
    from aligntool.errors import UserError

    with pytest.raises(UserError, match=r"algo.eta 0.1 -> 0.2.*--accept-changes"):  # a pipeline's recipe is checked
        train(load_recipe(RECIPES / "inpo.yaml", [*args, "algo.eta=0.2"]), resume=True)
    again = train(load_recipe(RECIPES / "inpo.yaml", [*args, "algo.iterations=2"]), resume=True)
    assert again["per_iteration"] == [] and (tmp_path / "iter-1" / "samples.jsonl").stat().st_mtime_ns == before


def test_xpo_with_two_processes(tmp_path, tiny_path):
    summary, _ = train_two_processes("xpo", tmp_path / "ddp", *QUICK)
    assert summary["global_step"] == 4
