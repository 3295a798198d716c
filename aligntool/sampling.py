"""Batched sampling from a causal LM and scoring of completions: shared by eval, the sampling pipelines (RSO, SPPO,
INPO, HyPO's online samples) and the rollout engine. Plain ``model.generate`` with the KV cache; no framework of our
own.

One batch layout everywhere (``pack``): prompts left-padded to width P, completions right-padded to width R, so token
j of every completion sits at position P + j and is predicted from position P + j - 1; position ids follow the
attention mask (``positions``), so padding changes no log-prob.
"""

from __future__ import annotations

import torch


def pack(prompt_ids: list[list[int]], completions: list[list[int]], pad_id: int, device="cpu"):
    """(input_ids, attention_mask, completion mask (B, R), P) in the layout above; R is at least 1."""
    P, R = max(map(len, prompt_ids)), max(1, max(map(len, completions)))
    ids = torch.full((len(prompt_ids), P + R), pad_id)
    attn = torch.zeros_like(ids)
    mask = torch.zeros(len(prompt_ids), R)
    for i, (p, c) in enumerate(zip(prompt_ids, completions)):
        ids[i, P - len(p) : P] = torch.tensor(p, dtype=ids.dtype)
        attn[i, P - len(p) : P + len(c)] = 1
        if c:
            ids[i, P : P + len(c)] = torch.tensor(c, dtype=ids.dtype)
            mask[i, : len(c)] = 1
    return ids.to(device), attn.to(device), mask.to(device), P


def positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that count real tokens only (left padding takes none)."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


def completion_logprobs(logits: torch.Tensor, input_ids: torch.Tensor, prompt_width: int,
                        kept: bool = False) -> torch.Tensor:
    """log p of each completion token (B, R) from the logits of a packed batch (float32; mask it yourself).
    ``kept``: ``logits`` holds the last R + 1 positions only (the model ran with ``logits_to_keep=R + 1``)."""
    logp_all = torch.log_softmax((logits if kept else logits[:, prompt_width - 1 :])[:, :-1].float(), -1)
    return logp_all.gather(-1, input_ids[:, prompt_width:, None])[..., 0]


def trim(row: list[int], stop: int | list[int], pad_id: int) -> list[int]:
    """Cut a generated row after its first stop token (kept: its probability is part of the sequence) and drop
    padding. ``stop``: EOS, or every id that ends a turn (``aligntool.tokens.stop_ids``)."""
    stops = {stop} if isinstance(stop, int) else set(stop)
    for j, token in enumerate(row):
        if token in stops:
            return row[: j + 1]
    while row and row[-1] == pad_id:
        row = row[:-1]
    return row


def sample(model, tokenizer, prompts: list[str], max_new_tokens: int, temperature: float = 1.0, batch_size: int = 64,
           seed: int = 0, top_k: int = 0, top_p: float = 1.0):
    """One completion per prompt (repeat a prompt to get several): (texts, token ids). ``temperature`` 0 = greedy.
    Prompts get BOS once where the model's tokenizer puts one; generation stops at any of the model's stop tokens."""
    from aligntool.tokens import encode_prompts, stop_ids

    texts, ids = [], []
    stops = stop_ids(tokenizer)
    for start in range(0, len(prompts), batch_size):
        torch.manual_seed(seed + start)
        rows = generate_from_ids(model, encode_prompts(tokenizer, prompts[start : start + batch_size]),
                                 tokenizer.pad_token_id, stops, max_new_tokens, temperature=temperature,
                                 top_k=top_k, top_p=top_p, greedy=temperature <= 0, empty_as_stop=False)
        ids += rows
        texts += [tokenizer.decode(row, skip_special_tokens=True) for row in rows]
    return texts, ids


def generate_from_ids(model, prompt_ids: list[list[int]], pad_id: int, stop: int | list[int], max_new_tokens: int,
                      temperature: float = 1.0, top_p: float = 1.0, greedy: bool = False, top_k: int = 0,
                      empty_as_stop: bool = True, seeds: list[int] | None = None, greedy_rows: list[bool] | None = None,
                      synced: bool = False) -> list[list[int]]:
    """One completion (token ids, trimmed after the first stop token) per tokenised prompt, in one left-padded
    batch: sampled, or ``greedy``. ``stop``: EOS or the list of ids that end a turn (``aligntool.tokens.stop_ids``;
    the first is the one an empty completion becomes, with ``empty_as_stop``).

    ``seeds`` (one per row) samples each row from its own random stream (``RowSampler``): a row's completion then
    depends on its prompt, its seed and the weights only, not on the other rows of the batch, so a batch split over
    processes samples what one process would (``greedy_rows`` marks rows decoded greedily in the same call).
    ``synced``: every process keeps stepping until all are done (``generate(synced_gpus=True)``), as FSDP needs."""
    device = next(model.parameters()).device
    stops = [stop] if isinstance(stop, int) else list(stop)
    ids, attn, _, width = pack(prompt_ids, [[] for _ in prompt_ids], pad_id, device)
    if seeds is not None:
        from transformers import LogitsProcessorList

        greedy_rows = greedy_rows or [greedy] * len(prompt_ids)
        kwargs = dict(do_sample=False, logits_processor=LogitsProcessorList(
            [RowSampler(seeds, greedy_rows, temperature, top_k, top_p, device)]))
    else:
        kwargs = dict(do_sample=False) if greedy else dict(do_sample=True, temperature=temperature, top_k=top_k,
                                                             top_p=top_p)
    with torch.no_grad():
        out = model.generate(input_ids=ids[:, :width], attention_mask=attn[:, :width], max_new_tokens=max_new_tokens,
                             pad_token_id=pad_id, eos_token_id=stops if len(stops) > 1 else stops[0],
                             synced_gpus=synced, **kwargs)
    rows = [trim(row, stops, pad_id) for row in out[:, width:].tolist()]
    return [row or [stops[0]] for row in rows] if empty_as_stop else rows


class RowSampler:
    """A logits processor that samples every row from its own counter-based random stream, all rows at once: at
    step t the row with seed s draws one uniform u = output t of SplitMix64 started from s (``row_uniforms``: a
    function of (s, t) alone) and takes the token where u falls in the CDF of softmax(scores / T) (restricted to the
    top-k / top-p set, whose other tokens get -inf first; ``inverse_cdf``, two levels of ``BLOCK`` tokens, cheap at
    a 152k vocabulary). It sets that token's score to +inf, in place (generate() hands the processors its own float32
    copy of the logits), and generate() runs greedy (``do_sample=False``) and takes it. Greedy rows keep their
    scores (their argmax is unchanged by T and by the top-k / top-p filter, which always keeps the best token). A
    row's tokens depend on its seed, the step and its own scores only, not on the other rows of the batch."""

    BLOCK = 512  # tokens per block of the inverse CDF
    STEPS = 64  # steps whose uniforms are drawn at once

    def __init__(self, seeds: list[int], greedy_rows: list[bool], temperature: float, top_k: int, top_p: float,
                 device):
        from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

        self.seeds = torch.tensor([int(s) % 2**63 for s in seeds], dtype=torch.int64, device=device)
        self.greedy = torch.tensor(list(greedy_rows), dtype=torch.bool, device=device)
        self.all_greedy, self.any_greedy = all(greedy_rows), any(greedy_rows)  # known here: no device sync per step
        self.step, self.uniforms = 0, None
        self.warpers = ([TemperatureLogitsWarper(temperature)] if temperature not in (0, 1) else []) + \
            ([TopKLogitsWarper(top_k)] if top_k else []) + ([TopPLogitsWarper(top_p)] if top_p < 1 else [])

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        for warp in self.warpers:
            scores = warp(input_ids, scores)
        step, self.step = self.step, self.step + 1
        if self.all_greedy:
            return scores
        if step % self.STEPS == 0:  # the next STEPS steps' uniforms of every row, in one go
            self.uniforms = row_uniforms(self.seeds[:, None], step + torch.arange(self.STEPS, device=scores.device))
        picks = inverse_cdf(scores, self.uniforms[:, step % self.STEPS])
        if self.any_greedy:
            picks[self.greedy] = scores[self.greedy].argmax(-1)
        return scores.scatter_(1, picks[:, None], float("inf"))  # in place: a copy of 152k x 256 floats costs


_GAMMA, _M1, _M2 = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB


def _int64(c: int) -> int:
    """The int64 with the bits of the 64-bit unsigned ``c``."""
    return c - 2**64 if c >= 2**63 else c


def _shr(z: torch.Tensor, k: int) -> torch.Tensor:
    """Logical (unsigned) right shift of int64 ``z`` by ``k`` bits (torch's >> is arithmetic)."""
    return (z >> k) & ((1 << (64 - k)) - 1)


def _mix(z: torch.Tensor) -> torch.Tensor:
    """SplitMix64's output function (Steele, Lea & Flood 2014; Vigna's splitmix64.c), in wrapping int64 arithmetic."""
    z = (z ^ _shr(z, 30)) * _int64(_M1)
    z = (z ^ _shr(z, 27)) * _int64(_M2)
    return z ^ _shr(z, 31)


def row_uniforms(seeds: torch.Tensor, steps) -> torch.Tensor:
    """u in [0, 1) (float64, 53 bits) for each seed and step (an int, or int64 steps broadcast against ``seeds``):
    output ``step`` (0-based) of SplitMix64 started at state mix(seed), i.e. mix(mix(seed) + (step + 1) gamma) mod
    2^64 -- a function of (seed, step) alone."""
    z = _mix(seeds) + (torch.as_tensor(steps, dtype=torch.int64, device=seeds.device) + 1) * _int64(_GAMMA)
    return _shr(_mix(z), 11).double() * 2.0**-53


def inverse_cdf(scores: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Per row, a draw from softmax(scores) for u ~ U(0, 1) by inverting its CDF, in two levels: the block of
    ``RowSampler.BLOCK`` tokens where u falls in the CDF of the block sums (float32 sums, float64 CDF), then the token
    where the rest of u, as a fraction of the block's mass, falls in the block's own float64 CDF: P(v) = P(its block)
    x p_v / (the block's sum), exact to the float32 block sums' rounding. A token of zero probability is never chosen
    (a row past the end by rounding gets its last token of positive probability)."""
    B, V = scores.shape
    n = min(RowSampler.BLOCK, V)
    p = torch.softmax(scores, -1)  # one fused pass
    full = V // n * n
    sums = p[:, :full].reshape(B, -1, n).sum(-1)
    if full < V:
        sums = torch.cat([sums, p[:, full:].sum(-1, keepdim=True)], 1)
    cdf = sums.double().cumsum(-1)
    x = u.to(cdf.device)[:, None] * cdf[:, -1:]
    block = torch.searchsorted(cdf, x, right=True).clamp_(max=cdf.shape[1] - 1)
    frac = (x - torch.where(block > 0, cdf.gather(1, (block - 1).clamp(min=0)), 0.0)) / sums.double().gather(1, block)
    cols = block * n + torch.arange(n, device=p.device)  # the chosen block's tokens (the last block may be short)
    inside = torch.where(cols < V, p.gather(1, cols.clamp(max=V - 1)), 0.0).double().cumsum(-1)
    within = torch.searchsorted(inside, frac * inside[:, -1:], right=True).clamp_(max=n - 1)
    picks = cols.gather(1, within)[:, 0].clamp_(max=V - 1)
    bad = p.gather(1, picks[:, None])[:, 0] <= 0
    if bool(bad.any()):  # past the end by rounding (or a row without a finite score): the last positive token
        ranks = torch.where(p[bad] > 0, torch.arange(V, device=p.device), -1).amax(-1)
        picks[bad] = torch.where(ranks >= 0, ranks, scores[bad].argmax(-1))
    return picks


def sequence_logprobs(model, tokenizer, prompts: list, completions: list[list[int]], batch_size: int = 64,
                      grad: bool = False):
    """sum_t log p(y_t | x, y_<t) over each completion's tokens under ``model``: a list of floats, or with
    ``grad=True`` one tensor that carries the graph (for on-policy estimators). Prompts are strings or token ids."""
    out = []
    device = next(model.parameters()).device
    for start in range(0, len(prompts), batch_size):
        from aligntool.tokens import encode_prompts

        batch = prompts[start : start + batch_size]
        texts = [p for p in batch if not isinstance(p, list)]
        encoded = iter(encode_prompts(tokenizer, texts) if texts else [])  # the batch's strings in one call
        prompt_ids = [p if isinstance(p, list) else next(encoded) for p in batch]
        ids, attn, mask, width = pack(prompt_ids, completions[start : start + batch_size], tokenizer.pad_token_id,
                                      device)
        with torch.set_grad_enabled(grad):
            logits = model(input_ids=ids, attention_mask=attn, position_ids=positions(attn)).logits
            out.append((completion_logprobs(logits, ids, width) * mask).sum(-1))
    seq = torch.cat(out)
    return seq if grad else seq.tolist()
