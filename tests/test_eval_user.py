"""`aligntool eval` on the user's data (issue 28, item 2): generations on the user's prompts scored by the reward
source (reward functions with the dataset's columns), win rate / KL / paired gain against a reference; a reward
model's pairwise accuracy on real HH-RLHF pairs; NLL and perplexity on SFT rows; what each result names as its data;
the bad input. Expected values are computed here with transformers and numpy, not by the code under test."""

import json
import math

import numpy as np
import pytest
import torch
from conftest import REPO, cli_error

from aligntool.cli import main

HH = REPO / "tests" / "data" / "hh-rlhf" / "harmless-base-test-50.jsonl"
GSM = REPO / "tests" / "data" / "gsm8k" / "test-200.jsonl"

REWARD_MODULE = '''
import json, os

def final_answer(prompts, completions, answer, **kwargs):
    """GSM8K's final number (after ####) of each row's answer column: the column must reach us, row-aligned."""
    return [float(a.split("####")[-1].strip().replace(",", "")) for a in answer]

def recorded_length(prompts, completions):
    """Length of each completion in 15-character units (coarse: ties happen); every call goes to $EVAL_RECORD."""
    scores = [float(len(c) // 15) for c in completions]
    with open(os.environ["EVAL_RECORD"], "a") as fh:
        fh.write(json.dumps({"prompts": prompts, "completions": completions, "scores": scores}) + "\\n")
    return scores
'''


def run_json(capsys, args) -> dict:
    code = main(["eval", *args, "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err[-3000:]
    return json.loads(captured.out)


def expect_error(capsys, args, *needles) -> str:
    return cli_error(capsys, ["eval", *args], *needles)


def mean_se(values):
    v = np.asarray(values, dtype=float)
    return v.mean(), v.std(ddof=1) / math.sqrt(len(v))


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory, tiny_path):
    """A reward model (tiny's body with a seeded random one-output head) and a perturbed copy of tiny (a reference
    that differs from it), both saved as model folders."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    root = tmp_path_factory.mktemp("eval_models")
    tok = AutoTokenizer.from_pretrained(tiny_path)
    torch.manual_seed(0)
    rm = AutoModelForSequenceClassification.from_pretrained(tiny_path, num_labels=1)
    rm.config.pad_token_id = tok.pad_token_id
    rm.save_pretrained(root / "rm")
    tok.save_pretrained(root / "rm")
    lm = AutoModelForCausalLM.from_pretrained(tiny_path)
    with torch.no_grad():
        for p in lm.parameters():
            p.add_(0.02 * torch.randn_like(p))
    lm.save_pretrained(root / "ref")
    tok.save_pretrained(root / "ref")
    (root / "evalrewards.py").write_text(REWARD_MODULE)
    return root


def gsm_rows(n):
    return [json.loads(line) for line in GSM.read_text().splitlines()[:n]]


# ---------------------------------------------------------------------------------------------------- (a) generation
def test_recipe_reward_function_gets_the_columns_on_the_eval_file(capsys, tmp_path, models_dir, monkeypatch):
    """--recipe: its reward.function scores generations on its dataset.eval_path (not path), the GSM8K `answer`
    column reaching the function row by row; a duplicated prompt counts once, with its first row's columns."""
    rows = gsm_rows(7)
    eval_rows = [{"prompt": r["question"], "answer": r["answer"]} for r in rows]
    eval_rows.insert(3, {"prompt": rows[0]["question"], "answer": "#### 1000000"})  # a duplicate: its first row wins
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in eval_rows))
    (tmp_path / "train.jsonl").write_text(json.dumps({"prompt": "never read", "answer": "#### 5"}) + "\n")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("algorithm: grpo\nmodel: {name_or_path: tiny}\n"
                      "dataset: {path: train.jsonl, eval_path: eval.jsonl}\n"
                      "reward: {function: evalrewards:final_answer}\n")
    monkeypatch.syspath_prepend(str(models_dir))
    r = run_json(capsys, ["--model", "tiny", "--recipe", str(recipe), "--max-new-tokens", "4", "--num-prompts", "6"])
    expected = [float(row["answer"].split("####")[-1].replace(",", "")) for row in rows[:6]]
    assert r["mode"] == "generation" and r["num_prompts"] == 6
    assert (r["reward"], r["reward_stderr"]) == pytest.approx(mean_se(expected))
    assert r["data"]["rows"] == 8 and r["data"]["source"] == f"{tmp_path / 'eval.jsonl'} split train"
    assert r["reward_source"] == "evalrewards:final_answer"


def test_recipe_eval_sets_are_the_rows_training_held_out(capsys, tmp_path, monkeypatch):
    """--recipe without a held-out file: the rows its dataset.eval_fraction held out (not all the training rows);
    with eval_path a folder of train and test files and eval_split left at 'test': the test file (a folder or hub id
    has its own splits: never the split the model trained on). Perplexity mode (no reward source): cheap."""
    import datasets

    rows = [{"prompt": f"Review {i}:", "completion": f" nice {i} ."} for i in range(20)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("algorithm: sft\nmodel: {name_or_path: tiny}\n"
                      "dataset: {path: train.jsonl, eval_fraction: 0.25, toy: {seed: 3}}\n")
    r = run_json(capsys, ["--model", "tiny", "--recipe", str(recipe)])
    held = datasets.Dataset.from_list(rows).train_test_split(test_size=5, seed=3, shuffle=True)["test"]
    assert r["num_rows"] == 5 == r["data"]["rows"] and "held out for evaluation" in r["data"]["source"]
    # the same figures as --data on a file of exactly those rows (datasets' own seeded split, computed here)
    (tmp_path / "held.jsonl").write_text("".join(json.dumps(x) + "\n" for x in held))
    direct = run_json(capsys, ["--model", "tiny", "--data", str(tmp_path / "held.jsonl")])
    assert (r["num_tokens"], r["nll_per_token"]) == (direct["num_tokens"], pytest.approx(direct["nll_per_token"]))
    folder = tmp_path / "splits"
    folder.mkdir()
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:3]))
    recipe.write_text("algorithm: sft\nmodel: {name_or_path: tiny}\ndataset: {path: splits, eval_path: splits}\n")
    r = run_json(capsys, ["--model", "tiny", "--recipe", str(recipe)])
    assert r["data"]["split"] == "test" and r["num_rows"] == 3


def test_reference_win_rate_kl_and_paired_gain(capsys, tmp_path, models_dir, monkeypatch):
    """--data prompts + --reward-fn + --reference, greedy: the win rate (ties 1/2) and paired gain from the scores the
    function returned for each side, and the KL estimate from our own forward passes of both models."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from aligntool.toy import world

    prompts = world.prompts("eval", 6, seed=3)
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    record = tmp_path / "record.jsonl"
    monkeypatch.setenv("EVAL_RECORD", str(record))
    monkeypatch.syspath_prepend(str(models_dir))
    r = run_json(capsys, ["--model", "tiny", "--reference", str(models_dir / "ref"), "--data", str(data),
                          "--reward-fn", "evalrewards:recorded_length", "--temperature", "0",
                          "--max-new-tokens", "12"])
    calls = [json.loads(line) for line in record.read_text().splitlines()]
    assert len(calls) == 2 and calls[0]["prompts"] == prompts == calls[1]["prompts"]
    mine, ref = calls[0]["scores"], calls[1]["scores"]
    wins = [1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(mine, ref)]
    assert 0.5 in wins and len(set(wins)) > 1, (mine, ref)  # ties and decided pairs both occur
    d = np.subtract(mine, ref)
    assert r["win_rate"] == pytest.approx(np.mean(wins))
    assert (r["reward"], r["reward_stderr"]) == pytest.approx(mean_se(mine))
    assert (r["reference_reward"], r["reference_reward_stderr"]) == pytest.approx(mean_se(ref))
    assert r["reward_gain"] == pytest.approx(d.mean())
    assert r["gain_in_stderrs"] == pytest.approx(d.mean() / (d.std(ddof=1) / math.sqrt(len(d))))
    # KL: our own greedy decoding of each prompt with tiny, scored by both models
    tok = AutoTokenizer.from_pretrained(models_dir / "rm")
    from aligntool.models import resolve

    policy = AutoModelForCausalLM.from_pretrained(resolve("tiny", log=lambda m: None)).eval()
    ref_model = AutoModelForCausalLM.from_pretrained(models_dir / "ref").eval()
    kls = []
    for prompt in prompts:
        ids = torch.tensor([tok(prompt)["input_ids"]])
        with torch.no_grad():
            out = policy.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=tok.eos_token_id,
                                  pad_token_id=tok.pad_token_id)
            n = ids.shape[1]
            lp = [torch.log_softmax(m(out).logits[0, n - 1 : -1], -1).gather(-1, out[0, n:, None]).sum().item()
                  for m in (policy, ref_model)]
        kls.append(lp[0] - lp[1])
    assert (r["kl_to_reference"], r["kl_to_reference_stderr"]) == pytest.approx(mean_se(kls), rel=1e-3, abs=1e-4)


def test_hh_pairs_give_their_implicit_prompts(capsys, tmp_path, models_dir):
    """Preference pairs as prompts: HH-RLHF's whole-dialogue pairs, each prompt the dialogue up to the last
    Assistant turn, scored by a reward model (--reward-model); the long dialogues keep their end (a note)."""
    r = run_json(capsys, ["--model", "tiny", "--data", str(HH), "--reward-model", str(models_dir / "rm"),
                          "--data-opt", "max_samples=20", "--num-prompts", "5", "--max-new-tokens", "4"])
    rows = [json.loads(line) for line in HH.read_text().splitlines()]
    first = rows[0]["chosen"]
    assert r["samples"][0]["prompt"] == first[: first.rfind("\n\nAssistant:") + len("\n\nAssistant:")]
    assert r["num_prompts"] == 5 and r["data"]["rows"] == 20 and "reward" in r  # max_samples=20 of the 50 rows
    assert r["reward_source"] == str(models_dir / "rm")


# ---------------------------------------------------------------------------------------------------- (b) pairs
def test_reward_model_pairwise_accuracy_on_hh_pairs(capsys, models_dir):
    """Pairwise accuracy and margin on 12 real HH-RLHF pairs: each whole dialogue scored by our own forward pass
    (its last 256 tokens: the tiny model's context)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    r = run_json(capsys, ["--model", str(models_dir / "rm"), "--data", str(HH), "--split", "train[:12]"])
    tok = AutoTokenizer.from_pretrained(models_dir / "rm")
    rm = AutoModelForSequenceClassification.from_pretrained(models_dir / "rm").eval()
    rows = [json.loads(line) for line in HH.read_text().splitlines()[:12]]

    def score(text):
        with torch.no_grad():
            return rm(torch.tensor([tok(text)["input_ids"][-256:]])).logits[0, 0].item()

    margins = [score(row["chosen"]) - score(row["rejected"]) for row in rows]
    assert (r["pairwise_accuracy"], r["pairwise_accuracy_stderr"]) == pytest.approx(
        mean_se([float(m > 0) for m in margins]))
    assert (r["mean_margin"], r["mean_margin_stderr"]) == pytest.approx(mean_se(margins), rel=1e-4, abs=1e-6)
    assert r["kind"] == "reward_model" and r["num_pairs"] == 12
    assert r["data"]["source"] == f"{HH} split train[:12]" and r["data"]["rows"] == 12
    assert "exceed the model's 256 positions" in r["note"]


def test_conversational_pairs_explicit_or_implicit_prompt(capsys, tmp_path, models_dir):
    """Conversational pairs, with a prompt column or the prompt inside both conversations (TRL's split): each side
    is the whole conversation through the chat template, scored by our own forward pass."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    replies = [(" the show was great .", " the show was awful ."), (" i liked it .", " the food was cold .")]
    user = [{"role": "user", "content": "Review of the show:"}]
    explicit = [{"prompt": user, "chosen": [{"role": "assistant", "content": c}],
                 "rejected": [{"role": "assistant", "content": r}]} for c, r in replies]
    implicit = [{"chosen": user + row["chosen"], "rejected": user + row["rejected"]} for row in explicit]
    results = []
    for name, rows in (("explicit", explicit), ("implicit", implicit)):
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        results.append(run_json(capsys, ["--model", str(models_dir / "rm"), "--data", str(path)]))
    tok = AutoTokenizer.from_pretrained(models_dir / "rm")
    rm = AutoModelForSequenceClassification.from_pretrained(models_dir / "rm").eval()

    def score(messages):
        text = tok.apply_chat_template(messages, tokenize=False)
        with torch.no_grad():
            return rm(torch.tensor([tok(text)["input_ids"]])).logits[0, 0].item()

    margins = [score(row["chosen"]) - score(row["rejected"]) for row in implicit]
    for r in results:
        assert r["mean_margin"] == pytest.approx(np.mean(margins), rel=1e-4, abs=1e-6)
        assert r["pairwise_accuracy"] == np.mean([m > 0 for m in margins])


def test_toy_results_say_they_are_toy(capsys, models_dir):
    r = run_json(capsys, ["--model", str(models_dir / "rm"), "--num-prompts", "8"])
    assert r["data"]["source"].startswith("toy world preference pairs") and r["data"]["rows"] == 8
    r = run_json(capsys, ["--model", "tiny", "--num-prompts", "4", "--max-new-tokens", "4", "--seed", "5"])
    assert r["data"] == {"source": "toy world (held-out prompts, seed 5)", "rows": 4}
    assert main(["eval", "--model", "tiny", "--num-prompts", "4", "--max-new-tokens", "4"]) == 0
    assert "data: toy world (held-out prompts, seed 0) (4 rows)" in " ".join(capsys.readouterr().out.split())


# ---------------------------------------------------------------------------------------------------- (c) likelihood
def test_nll_and_perplexity_on_prompt_completion_and_text(capsys, tmp_path, models_dir):
    """Completion-only NLL per token of GSM8K rows (prompt/completion) and whole-text NLL, against transformers' own
    loss with -100 labels; with --reference, the paired difference."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from aligntool.models import resolve

    rows = [{"prompt": f"Q: {r['question'][:80]}\nA:", "completion": " " + r["answer"][-60:]} for r in gsm_rows(5)]
    pc = tmp_path / "pc.jsonl"
    pc.write_text("".join(json.dumps(r) + "\n" for r in rows))
    text = tmp_path / "text.jsonl"
    text.write_text("".join(json.dumps({"text": r["prompt"] + r["completion"]}) + "\n" for r in rows))
    tok = AutoTokenizer.from_pretrained(models_dir / "rm")
    models = {name: AutoModelForCausalLM.from_pretrained(path).eval()
              for name, path in (("tiny", resolve("tiny", log=lambda m: None)), ("ref", models_dir / "ref"))}

    def summed_nll(model, ids, n_prompt):
        labels = torch.tensor([[-100] * n_prompt + ids[n_prompt:]])
        with torch.no_grad():
            loss = model(torch.tensor([ids]), labels=labels).loss.item()
        return loss * (len(ids) - max(n_prompt, 1)), len(ids) - max(n_prompt, 1)

    r = run_json(capsys, ["--model", "tiny", "--data", str(pc), "--reference", str(models_dir / "ref")])
    sums = {name: [] for name in models}
    counts = []
    for row in rows:
        ids = tok(row["prompt"] + row["completion"])["input_ids"] + [tok.eos_token_id]
        n_prompt = len(tok(row["prompt"])["input_ids"])
        for name, m in models.items():
            s, n = summed_nll(m, ids, n_prompt)
            sums[name].append(s)
        counts.append(n)
    nll = sum(sums["tiny"]) / sum(counts)
    assert r["tokens_scored"].startswith("completion tokens only") and r["num_tokens"] == sum(counts)
    assert r["nll_per_token"] == pytest.approx(nll, rel=1e-4)
    assert r["perplexity"] == pytest.approx(math.exp(nll), rel=1e-4)
    assert r["nll_difference"] == pytest.approx(nll - sum(sums["ref"]) / sum(counts), rel=1e-3, abs=1e-5)
    r = run_json(capsys, ["--model", "tiny", "--data", str(text)])
    totals = [summed_nll(models["tiny"], tok(row["prompt"] + row["completion"])["input_ids"], 0) for row in rows]
    assert r["tokens_scored"].startswith("all tokens")
    assert r["nll_per_token"] == pytest.approx(sum(s for s, _ in totals) / sum(n for _, n in totals), rel=1e-4)


def test_messages_score_the_assistant_turns_only(capsys, tmp_path):
    rows = [{"messages": [{"role": "user", "content": f"Review of the show in lima number {i}:"},
                          {"role": "assistant", "content": " the show was great ."}]} for i in range(3)]
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    r = run_json(capsys, ["--model", "tiny", "--data", str(data), "--out", str(tmp_path / "res.json")])
    assert r["tokens_scored"].startswith("assistant turns only")
    from aligntool.models import load_tokenizer, resolve

    tok = load_tokenizer(resolve("tiny", log=lambda m: None))
    reply = tok(rows[0]["messages"][1]["content"], add_special_tokens=False)["input_ids"]
    assert r["num_tokens"] == 3 * (len(reply) + 1)  # each reply's tokens and its end-of-turn token
    assert json.loads((tmp_path / "res.json").read_text()) == r
    expect_error(capsys, ["--model", "tiny", "--data", str(data), "--out", str(tmp_path / "res.json")],
                 "--out:", "already exists", "--overwrite")


# ---------------------------------------------------------------------------------------------------- bad input
def test_bad_input(capsys, tmp_path, models_dir, monkeypatch):
    monkeypatch.syspath_prepend(str(models_dir))  # evalrewards.py: the test must not rely on another having run first
    sft = tmp_path / "sft.jsonl"
    sft.write_text(json.dumps({"text": "a review"}) + "\n")
    gsm = tmp_path / "gsm.jsonl"
    gsm.write_text("".join(json.dumps(r) + "\n" for r in gsm_rows(2)))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "Review of the show:"}) + "\n")
    expect_error(capsys, ["--model", str(models_dir / "rm"), "--data", str(sft)],
                 "reward model", "preference pairs", "found the columns: text")
    expect_error(capsys, ["--model", "tiny", "--data", str(gsm)], "SFT rows", "found the columns: question, answer")
    expect_error(capsys, ["--model", "tiny", "--data", str(prompts)], "SFT rows", "reward source",
                 "found the columns: prompt")
    expect_error(capsys, ["--model", "tiny", "--data", str(sft), "--reward-fn", "evalrewards:recorded_length"],
                 "generation needs prompts")
    expect_error(capsys, ["--model", "tiny", "--reward-model", str(models_dir / "rm")], "--reward-model:", "--data")
    expect_error(capsys, ["--model", "tiny", "--tasks", "x.yaml", "--data", str(sft)], "--tasks:", "--data")
    expect_error(capsys, ["--model", "tiny", "--limit", "3"], "--limit: applies to lm-eval tasks")
    expect_error(capsys, ["--model", str(models_dir / "rm"), "--data", str(HH), "--reward-fn", "m:f"],
                 "--reward-fn:", "reward model")
    expect_error(capsys, ["--model", "tiny", "--data", str(sft), "--data-opt", "max_samples=-1"],
                 "--data-opt max_samples")
    expect_error(capsys, ["--model", "tiny", "--data", str(sft), "--task", "arithmetic"], "--task arithmetic")
