"""`aligntool eval --data` on SFT rows: NLL per token and perplexity of a causal LM (docs/EVAL.md).

Which tokens are scored, by the rows' shape (as SFT trains on them):

    text                 every token but the first (nothing predicts it)
    prompt + completion  the completion's tokens and the EOS after it (TRL's completion-only loss)
    messages             the assistant turns' tokens, marked by the chat template's ``{% generation %}`` blocks (the
                         template aligntool trains with, ``tokens.training_chat_template``); every token when no
                         marked template exists for the model, and the result says so

Over rows i with s_i the summed NLL (nats) of their scored tokens and n_i their count:

    nll_per_token = sum_i s_i / sum_i n_i,  perplexity = exp(nll_per_token)
    standard error (ratio estimator, delta method): sqrt( sum_i (s_i - nll n_i)^2 / (N (N - 1)) ) / mean_i n_i

With ``--reference`` (same tokenizer), the same for the reference and the paired difference d_i = s_i - s'_i on the
same tokens: nll_difference = sum d_i / sum n_i with the same standard error; perplexity_ratio = exp(nll_difference).
A row longer than the model's context keeps its last tokens.
"""

from __future__ import annotations

import math


def ratio_stderr(sums: list[float], counts: list[int]) -> tuple[float, float]:
    """(sum s / sum n, its delta-method standard error over rows)."""
    total_n = sum(counts)
    ratio = sum(sums) / total_n
    N = len(sums)
    if N < 2:
        return ratio, 0.0
    resid = sum((s - ratio * n) ** 2 for s, n in zip(sums, counts))
    return ratio, math.sqrt(resid / (N * (N - 1))) / (total_n / N)


def _encode(row: dict, tokenizer, template) -> tuple[list[int], list[int]]:
    """(token ids, 1 for each scored token) of one row; see the module docstring."""
    from aligntool.data import cell_kind

    if "messages" in row and row.get("messages") is not None and "text" not in row:
        from aligntool.tokens import chat_template_swapped

        with chat_template_swapped(tokenizer, template):
            out = tokenizer.apply_chat_template(row["messages"], tokenize=True, return_dict=True,
                                                return_assistant_tokens_mask=template is not None)
        ids = list(out["input_ids"])
        mask = list(out.get("assistant_masks") or [1] * len(ids)) if template is not None else [1] * len(ids)
        return ids, mask
    if "text" in row and row.get("text") is not None:
        ids = tokenizer(row["text"])["input_ids"]
        return ids, [1] * len(ids)
    prompt, completion = row["prompt"], row["completion"]
    if cell_kind(prompt) == "conversation":
        prompt_text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(prompt + completion, tokenize=False)
        prompt, completion = prompt_text, full[len(prompt_text):] if full.startswith(prompt_text) else full
    prompt_ids = tokenizer(prompt)["input_ids"]
    ids = tokenizer(prompt + completion)["input_ids"]
    if tokenizer.eos_token_id is not None and ids[-1:] != [tokenizer.eos_token_id]:
        ids = ids + [tokenizer.eos_token_id]
    return ids, [0] * len(prompt_ids) + [1] * (len(ids) - len(prompt_ids))


def token_nll(model, pad_id: int, encoded: list[tuple[list[int], list[int]]], batch_size: int) -> list[float]:
    """Summed NLL of each row's scored tokens (a token at position t > 0 is predicted from positions < t)."""
    import torch

    device = next(model.parameters()).device
    out = []
    for start in range(0, len(encoded), batch_size):
        batch = encoded[start : start + batch_size]
        width = max(len(ids) for ids, _ in batch)
        ids = torch.full((len(batch), width), pad_id)
        attn = torch.zeros_like(ids)
        mask = torch.zeros(len(batch), width)
        for i, (row, m) in enumerate(batch):
            ids[i, : len(row)] = torch.tensor(row)
            attn[i, : len(row)] = 1
            mask[i, : len(m)] = torch.tensor(m, dtype=mask.dtype)
        ids, attn, mask = ids.to(device), attn.to(device), mask.to(device)
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=attn).logits.float()
        logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0]
        out += (-(logp * mask[:, 1:]).sum(-1)).tolist()
    return out


def evaluate_likelihood(model: str, reference: str | None, cfg, base_dir, num_rows: int | None,
                        batch_size: int) -> dict:
    """Mode (c): see the module docstring."""
    from aligntool.errors import UserError
    from aligntool.eval.toy import _load_lm
    from aligntool.eval.user import _context, describe, load_rows
    from aligntool.tokens import training_chat_template

    policy, tokenizer = _load_lm(model, "--model")
    data, _ = load_rows(cfg, ("language_modeling",), tokenizer, base_dir,
                        "a causal LM without a reward source is evaluated by its likelihood of SFT rows (text, "
                        "messages or prompt + completion); prompts only (or pairs) need a reward source to score "
                        "generations: --reward-model, --reward-fn or --recipe with a reward section")
    rows = data.to_list()[:num_rows] if num_rows else data.to_list()
    columns = data.column_names
    template = training_chat_template(tokenizer) if "messages" in columns and "text" not in columns else None
    if "text" in columns:
        scored = "all tokens of each text but the first"
    elif "messages" in columns:
        scored = ("assistant turns only (the chat template's generation blocks)" if template is not None else
                  "all tokens (no chat template marking the assistant turns is known for this model)")
    else:
        scored = "completion tokens only (and the EOS after each)"
    context = _context(policy, tokenizer)
    encoded = [_encode(r, tokenizer, template) for r in rows]
    cut = sum(len(ids) > context for ids, _ in encoded)
    encoded = [(ids[-context:], m[-context:]) for ids, m in encoded]
    counts = [sum(m[1:]) for _, m in encoded]
    if not sum(counts):
        raise UserError(f"--data {cfg.path}: no token to score ({scored}); the rows are empty")
    sums = token_nll(policy, tokenizer.pad_token_id, encoded, batch_size)
    nll, err = ratio_stderr(sums, counts)
    result = {"model": model, "kind": "causal_lm", "mode": "likelihood", "data": describe(cfg, len(data), base_dir),
              "num_rows": len(rows), "tokens_scored": scored, "num_tokens": sum(counts), "nll_per_token": nll,
              "nll_per_token_stderr": err, "perplexity": math.exp(nll)}
    if cut:
        result["note"] = f"{cut} of {len(rows)} rows exceed the model's {context} positions: each keeps its last tokens"
    if reference:
        ref, ref_tok = _load_lm(reference, "--reference")
        if ref_tok.get_vocab() != tokenizer.get_vocab():
            raise UserError("--reference: its tokenizer differs from the model's; the NLL difference needs the same "
                            "tokens")
        ref_sums = token_nll(ref, tokenizer.pad_token_id, encoded, batch_size)
        ref_nll, ref_err = ratio_stderr(ref_sums, counts)
        diff, diff_err = ratio_stderr([a - b for a, b in zip(sums, ref_sums)], counts)
        result.update(reference=reference, reference_nll_per_token=ref_nll, reference_nll_per_token_stderr=ref_err,
                      reference_perplexity=math.exp(ref_nll), nll_difference=diff, nll_difference_stderr=diff_err,
                      perplexity_ratio=math.exp(diff))
    return result
