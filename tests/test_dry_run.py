"""``aligntool train --dry-run`` (issue 29 item 3): every example of examples/ resolves offline, with nothing written,
its parameter count equal to the model's published count, and a memory verdict; ``--json`` gives the plan whole;
bad input (a config that cannot be found, a plan that does not fit, a bad memory size) is one line and exit 2; README's
table of examples is current; ``aligntool slurm`` takes its defaults from ``hardware:``."""

from __future__ import annotations

import json
import re
import socket
import sys
from pathlib import Path

import pytest
from conftest import REPO, cli_error

from aligntool.cli import main

EXAMPLES = sorted((REPO / "examples").glob("*.yaml"))
DPO = REPO / "examples" / "dpo_qwen2.5-1.5b_ultrafeedback.yaml"
GRPO = REPO / "examples" / "grpo_qwen2.5-1.5b-instruct_gsm8k.yaml"
PPO = REPO / "examples" / "ppo_qwen2.5-7b-instruct_gsm8k_2nodes.yaml"

# the published parameter counts (total; non-embedding where the model card gives it), from the model cards on the
# Hugging Face hub: Qwen2.5 "Number of Parameters: 0.49B / 1.54B / 7.61B, (Non-Embedding): 0.36B / 1.31B / 6.53B",
# Qwen3-0.6B "Number of Parameters: 0.6B, (Non-Embedding): 0.44B", Meta-Llama-3-8B-Instruct "8.03B params" (the hub's
# safetensors count; the card says 8B)
PUBLISHED = {
    "Qwen/Qwen2.5-0.5B": (0.49e9, 0.36e9),
    "Qwen/Qwen2.5-1.5B-Instruct": (1.54e9, 1.31e9),
    "Qwen/Qwen2.5-7B-Instruct": (7.61e9, 6.53e9),
    "Qwen/Qwen3-0.6B": (0.6e9, 0.44e9),
    "meta-llama/Meta-Llama-3-8B-Instruct": (8.03e9, None),
}


def _refuse_network(monkeypatch) -> list:
    """Every name lookup and socket connection refused (OSError, as without a network) and recorded."""
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network refused by the test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)  # a name looked up is a connection tried
    return attempts


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """No network (HF_HUB_OFFLINE=1; every socket connection is refused and recorded, and fails the test even where
    a library catches the refusal), and a working directory that must stay empty: the examples' relative output_dir
    would be created there."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    attempts = _refuse_network(monkeypatch)
    monkeypatch.chdir(tmp_path)
    yield tmp_path
    assert attempts == [], "the dry run tried the network"
    assert list(tmp_path.iterdir()) == [], "the dry run wrote into the working directory"


def _model(example: Path) -> str:
    from aligntool.recipe.loader import load_recipe

    return load_recipe(example).recipe.model.name_or_path


def test_every_example_has_a_published_count():
    assert len(EXAMPLES) >= 5
    assert {_model(e) for e in EXAMPLES} <= set(PUBLISHED)


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.stem)
def test_example_dry_runs(example, offline, capsys):
    """Resolved offline, nothing written; the count of parameters built on the meta device is the published one (1%);
    the plan fits the example's own hardware: (the examples are written to fit)."""
    assert main(["train", "--recipe", str(example), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^fits: \d+\.\d of \d+ GiB per GPU$", out, re.M), out
    total, non_embedding = (int(n.replace(",", "")) for n in
                            re.search(r"; ([\d,]+) parameters, ([\d,]+) non-embedding\)", out).groups())
    published, published_n = PUBLISHED[_model(example)]
    assert abs(total - published) / published < 0.01, (total, published)
    if published_n:
        assert abs(non_embedding - published_n) / published_n < 0.01, (non_embedding, published_n)
    # the header names where the architecture came from: the config shipped beside the example
    assert "examples/configs/" in out


def test_json_is_the_plan(offline, capsys):
    """--json prints one JSON object: its total is the sum of its components, the world is the flags' (over
    hardware:), and the verdict agrees with total vs gpu_memory."""
    assert main(["train", "--recipe", str(GRPO), "--dry-run", "--json", "--nproc", "2"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["total"] == sum(c["bytes"] for c in plan["components"] if c.get("counted", True))
    assert plan["dry_run"]["world_size"] == 2 and plan["gpu_memory"] == 80 * 2**30
    assert plan["fits"] == (plan["total"] <= plan["gpu_memory"])
    assert plan["dry_run"]["params"] == 1_543_714_304  # 28 layers of Qwen2.5-1.5B + the tied embedding, by hand
    assert main(["train", "--recipe", str(PPO), "--dry-run", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["dry_run"]["world_size"] == 16  # hardware: 2 nodes x 8
    assert main(["train", "--recipe", str(PPO), "--dry-run", "--json", "--nproc", "4"]) in (0, 2)
    assert json.loads(capsys.readouterr().out)["dry_run"]["world_size"] == 8  # --nproc 4 x hardware's 2 nodes


def test_param_count_by_hand():
    """Qwen2.5-1.5B from its shapes: per layer q/k/v (with bias) and o, the MLP, two norms; the tied embedding once;
    the final norm."""
    h, inter, layers, vocab, kv = 1536, 8960, 28, 151936, 2 * 128
    per_layer = (h * h + h) + 2 * (h * kv + kv) + h * h + 3 * h * inter + 2 * h
    from transformers import AutoConfig

    from aligntool.plan.dryrun import count_parameters

    total, n = count_parameters(AutoConfig.from_pretrained(REPO / "examples/configs/Qwen2.5-1.5B-Instruct"))
    assert total == layers * per_layer + vocab * h + h
    assert n == layers * (2 * h * h + 2 * h * kv + 3 * h * inter)


def test_no_memory_no_verdict(offline, capsys):
    assert main(["train", "--recipe", str(DPO), "--dry-run", "hardware=null"]) == 0
    assert re.search(r"^planned: \d+\.\d GiB per GPU \(no verdict", capsys.readouterr().out, re.M)


def test_does_not_fit(offline, capsys):
    """A plan over the GPU's memory: the plan on stdout, then one line naming the largest components and what would
    fit, exit 2."""
    assert main(["train", "--recipe", str(DPO), "--dry-run", "--json", "--gpu-memory", "80GB"]) == 0
    parts = [c for c in json.loads(capsys.readouterr().out)["components"] if c.get("counted", True)]
    largest = max(parts, key=lambda c: c["bytes"])["name"]
    line = cli_error(capsys, ["train", "--recipe", str(DPO), "--dry-run", "--gpu-memory", "4GB"],
                     "does not fit", "GiB > 4 GiB per GPU", f"largest: {largest} ")
    assert "would fit with: " in line or "no setting aligntool knows makes it fit" in line


@pytest.mark.parametrize("argv, needles", [
    (["model.config=null", "model.name_or_path=nobody/no-such-model"], ["model.config", "nobody/no-such-model",
                                                                        "downloads nothing"]),
    (["model.config=configs/no-such-folder"], ["model.config", "configs/no-such-folder", "no config.json"]),
    (["--gpu-memory", "80 parsecs"], ["--gpu-memory", "80GB", "'80 parsecs'"]),
    (["hardware.gpu_memory=80XB"], ["hardware.gpu_memory", "80GB"]),
    (["hardware.gpus_per_node=0"], ["hardware.gpus_per_node"]),
])
def test_bad_input(argv, needles, offline, capsys):
    cli_error(capsys, ["train", "--recipe", str(DPO), "--dry-run", *argv], *needles)


def test_config_lookup_never_reaches_the_hub(monkeypatch, capsys):
    """Without HF_HUB_OFFLINE, a hub id that is not in the cache is looked up in the cache only (local_files_only):
    no name lookup, no connection, one line naming model.config."""
    _model(DPO)  # the recipe loader's imports first: bitsandbytes asks the hub about its kernels when imported
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    attempts = _refuse_network(monkeypatch)
    cli_error(capsys, ["train", "--recipe", str(DPO), "--dry-run", "model.config=null",
                       "model.name_or_path=nobody/no-such-model"], "model.config")
    assert attempts == []


def test_dry_run_flags_need_dry_run(capsys):
    cli_error(capsys, ["train", "--recipe", "dpo", "--gpu-memory", "80GB"], "--gpu-memory", "only with --dry-run")
    cli_error(capsys, ["train", "--recipe", "dpo", "--json"], "--json", "only with --dry-run")


def test_slurm_defaults_from_hardware(tmp_path, capsys):
    out = tmp_path / "ppo.sbatch"
    assert main(["slurm", "--recipe", str(PPO), "--time", "1:00:00", "--out", str(out),
                 f"output_dir={tmp_path / 'run'}"]) in (0, None)
    script = out.read_text()
    assert "#SBATCH --nodes=2" in script and "#SBATCH --gpus-per-node=8" in script and "--nproc 8" in script
    assert main(["slurm", "--recipe", str(PPO), "--time", "1:00:00", "--out", str(out), "--nodes", "1",
                 f"output_dir={tmp_path / 'run'}"]) in (0, None)
    assert "#SBATCH --nodes=1" in out.read_text()


def test_readme_table_is_current():
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import examples_table
    finally:
        sys.path.remove(str(REPO / "scripts"))
    text = (REPO / "README.md").read_text()
    assert examples_table.replaced(text, examples_table.table()) == text, \
        "README's examples table is not current: run python3 scripts/examples_table.py"


def test_gsm8k_reward_on_the_published_solutions():
    """examples/rewards/gsm8k.py on GSM8K's own test rows (tests/data): each worked solution, as a completion, earns 1
    against its own answer and 0 against the next row's (a different number), through the recipe's reward loader."""
    from aligntool import rewards
    from aligntool.data.published import gsm8k_final_answer
    from aligntool.recipe.loader import load_recipe

    rows = [json.loads(line) for line in (REPO / "tests/data/gsm8k/test-200.jsonl").read_text().splitlines()]
    answers = [gsm8k_final_answer(r["answer"]) for r in rows]
    score = rewards.load(load_recipe(GRPO).recipe.reward)
    completions = [r["answer"] for r in rows]
    assert score([r["question"] for r in rows], completions, answer=answers) == [1.0] * len(rows)
    shifted = answers[1:] + answers[:1]
    differ = [a != b for a, b in zip(answers, shifted)]
    got = score([r["question"] for r in rows], completions, answer=shifted)
    assert [g for g, d in zip(got, differ) if d] == [0.0] * sum(differ)
    assert score(["q"] * 3, ["so it is \\boxed{1,000}", "I get 12, then 13.", "no idea"], answer=["1000", "13", "5"]) \
        == [1.0, 1.0, 0.0]


def test_reward_model_folder_is_planned(offline, capsys):
    """A reward model named by reward.source (a folder): its config.json reaches the plan (a frozen bf16 copy of a
    0.6 B model, about 1.2 GB on each GPU); a folder without one is one line naming reward.source."""
    folder = offline / "rm"
    folder.mkdir()
    (folder / "config.json").write_text((REPO / "examples/configs/Qwen3-0.6B/config.json").read_text())
    argv = ["train", "--recipe", str(PPO), "--dry-run", "--json", "reward.function=null"]
    assert main(argv) == 0
    assert not [c for c in json.loads(capsys.readouterr().out)["components"] if c["name"].startswith("reward")]
    assert main([*argv, f"reward.source={folder}"]) == 0
    reward = [c for c in json.loads(capsys.readouterr().out)["components"] if c["name"].startswith("reward")]
    assert len(reward) == 1 and abs(reward[0]["bytes"] - 2 * 596_049_920) / (2 * 596_049_920) < 0.01
    cli_error(capsys, [*argv, f"reward.source={offline / 'no-rm'}"], "reward.source", "no-rm")
    for path in sorted(offline.rglob("*"), reverse=True):  # the folder this test made (the fixture wants it empty)
        path.unlink() if path.is_file() else path.rmdir()
