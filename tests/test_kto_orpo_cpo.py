"""KTO, ORPO, CPO and SimPO through TRL's trainers: short CLI runs of each recipe, the unpaired data kind (toy rows,
pairs split into unpaired rows, a user's file, bad labels), and the SimPO / ORPO losses against the papers' formulas in
NumPy on the same log-probabilities (which checks that aligntool's keys reach TRL's trainer as the papers mean them)."""

import dataclasses
import json

import numpy as np
import pytest
import yaml
from conftest import user_error
from test_bad_input import expect_error

from aligntool.cli import main
from aligntool.recipe.loader import load_recipe

TWO_STEPS = ["train.max_steps=2", "train.per_device_train_batch_size=4", "train.logging_steps=1", "train.save_steps=2",
             "dataset.toy.size=16"]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def pairs(n=6):
    from aligntool.toy import world

    return [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in world.preference_pairs(n, seed=3)]


def trl_choices(config_cls, name="loss_type"):
    """TRL's own list, read here from its config class (not through aligntool)."""
    return next(f for f in dataclasses.fields(config_cls) if f.name == name).metadata["choices"]


# ------------------------------------------------------------------ end to end: each recipe, 2 steps, through the CLI
@pytest.mark.parametrize("name", ["kto", "orpo", "cpo", "simpo"])
def test_recipe_trains_two_steps_through_the_cli(name, tmp_path, tiny_path):
    out = tmp_path / name
    assert main(["train", "--recipe", name, *TWO_STEPS, f"output_dir={out}"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["algorithm"] == name and summary["global_step"] == 2
    assert np.isfinite(summary["final_metrics"]["train_loss"])
    assert (out / "model.safetensors").is_file() and (out / "checkpoints" / "checkpoint-2" / "COMPLETE").is_file()
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("rewards/margins" in r for r in logged)  # TRL's own preference metrics reach metrics.jsonl
    algo = yaml.safe_load((out / "recipe.yaml").read_text())["algo"]
    if name == "simpo":  # the registry's preset, written to recipe.yaml as the run used it
        assert algo["loss_type"] == "simpo" and algo["cpo_alpha"] == 0.0 and algo["simpo_gamma"] == 1.0
    if name == "kto":
        assert "kl" in logged[0]


# -------------------------------------------------------------------------------------- the unpaired data kind
def test_toy_unpaired_rows_come_from_the_toy_pairs():
    from aligntool.data import toy_rows
    from aligntool.toy import world

    rows = toy_rows("unpaired", 10, 0, "train", 0.5)
    source = world.preference_pairs(5, seed=0, split="train", bt_temperature=0.5)
    assert len(rows) == 10 and sum(r["label"] for r in rows) == 5
    expected = ({(p["prompt"], p["chosen"], True) for p in source}
                | {(p["prompt"], p["rejected"], False) for p in source})
    assert {(r["prompt"], r["completion"], r["label"]) for r in rows} == expected
    assert len(toy_rows("unpaired", 7, 0, "train", 0.5)) == 7


def test_paired_file_splits_into_two_unpaired_rows_per_pair(tmp_path):
    from aligntool import data

    given = pairs(6)
    implicit = [{"chosen": p["prompt"] + p["chosen"], "rejected": p["prompt"] + p["rejected"]} for p in given]
    for rows in (given, implicit):  # explicit prompt column, and the prompt implicit in both (TRL's extract_prompt)
        path = write_jsonl(tmp_path / "pairs.jsonl", rows)
        recipe = load_recipe("kto", [f"dataset.path={path}", "dataset.unpaired_from_pairs=true"]).recipe
        train_set, eval_set = data.load_for_recipe(recipe, "unpaired", log=lambda m: None)
        assert eval_set is None and len(train_set) == 12 and train_set.column_names == ["prompt", "completion", "label"]
        assert sum(train_set["label"]) == 6
        # (an implicit prompt is the common start of both texts, which may run into the response: compare the whole)
        got = {(r["prompt"] + r["completion"], r["label"]) for r in train_set}
        assert got == ({(p["prompt"] + p["chosen"], True) for p in given}
                       | {(p["prompt"] + p["rejected"], False) for p in given})
        # shuffled: a pair's two rows are not all side by side (TRL's KL rows are the batch rotated by one row)
        assert any(train_set[i]["prompt"] != train_set[i + 1]["prompt"] for i in range(0, 12, 2))
    # the flag belongs to unpaired-data algorithms, and needs paired data
    recipe = load_recipe("dpo", [f"dataset.path={path}", "dataset.unpaired_from_pairs=true"]).recipe
    assert "unpaired_from_pairs" in user_error(data.load_for_recipe, recipe, "preference")
    unpaired = write_jsonl(tmp_path / "u.jsonl", [{"prompt": "a", "completion": "b", "label": True}])
    recipe = load_recipe("kto", [f"dataset.path={unpaired}", "dataset.unpaired_from_pairs=true"]).recipe
    assert "chosen+rejected" in user_error(data.load_for_recipe, recipe, "unpaired")


def test_kto_trains_on_a_users_jsonl_with_0_1_labels(tmp_path, tiny_path):
    from aligntool import data

    rows = [{"prompt": p["prompt"], "completion": p[c], "label": int(c == "chosen")}
            for p in pairs(4) for c in ("chosen", "rejected")]
    path = write_jsonl(tmp_path / "mine.jsonl", rows)
    recipe = load_recipe("kto", [f"dataset.path={path}"]).recipe
    train_set, _ = data.load_for_recipe(recipe, "unpaired", log=lambda m: None)
    assert train_set.features["label"].dtype == "bool"
    assert sorted((r["prompt"], r["completion"], r["label"]) for r in train_set) == sorted(
        (r["prompt"], r["completion"], bool(r["label"])) for r in rows)
    # a user's file is shuffled (seeded): TRL's KTO reads rows in order and takes its KL rows from the batch shifted
    # by one, so a file of side-by-side pairs would give matched (prompt, completion) KL rows
    assert [r["prompt"] for r in train_set] != [r["prompt"] for r in rows]
    again, _ = data.load_for_recipe(recipe, "unpaired", log=lambda m: None)
    assert again.to_list() == train_set.to_list()
    out = tmp_path / "out"
    assert main(["train", "--recipe", "kto", f"dataset.path={path}", "train.max_steps=2",
                 "train.per_device_train_batch_size=4", "train.save_steps=2", f"output_dir={out}"]) == 0
    assert json.loads((out / "summary.json").read_text())["global_step"] == 2


def test_eval_fraction_of_split_pairs_holds_out_whole_pairs(tmp_path):
    from aligntool import data

    path = write_jsonl(tmp_path / "pairs.jsonl", pairs(40))
    recipe = load_recipe("kto", [f"dataset.path={path}", "dataset.unpaired_from_pairs=true",
                                 "dataset.eval_fraction=0.25"]).recipe
    train_set, eval_set = data.load_for_recipe(recipe, "unpaired", log=lambda m: None)
    assert len(train_set) == 60 and len(eval_set) == 20
    assert not {r["prompt"] for r in train_set} & {r["prompt"] for r in eval_set}  # no pair on both sides


# ---------------------------------------------------------------------------------------------------- bad input
def test_unpaired_data_without_a_label_column(capsys, tmp_path):
    out = f"output_dir={tmp_path / 'out'}"
    path = write_jsonl(tmp_path / "nolabel.jsonl", [{"prompt": "a", "completion": "b"}])
    expect_error(capsys, ["train", "--recipe", "kto", f"dataset.path={path}", out], str(path), "'label'",
                 "prompt+completion+label")
    paired = write_jsonl(tmp_path / "paired.jsonl", pairs(2))
    expect_error(capsys, ["train", "--recipe", "kto", f"dataset.path={paired}", out], "unpaired_from_pairs: true")


@pytest.mark.parametrize("labels, shown", [(["yes", "no"], "'yes'"), ([1, 2], "2"), ([True, None], "null"),
                                           ([0.0, 1.0], "float")])
def test_non_boolean_labels_name_the_row(capsys, tmp_path, labels, shown):
    rows = [{"prompt": "p", "completion": f" c{i}", "label": v} for i, v in enumerate(labels)]
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    row = next(i for i, v in enumerate(labels) if not (isinstance(v, bool) or v in (0, 1) and isinstance(v, int)))
    last = expect_error(capsys, ["train", "--recipe", "kto", f"dataset.path={path}", f"output_dir={tmp_path / 'o'}"],
                        str(path), f"row {row + 1}",
                        "column 'label'", "expected a boolean")
    assert shown in last


def test_a_loss_type_trl_lacks_lists_trls(capsys, tmp_path):
    import warnings

    from trl import KTOConfig

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from trl.experimental.cpo import CPOConfig
    for name, config in (("kto", KTOConfig), ("cpo", CPOConfig), ("simpo", CPOConfig)):
        last = expect_error(capsys, ["train", "--recipe", name, "algo.loss_type=no_such_loss",
                                     f"output_dir={tmp_path / name}"], "algo.loss_type", "'no_such_loss'")
        assert all(t in last for t in trl_choices(config)), last
    out = f"output_dir={tmp_path / 'out'}"
    expect_error(capsys, ["train", "--recipe", "cpo", "algo.simpo_gamma=1.0", out], "simpo_gamma")
    expect_error(capsys, ["train", "--recipe", "kto", "train.per_device_train_batch_size=1", "dataset.toy.size=4", out],
                 "per_device_train_batch_size", "at least 2")


def test_kto_keys_reach_trls_config(tmp_path):
    from aligntool.train import Run

    loaded = load_recipe("kto", [f"output_dir={tmp_path}", "algo.desirable_weight=1.33", "algo.beta=0.2",
                                 "algo.loss_type=apo_zero_unpaired", "algo.precompute_ref_log_probs=true"])
    config = Run(loaded, tmp_path).trl_config()
    assert type(config).__name__ == "KTOConfig" and config.train_sampling_strategy == "sequential"
    assert (config.desirable_weight, config.undesirable_weight, config.beta) == (1.33, 1.0, 0.2)
    assert config.loss_type == "apo_zero_unpaired" and config.precompute_ref_log_probs is True


# ------------------------------------------------------ the papers' losses in NumPy vs TRL's trainer, same log-probs
def built_trainer(name, tmp_path, *overrides):
    from aligntool.train import prepare

    loaded = load_recipe(name, ["dataset.toy.size=8", f"output_dir={tmp_path / name}", *overrides])
    run = prepare(loaded, tmp_path / name)
    return loaded, loaded.spec.load().build(run)


def log_sigmoid(z):
    return -np.logaddexp(0.0, -z)


# length-normalised (mean per-token) log-probabilities of chosen and rejected responses
AVG_W = np.array([-0.3, -1.2, -2.5, -0.05, -4.0])
AVG_L = np.array([-0.9, -1.0, -2.0, -3.0, -0.01])


def test_simpo_loss_matches_the_paper(tmp_path, tiny_path):
    """SimPO Eq. 6: -log sigmoid(beta/|y_w| log pi(y_w|x) - beta/|y_l| log pi(y_l|x) - gamma), no NLL term."""
    import torch

    loaded, trainer = built_trainer("simpo", tmp_path, "algo.beta=2.5", "algo.simpo_gamma=1.4")
    assert (trainer.args.loss_type, trainer.args.cpo_alpha, trainer.args.beta) == ("simpo", 0.0, 2.5)
    beta, gamma = 2.5, 1.4
    expected = -log_sigmoid(beta * AVG_W - beta * AVG_L - gamma)
    losses, chosen_rewards, _ = trainer.cpo_loss(torch.tensor(AVG_W), torch.tensor(AVG_L))
    np.testing.assert_allclose(losses.numpy(), expected, rtol=1e-6)
    np.testing.assert_allclose(chosen_rewards.numpy(), beta * AVG_W, rtol=1e-6)
    # CPO (the cpo recipe): the same sigmoid loss on the margin, no gamma, plus the NLL term weighted by cpo_alpha
    _, cpo = built_trainer("cpo", tmp_path)
    assert (cpo.args.loss_type, cpo.args.cpo_alpha) == ("sigmoid", 1.0)
    losses, _, _ = cpo.cpo_loss(torch.tensor(AVG_W), torch.tensor(AVG_L))
    np.testing.assert_allclose(losses.numpy(), -log_sigmoid(0.1 * (AVG_W - AVG_L)), rtol=1e-6)


def test_orpo_loss_matches_the_paper(tmp_path, tiny_path):
    """ORPO Eqs. 3-7: odds(y|x) = P/(1-P) with P = exp(mean token log-prob); L_OR = -log sigmoid(log odds_w/odds_l);
    TRL's odds_ratio_loss returns lambda * log sigmoid(...), i.e. -lambda * L_OR (subtracted from the NLL)."""
    import torch

    _, trainer = built_trainer("orpo", tmp_path, "algo.beta=0.25")
    assert trainer.args.beta == 0.25
    p_w, p_l = np.exp(AVG_W), np.exp(AVG_L)
    l_or = -log_sigmoid(np.log(p_w / (1 - p_w)) - np.log(p_l / (1 - p_l)))
    losses, chosen_rewards, rejected_rewards, _, _ = trainer.odds_ratio_loss(torch.tensor(AVG_W), torch.tensor(AVG_L))
    np.testing.assert_allclose(-losses.numpy(), 0.25 * l_or, rtol=1e-5)
    np.testing.assert_allclose((chosen_rewards - rejected_rewards).numpy(), 0.25 * (AVG_W - AVG_L), rtol=1e-5)


class LogProbTable:
    """A stand-in for a causal LM in TRL's fused-LM-head call: row i of ``input_ids`` (width 2, so one completion
    token) gets the sequence log-prob ``values[input_ids[i, 0]]``; no entropy, no logits to speak of."""

    def __init__(self, values):
        self.values = values

    def __call__(self, input_ids, labels=None, **kwargs):
        from types import SimpleNamespace

        import torch

        log_probs = self.values[input_ids[:, 0]].unsqueeze(-1)
        zeros = torch.zeros_like(log_probs).detach()
        return SimpleNamespace(log_probs=log_probs, entropy=zeros, mean_logits=zeros, aux_loss=None)


def sigmoid(z):
    return 1 / (1 + np.exp(-z))


def test_kto_loss_matches_the_paper(tmp_path, tiny_path, monkeypatch):
    """KTO (Ethayarajh et al. 2024, Eq. 8 and Sec. 4.1): r = log pi(y|x) - log pi_ref(y|x); z0 = max(0, mean over the
    batch's mismatched (KL) rows of log pi - log pi_ref), no gradient; loss lambda_D (1 - sigmoid(beta (r - z0))) for a
    desirable row, lambda_U (1 - sigmoid(beta (z0 - r))) for an undesirable one; reward beta r. TRL 1.16 has no separate
    kto_loss: its KTOTrainer._compute_loss takes the log-probs from the policy and the reference, so both are tables
    here (TRL also averages z0 over processes: one process here)."""
    import torch

    _, trainer = built_trainer("kto", tmp_path, "algo.beta=0.3", "algo.desirable_weight=1.5",
                               "algo.undesirable_weight=0.7")
    assert (trainer.args.beta, trainer.args.desirable_weight, trainer.args.undesirable_weight) == (0.3, 1.5, 0.7)
    assert trainer.loss_type == "kto" and trainer.calculate_KL and not trainer.precompute_ref_logps
    beta, lam_d, lam_u = 0.3, 1.5, 0.7
    mode = "train" if trainer.model.training else "eval"
    labels = np.array([True, False, True, False, False, True])
    pol = np.array([-3.1, -2.0, -7.5, -0.4, -5.2, -1.0])
    ref = np.array([-3.6, -1.2, -6.0, -1.9, -5.2, -4.0])
    pol_kl = np.array([-4.0, -2.5, -6.1, -3.3, -0.9, -2.2])
    r = pol - ref
    cases = {"positive KL": np.array([-5.1, -3.0, -6.4, -4.2, -1.5, -2.0]),  # mean(pol_kl - ref_kl) = 0.53
             "negative KL, clamped to 0": np.array([-3.0, -1.5, -5.6, -3.1, -0.2, -1.8])}  # mean = -0.63
    n, m = len(pol), len(pol_kl)
    for case, ref_kl in cases.items():
        z0_raw = np.mean(pol_kl - ref_kl)
        z0 = max(0.0, z0_raw)
        assert (z0 > 0) == (case == "positive KL")
        expected = np.where(labels, lam_d * (1 - sigmoid(beta * (r - z0))), lam_u * (1 - sigmoid(beta * (z0 - r))))
        unclamped = np.where(labels, lam_d * (1 - sigmoid(beta * (r - z0_raw))),
                             lam_u * (1 - sigmoid(beta * (z0_raw - r))))
        policy = torch.tensor(np.concatenate([pol, pol_kl]), requires_grad=True)
        monkeypatch.setattr(trainer, "ref_model", LogProbTable(torch.tensor(np.concatenate([ref, ref_kl]))))

        def batch(rows):  # TRL's collated KTO batch: the completions' rows, and the batch's KL rows (all of them)
            ids = torch.tensor([[i, i] for i in rows])
            kl_ids = torch.tensor([[n + j, n + j] for j in range(m)])
            ones, kl_ones = torch.ones_like(ids), torch.ones_like(kl_ids)
            return {"input_ids": ids, "attention_mask": ones, "completion_mask": ones,
                    "label": torch.tensor(labels[rows]), "KL_input_ids": kl_ids, "KL_attention_mask": kl_ones,
                    "KL_completion_mask": kl_ones}

        # per row: one completion at a time against the same KL rows (z0 depends only on those)
        for i in range(n):
            trainer._metrics[mode].clear()
            loss = trainer._compute_loss(LogProbTable(policy), batch([i]), return_outputs=False)
            np.testing.assert_allclose(loss.item(), expected[i], rtol=1e-12, err_msg=f"{case}: row {i}")
            assert trainer._metrics[mode]["kl"] == [pytest.approx(z0, abs=1e-12)], case
            reward = trainer._metrics[mode]["rewards/chosen" if labels[i] else "rewards/rejected"]
            np.testing.assert_allclose(reward, [beta * r[i]], rtol=1e-12, atol=1e-15)
        # the whole batch: the mean of the weighted row losses; z0 carries no gradient (d loss / d log pi, z0 fixed)
        trainer._metrics[mode].clear()
        loss = trainer._compute_loss(LogProbTable(policy), batch(list(range(n))), return_outputs=False)
        np.testing.assert_allclose(loss.item(), expected.mean(), rtol=1e-12, err_msg=case)
        assert not np.allclose(expected, unclamped) or z0 == z0_raw  # the clamp changes the loss in the clamped case
        np.testing.assert_allclose(trainer._metrics[mode]["rewards/chosen"], [beta * r[labels].mean()], rtol=1e-12)
        np.testing.assert_allclose(trainer._metrics[mode]["rewards/rejected"], [beta * r[~labels].mean()], rtol=1e-12)
        loss.backward()
        s_d, s_u = sigmoid(beta * (r - z0)), sigmoid(beta * (z0 - r))
        grad = np.where(labels, -lam_d * beta * s_d * (1 - s_d), lam_u * beta * s_u * (1 - s_u)) / n
        np.testing.assert_allclose(policy.grad.numpy(), np.concatenate([grad, np.zeros(m)]), rtol=1e-10, atol=1e-15)
