"""scripts/benchlib.py's distance-to-the-hardware figures: model FLOPs per token counted from the model against a
hand count, the forward token counters, and the measured matmul peak."""

import math

import pytest
import torch
from conftest import REPO


@pytest.fixture
def benchlib(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "scripts"))
    import benchlib

    return benchlib


def llama(tied: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=300, tie_word_embeddings=tied)
    with torch.device("meta"):
        return LlamaForCausalLM(cfg)


@pytest.mark.parametrize("tied", [True, False])
def test_matmul_params_is_a_hand_count_of_the_matmul_weights(benchlib, tied):
    h, f, layers, vocab, kv = 64, 160, 3, 300, 2 * 16  # head size 64 / 4 = 16, 2 KV heads
    attention = h * h + 2 * h * kv + h * h  # q, k, v, o
    per_layer = attention + 3 * h * f + 2 * h  # the MLP's gate, up, down; two RMSNorms
    body = layers * per_layer + h  # the final norm
    assert benchlib.matmul_params(llama(tied)) == body + vocab * h  # the head once, the embedding lookup not


def test_training_flops_are_6n_with_grad_and_2n_without(benchlib):
    assert benchlib.training_flops(1000, {"with_grad": 7, "no_grad": 5}) == 6 * 1000 * 7 + 2 * 1000 * 5


def test_forward_tokens_are_counted_by_the_attention_mask_and_grad_mode(benchlib, monkeypatch):
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaModel

    monkeypatch.setattr(LlamaModel, "forward", LlamaModel.forward)  # restored after the test
    counts = benchlib.count_forward_tokens(LlamaModel)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2, vocab_size=50))
    ids, mask = torch.ones(2, 3, dtype=torch.long), torch.tensor([[0, 1, 1], [1, 1, 1]])
    model(input_ids=ids, attention_mask=mask).logits.sum().backward()
    with torch.no_grad():
        model(input_ids=ids)
    assert counts == {"with_grad": 5, "no_grad": 6}
    model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False, eos_token_id=None,
                   pad_token_id=0)  # the prompts' 5 tokens, then 2 rows x 2 cached steps (the 3rd token needs none)
    assert counts == {"with_grad": 5, "no_grad": 6 + 5 + 4}


def test_measured_matmul_peak_is_positive_and_finite_and_the_text_reads_it(benchlib):
    peak = benchlib.matmul_peak_flops("float32", "cpu", size=256, repeats=2)
    assert 0 < peak < 1e15 and math.isfinite(peak)
    assert benchlib.matmul_peak_flops("float32", "cpu", size=256, repeats=2) == peak  # measured once
    assert benchlib.matmul_peak_flops("float32", "cpu", size=256, repeats=2, again=True) >= peak  # the best kept
    assert benchlib.flops_text(3e9, 2.0, 6e9) == \
        "achieved 1.50 GFLOP/s = 25.00% of measured matmul peak 6.0 GFLOP/s"
