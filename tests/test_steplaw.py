"""Step Law (Li et al. 2025, "Predictable Scale: Part I"): the formulas against the authors' values, N counted as the
authors count it, and `learning_rate: auto` / `per_device_train_batch_size: auto` in a real run."""

import json
import math

import pytest
import yaml
from conftest import user_error

from aligntool.cli import main
from aligntool.recipe import steplaw
from aligntool.recipe.loader import load_recipe
from aligntool.train import train

# the test vectors of the specification (computed in double precision from the paper's constants and from the means of
# the 1000 bootstrap fits in the authors' data/1004_fitted_lr_bs_scaling_model_parameters.csv)
VECTORS = [  # N, D, constants, lr, batch tokens
    (7e9, 1.4e12, "paper", 9.16557e-4, 4.99882e6),
    (7e9, 1.4e12, "tool", 9.34684e-4, 4.99696e6),
    (1e9, 1e11, "paper", 1.63250e-3, 1.10771e6),
    (1e9, 1e11, "tool", 1.66238e-3, None),
]

TINY_N = 4 * (4 * 128**2 + 3 * 128 * 384)  # the tiny model: 4 layers, hidden 128, SwiGLU 384, no embeddings: 851,968


@pytest.mark.parametrize("n,d,constants,lr,bs", VECTORS)
def test_formulas_match_the_authors_values(n, d, constants, lr, bs):
    s = steplaw.suggest(n, d, seq_len=2048, constants=constants)
    assert s.learning_rate == pytest.approx(lr, rel=1e-5)
    if bs is not None:
        assert s.batch_tokens == pytest.approx(bs, rel=1e-5)
    if (n, d, constants) == (7e9, 1.4e12, "paper"):
        assert s.batch_sequences == pytest.approx(2440.8, abs=0.05)


def test_non_embedding_count_is_the_authors():
    """The authors' data/dense_lr_bs_loss.csv row h=960, ffn=9368, 7 layers stores N = 214,663,680 =
    7 * (4 h^2 + 3 h ffn): attention and SwiGLU matrices, no embeddings, head or norms."""
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=960, intermediate_size=9368, num_hidden_layers=7, num_attention_heads=15,
                         num_key_value_heads=15, vocab_size=32000, tie_word_embeddings=False)
    assert steplaw.non_embedding_params(config) == 7 * (4 * 960**2 + 3 * 960 * 9368) == 214_663_680


def test_fixed_point_when_the_batch_follows_the_law():
    d = steplaw.tokens_for_steps(250)
    assert d / steplaw.batch_tokens(d) == pytest.approx(250)  # D = S * B_opt(D)
    assert d == pytest.approx((250 * math.exp(-0.5435422)) ** (1 / (1 - 0.5709444)))


def test_suggest_prints_the_law(capsys):
    assert main(["suggest", "--params", "7e9", "--tokens", "1.4e12", "--seq-len", "2048", "--constants", "paper"]) == 0
    out = capsys.readouterr().out
    assert "peak learning rate: 0.0009166" in out and "4,998,815 tokens = 2,440.8 sequences" in out
    assert "extrapolation" in out


def test_suggest_from_a_recipe_counts_the_tiny_model_and_its_tokens(capsys, tiny_path):
    assert main(["suggest", "--recipe", "dpo", "train.max_steps=10", "train.per_device_train_batch_size=4"]) == 0
    out = capsys.readouterr().out
    n = TINY_N
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(tiny_path)
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size) == (4, 128, 384)
    assert cfg.num_key_value_heads == cfg.num_attention_heads  # multi-head attention: 4 h^2 per layer
    assert f"N (non-embedding parameters): {n:,}" in out
    d = float(out.split("D (training tokens): ")[1].split("\n")[0].replace(",", ""))
    lr = float(out.split("peak learning rate: ")[1].split("\n")[0])
    assert lr == pytest.approx(1.79734 * n**-0.7129223 * d**0.307491, rel=1e-3)
    # D = 10 steps x 4 rows x the mean tokens of a row (prompt + chosen + rejected: tens of tokens)
    assert 10 * 4 * 20 < d < 10 * 4 * 120


@pytest.mark.slow
def test_auto_values_are_used_logged_and_written(tmp_path, tiny_path, capsys):
    out = tmp_path / "run"
    train(load_recipe("sft", ["train.max_steps=3", "train.learning_rate=auto", "train.per_device_train_batch_size=auto",
                              "dataset.toy.size=32", "train.save_steps=100", f"output_dir={out}"]))
    written = yaml.safe_load((out / "recipe.yaml").read_text())["train"]
    d = steplaw.tokens_for_steps(3)
    n = TINY_N
    assert written["learning_rate"] == pytest.approx(1.79734 * n**-0.7129223 * d**0.307491, rel=1e-3)
    assert isinstance(written["per_device_train_batch_size"], int) and written["per_device_train_batch_size"] >= 1
    logged = capsys.readouterr()
    assert "Step Law (tool constants)" in logged.out + logged.err
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert max(r.get("learning_rate", 0) for r in rows) <= written["learning_rate"] * (1 + 1e-6)


def test_bad_input(tmp_path, capsys, recipe_file):
    assert main(["suggest"]) == 2
    assert "--params" in capsys.readouterr().err
    assert main(["suggest", "--params", "-5", "--tokens", "1e9"]) == 2
    assert main(["suggest", "--params", "1e9", "--tokens", "1e9", "--constants", "mine"]) == 2
    # a pipeline method trains on rows it generates: D is unknown before the run
    assert main(["train", "--recipe", "rso", "train.learning_rate=auto", f"output_dir={tmp_path}/rso"]) == 2
    assert "rso trains on rows it generates" in capsys.readouterr().err
    assert "learning_rate" in user_error(load_recipe, "dpo", ["train.learning_rate=fast"])
    # a model whose N cannot be counted: a config no causal LM can be built from
    bad = tmp_path / "not_a_lm"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"model_type": "no_such_architecture"}))
    from aligntool.registry import get

    class Loaded:
        recipe = load_recipe("dpo", ["train.learning_rate=auto"]).recipe
        spec, source, algo = get("dpo"), "r.yaml", None

    message = user_error(steplaw.for_run, Loaded, str(bad), None, [{"prompt": "x"}])
    assert message.startswith("r.yaml: train.learning_rate: auto: cannot count the non-embedding parameters")


def test_online_methods_count_the_engine_iterations(capsys, tiny_path):
    """The rollout engine runs train.max_steps iterations (100 when unset) of one batch, without accumulation: D is
    the same with max_steps unset as with 100, and gradient_accumulation_steps does not multiply it."""
    ds = []
    for extra in (["train.max_steps=null"], ["train.max_steps=100"], ["train.max_steps=100",
                                                                       "train.gradient_accumulation_steps=4"]):
        assert main(["suggest", "--recipe", "ppo", "train.per_device_train_batch_size=8", *extra]) == 0
        out = capsys.readouterr().out
        ds.append(float(out.split("D (training tokens): ")[1].split("\n")[0].replace(",", "")))
    assert ds[0] == ds[1] == ds[2] > 0
