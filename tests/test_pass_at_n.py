"""Pass@N: the DCO loss against formulas computed here, the unbiased pass@k against enumeration, the toy addition
task, the DCO trainer's loss against a dense reference on a real batch, an end-to-end run, and bad input."""

import itertools
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import RECIPES, REPO

from aligntool.errors import UserError
from aligntool.losses.sft import dco_gradient_factor, dco_loss
from aligntool.toy import arith, world

PS = [1e-9, 1e-4, 0.01, 0.05, 0.3, 0.7, 0.99]
NS = [1, 2, 4, 16, 64]


def np_dco(p, n):
    return -np.log(-np.expm1(n * np.log1p(-p)))  # -log(1 - (1 - p)^N), float64


def np_factor(p, n):
    return n * p * (1 - p) ** (n - 1) / -np.expm1(n * np.log1p(-p))


# ---------------------------------------------------------------------------------------------------- the loss
@pytest.mark.parametrize("n", NS)
def test_dco_loss_values_match_the_formula(n):
    p = np.array(PS)
    got = dco_loss(torch.tensor(np.log(p)), n).numpy()
    np.testing.assert_allclose(got, np_dco(p, n), rtol=1e-9, atol=1e-14)


def test_dco_with_n_1_is_sequence_cross_entropy():
    logp = torch.tensor([-1e-6, -0.05, -1.0, -7.5, -40.0], dtype=torch.float64)
    np.testing.assert_allclose(dco_loss(logp, 1).numpy(), -logp.numpy(), rtol=1e-12)


@pytest.mark.parametrize("n", NS)
def test_dco_gradient_is_F_times_the_ce_gradient(n):
    """Through a real (random) softmax model: d l_DCO / d theta = F(N, p) * d l_CE / d theta, F from NumPy."""
    gen = torch.Generator().manual_seed(n)
    weight = torch.randn(5, 7, dtype=torch.float64, generator=gen, requires_grad=True)
    feats = torch.randn(3, 5, dtype=torch.float64, generator=gen)  # a 3-token "sequence"
    tokens = torch.tensor([2, 5, 1])

    def seq_logp():
        return torch.log_softmax(feats @ weight, -1)[torch.arange(3), tokens].sum()

    (g_ce,) = torch.autograd.grad(-seq_logp(), weight)
    logp = seq_logp()
    (g_dco,) = torch.autograd.grad(dco_loss(logp, n), weight)
    p = math.exp(logp.item())
    np.testing.assert_allclose(g_dco.numpy(), np_factor(p, n) * g_ce.numpy(), rtol=1e-8, atol=1e-14)
    assert dco_gradient_factor(logp, n).item() == pytest.approx(np_factor(p, n), rel=1e-9)


def test_dco_is_stable_at_the_extremes():
    logp = torch.tensor([0.0, -1e-14, -300.0, -700.0], dtype=torch.float32, requires_grad=True)
    loss = dco_loss(logp, 16)
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(logp.grad).all()
    assert loss[0].item() == pytest.approx(0.0, abs=1e-6)  # p = 1: certainly covered
    # p -> 0: 1 - (1-p)^N -> N p, so the loss -> -log p - log N and its gradient -> the CE gradient (F -> 1)
    assert loss[2].item() == pytest.approx(300 - math.log(16), rel=1e-6)
    assert logp.grad[2].item() == pytest.approx(-1.0, rel=1e-5)
    with pytest.raises(ValueError):
        dco_loss(logp, 0)


def test_factor_limits_confidence():
    """F(N, p) is 1 at N=1, falls with p for N > 1 and is ~0 once p >> 1/N."""
    logp = torch.log(torch.tensor([0.001, 0.05, 0.2, 0.5, 0.9], dtype=torch.float64))
    assert torch.allclose(dco_gradient_factor(logp, 1), torch.ones(5, dtype=torch.float64))
    f = dco_gradient_factor(logp, 16)
    assert (f[1:] < f[:-1]).all() and f[0] > 0.99 and f[-1] < 1e-10


# ---------------------------------------------------------------------------------------------------- pass@k
@pytest.mark.parametrize("n", [1, 2, 5, 8])
def test_pass_at_k_equals_enumeration_over_subsets(n):
    for c in range(n + 1):
        outcomes = [True] * c + [False] * (n - c)
        for k in range(1, n + 1):
            subsets = list(itertools.combinations(outcomes, k))
            brute = sum(any(s) for s in subsets) / len(subsets)
            assert arith.pass_at_k(n, c, k) == pytest.approx(brute, abs=1e-12), (n, c, k)


def test_pass_at_k_large_n_and_bad_arguments():
    # 1 - C(n-c, k) / C(n, k) with exact integers, where the binomials themselves overflow floats
    n, c, k = 2000, 3, 500
    exact = 1 - math.comb(n - c, k) / math.comb(n, k)
    assert arith.pass_at_k(n, c, k) == pytest.approx(exact, rel=1e-12)
    for bad in ((4, 5, 1), (4, 1, 0), (4, 1, 5)):
        with pytest.raises(ValueError):
            arith.pass_at_k(*bad)


# ---------------------------------------------------------------------------------------------------- the task
def test_checker_correct_wrong_and_trailing_text():
    q = "Q: 23+48= A:"
    assert arith.answer(q) == 71
    assert arith.is_correct(q, " 71")
    assert arith.is_correct(q, "71<|end|>")
    assert arith.is_correct(q, " 71 and then some")  # only the first word counts
    assert arith.is_correct(q, " 71<|end|> 5")
    for wrong in (" 72", " 071", " 7 1", " 71.", "", " ", "<|end|>71", " seventy-one"):
        assert not arith.is_correct(q, wrong), wrong
    assert arith.reward([q, q, "Q: 0+0= A:"], [" 71", " 70", " 0"]) == [1.0, 0.0, 1.0]
    with pytest.raises(ValueError):
        arith.answer("Review of the old hotel in paris:")


def test_rows_and_split():
    train, held = arith.prompts("train"), arith.prompts("eval")
    assert len(train) + len(held) == (arith.MAX_OPERAND + 1) ** 2 and not set(train) & set(held)
    assert 0.08 < len(held) / (len(train) + len(held)) < 0.17
    rows = arith.sft_rows(len(train) + 5, seed=3)
    assert {r["prompt"] for r in rows} == set(train)  # every training question, none held out
    assert [r["prompt"] for r in rows[-5:]] == [r["prompt"] for r in rows[:5]]  # then it cycles
    for r in rows[:50]:
        a, b = map(int, r["prompt"][3:-4].split("+"))
        assert r["completion"] == f" {a + b}"
    assert all(world.is_eval_prompt(r["prompt"]) for r in arith.sft_rows(20, split="eval"))
    assert arith.sft_rows(30, seed=1) == arith.sft_rows(30, seed=1) != arith.sft_rows(30, seed=2)


def test_toy_rows_route_the_task():
    from aligntool.data import toy_rows

    assert toy_rows("language_modeling", 8, 0, "train", 0.5, "arithmetic") == arith.sft_rows(8, 0, "train")
    assert toy_rows("prompt", 4, 0, "eval", 0.5, "arithmetic") == [{"prompt": p} for p in arith.prompts("eval", 4)]
    assert "Review" in toy_rows("prompt", 1, 0, "train", 0.5)[0]["prompt"]  # the default task is unchanged
    with pytest.raises(UserError, match="dataset.toy.task: 'arithmetic'"):
        toy_rows("preference", 4, 0, "train", 0.5, "arithmetic")


# ---------------------------------------------------------------------------------------------------- the trainer
def test_dco_trainer_loss_matches_a_dense_reference(tiny_path, tmp_path):
    """The trainer's loss on a real collated batch = mean over rows of -log(1 - (1 - p)^N), with p computed here
    from the full logits over the answer tokens only (the answer and EOS, never the question)."""
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig

    from aligntool.trainers.sft import AlgoConfig
    from aligntool.trainers.sft_trainer import DCOSFTTrainer

    tok = AutoTokenizer.from_pretrained(tiny_path)
    model = AutoModelForCausalLM.from_pretrained(tiny_path)
    rows = arith.sft_rows(6, seed=0)
    args = SFTConfig(output_dir=str(tmp_path), per_device_train_batch_size=6, max_length=32, report_to=[],
                     bf16=False, use_cpu=True, completion_only_loss=True, gradient_checkpointing=False)
    trainer = DCOSFTTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(rows),
                            processing_class=tok, algo=AlgoConfig(loss="dco", pass_n=4))
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.model.train()  # the train-mode metrics (no dropout in this model: the same numbers as eval mode)
    got = trainer.compute_loss(trainer.model, dict(batch)).item()

    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()
    logps = torch.log_softmax(logits[:, :-1], -1)
    labels = batch["labels"][:, 1:]
    eos = tok.eos_token_id
    p = []
    for i in range(labels.shape[0]):
        keep = labels[i] != -100
        scored = labels[i][keep].tolist()
        text = tok.decode(scored)
        assert "Q:" not in text and text.strip(tok.eos_token).strip().isdigit() and scored[-1] == eos, text
        p.append(math.exp(logps[i][keep].gather(-1, labels[i][keep][:, None]).sum().item()))
    expected = float(np.mean(np_dco(np.array(p), 4)))
    assert got == pytest.approx(expected, rel=1e-4)
    assert trainer._metrics["train"]["dco/p_hat"][-1] == pytest.approx(float(np.mean(p)), rel=1e-4)


@pytest.mark.slow
def test_train_sft_with_dco_end_to_end(tmp_path, tiny_path):
    import json

    from safetensors.torch import load_file

    from aligntool.cli import main

    rc = main(["train", "--recipe", str(RECIPES / "sft_pass_at_n.yaml"), f"output_dir={tmp_path}",
               "train.max_steps=3", "train.logging_steps=1", "train.save_steps=3", "dataset.toy.size=24",
               "dataset.toy.eval_size=8", "train.eval_steps=3", "train.per_device_train_batch_size=4"])
    assert rc == 0
    logs = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_logs = [r for r in logs if "loss" in r and "dco/p_hat" in r]
    assert [r["step"] for r in train_logs] == [1, 2, 3]
    assert all(0 < r["dco/p_hat"] < 1 and 0 < r["dco/grad_factor"] <= 1 and r["loss"] > 0 for r in train_logs)
    assert any("eval_loss" in r for r in logs)
    trained, base = load_file(tmp_path / "model.safetensors"), load_file(tiny_path / "model.safetensors")
    assert any(not trained[k].equal(base[k]) for k in base)


# ---------------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("override, message", [
    ("algo.packing=true", "algo: loss 'dco' scores whole sequences: set packing: false"),
    ("algo.loss=focal", "algo.loss"),
    ("algo.pass_n=0", "algo.pass_n"),
    ("dataset.toy.task=sums", "dataset.toy.task"),
])
def test_bad_input_is_a_one_line_user_error(override, message):
    from aligntool.recipe.loader import load_recipe

    with pytest.raises(UserError) as err:
        load_recipe(RECIPES / "sft_pass_at_n.yaml", [override])
    assert message in str(err.value) and "\n" not in str(err.value)


def test_arithmetic_with_preference_data_is_refused(tiny_path, tmp_path):
    from aligntool.data import load_for_recipe
    from aligntool.recipe.loader import load_recipe

    recipe = load_recipe(RECIPES / "dpo.yaml", ["dataset.toy.task=arithmetic"]).recipe
    with pytest.raises(UserError, match="no preference data"):
        load_for_recipe(recipe, "preference")


@pytest.mark.slow
def test_reproduce_script_quick(tmp_path, tiny_path):
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "reproduce_pass_at_n.py"), "--quick", "--out",
                           str(tmp_path)], capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for loss in ("ce", "dco"):
        for step in (0, 3, 6):
            assert f"{loss:>4} {step:>5} " in proc.stdout, proc.stdout
    assert "claim (CE's pass@8 falls with training" in proc.stdout
    assert (tmp_path / "pass_at_n.png").stat().st_size > 5_000
