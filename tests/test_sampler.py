"""The reproducible per-row sampler (aligntool.sampling.RowSampler): its uniforms are SplitMix64's (checked against
a plain-Python SplitMix64), its draws follow softmax(scores / T) restricted to the top-k / top-p set (a chi-square
test over many seeded rows against probabilities computed here by hand), a row samples the same tokens alone and
inside a batch, and greedy rows are plain greedy decoding."""

import math

import pytest
import torch

from aligntool import sampling
from aligntool.sampling import RowSampler, row_uniforms

MASK = 2**64 - 1


def splitmix64(seed: int, n: int) -> list[float]:
    """The first n outputs of SplitMix64 (Vigna's splitmix64.c) from state mix(seed), as 53-bit uniforms."""

    def mix(z):
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
        return z ^ (z >> 31)

    state, out = mix(seed), []
    for _ in range(n):
        state = (state + 0x9E3779B97F4A7C15) & MASK
        out.append((mix(state) >> 11) / 2**53)
    return out


def test_row_uniforms_are_splitmix64_outputs_of_the_row_seed():
    seeds = [0, 1, 12345, 2**40 + 7, 2**63 - 1]
    got = torch.stack([row_uniforms(torch.tensor(seeds), t) for t in range(5)], 1).tolist()
    assert got == [splitmix64(s, 5) for s in seeds]
    assert row_uniforms(torch.tensor(seeds)[:, None], torch.arange(5)).tolist() == got  # all steps at once
    far = row_uniforms(torch.tensor(seeds[2:3]), 200).item()  # a later block of RowSampler.STEPS steps
    assert far == splitmix64(seeds[2], 201)[-1]


def draws(logits, temperature=1.0, top_k=0, top_p=1.0, rows=40_000, steps=1):
    """Token counts of ``rows`` seeded rows (and ``steps`` steps each) on the same logits."""
    sampler = RowSampler(list(range(rows)), [False] * rows, temperature, top_k, top_p, "cpu")
    scores = torch.tensor(logits, dtype=torch.float32).expand(rows, -1).contiguous()
    picks = []
    for _ in range(steps):
        out = sampler(torch.zeros(rows, 1, dtype=torch.long), scores.clone())
        assert bool((out.isinf() & (out > 0)).sum(-1).eq(1).all())  # one token per row set to +inf
        picks.append(out.argmax(-1))
    return torch.bincount(torch.cat(picks), minlength=len(logits)).tolist()


def expected(logits, temperature=1.0, keep=None):
    """softmax(logits / T), renormalised over the kept tokens, by hand."""
    keep = keep if keep is not None else range(len(logits))
    w = [math.exp(v / temperature) if i in keep else 0.0 for i, v in enumerate(logits)]
    return [x / sum(w) for x in w]


def chi_square(counts, probs):
    n = sum(counts)
    assert all(c == 0 for c, p in zip(counts, probs) if p == 0)  # a token outside the kept set is never drawn
    return sum((c - n * p) ** 2 / (n * p) for c, p in zip(counts, probs) if p > 0)


LOGITS = [1.0, -0.5, 2.0, 0.3, -2.0, 0.0, 1.5]
# chi-square 0.9999 quantiles (scipy.stats.chi2.ppf(0.9999, df)): a correct sampler fails one in 10^4 seed sets
CRIT = {6: 27.86, 4: 23.51, 2: 18.42}


@pytest.mark.parametrize("block", [512, 3])  # one block, and three blocks with a short last one (7 = 3 + 3 + 1)
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_draws_follow_the_softmax(monkeypatch, block, temperature):
    monkeypatch.setattr(RowSampler, "BLOCK", block)
    counts = draws(LOGITS, temperature, steps=2)
    assert chi_square(counts, expected(LOGITS, temperature)) < CRIT[6]


def test_top_p_and_top_k_draw_from_the_kept_set_only(monkeypatch):
    monkeypatch.setattr(RowSampler, "BLOCK", 3)
    p = expected(LOGITS)  # top_p 0.8 keeps the best tokens while their mass before them is < 0.8: 2, 6, 0, 3, 5
    order = sorted(range(7), key=lambda i: -p[i])
    nucleus = [i for k, i in enumerate(order) if sum(p[j] for j in order[:k]) < 0.8]
    assert chi_square(draws(LOGITS, top_p=0.8), expected(LOGITS, keep=nucleus)) < CRIT[len(nucleus) - 1]
    assert chi_square(draws(LOGITS, top_k=3), expected(LOGITS, keep=order[:3])) < CRIT[2]


def test_a_token_of_zero_probability_is_never_drawn_even_at_u_near_one(monkeypatch):
    scores = torch.tensor([[0.5, 1.0, float("-inf"), float("-inf")], [float("-inf"), 2.0, 0.0, float("-inf")]])
    monkeypatch.setattr(sampling, "row_uniforms", lambda seeds, steps: torch.full((2, 64), 1 - 2.0**-53))
    picks = RowSampler([1, 2], [False, False], 1.0, 0, 1.0, "cpu")(None, scores).argmax(-1)
    assert picks.tolist() == [1, 2]


def test_a_row_draws_the_same_alone_and_in_any_batch_from_its_seeds_stream(monkeypatch):
    monkeypatch.setattr(RowSampler, "STEPS", 2)  # uniforms drawn two steps at a time: step 2 starts a new draw
    torch.manual_seed(0)
    scores, seeds = torch.randn(6, 1300), [10, 11, 12, 13, 14, 2**62 + 15]  # three blocks of 512, the last short
    together = RowSampler(seeds, [False] * 6, 1.0, 0, 1.0, "cpu")
    alone = [RowSampler([s], [False], 1.0, 0, 1.0, "cpu") for s in seeds]
    steps = []
    for t in range(3):
        batch = together(None, scores.clone()).argmax(-1).tolist()
        assert batch == [a(None, scores[i : i + 1].clone()).argmax(-1).item() for i, a in enumerate(alone)]
        u = torch.tensor([splitmix64(s, t + 1)[-1] for s in seeds], dtype=torch.float64)  # output t of each seed
        assert batch == sampling.inverse_cdf(scores, u).tolist()
        steps.append(batch)
    assert steps[0] != steps[1] != steps[2]  # the stream moves on with the step


def test_generation_row_alone_equals_row_in_batch_and_greedy_rows_are_greedy(tiny_path):
    from transformers import AutoModelForCausalLM

    from aligntool.sampling import generate_from_ids

    model = AutoModelForCausalLM.from_pretrained(tiny_path).eval()
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13, 14], [15]]
    seeds = [101, 202, 303, 404]
    gen = dict(pad_id=0, stop=1, max_new_tokens=10, empty_as_stop=False)
    batch = generate_from_ids(model, prompts, seeds=seeds, greedy_rows=[False, True, False, False], **gen)
    alone = [generate_from_ids(model, [p], seeds=[s], **gen)[0] for p, s in zip(prompts, seeds)]
    assert [batch[0], batch[2], batch[3]] == [alone[0], alone[2], alone[3]]
    assert batch[1] == generate_from_ids(model, [prompts[1]], greedy=True, **gen)[0]
    again = generate_from_ids(model, prompts[:1] * 4, seeds=[101, 102, 103, 104], **gen)
    assert again[0] == alone[0] and len({tuple(r) for r in again}) > 1  # one seed, one stream; seeds differ
