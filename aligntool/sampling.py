"""Batched sampling from a causal LM and scoring of completions: shared by eval and the sampling pipelines
(RSO, SPPO, HyPO's online samples). Plain ``model.generate`` with the KV cache; no framework of our own."""

from __future__ import annotations


def _left_padded(tokenizer, prompts: list[str]):
    tokenizer.padding_side = "left"
    return tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)


def trim(row: list[int], eos_id: int, pad_id: int) -> list[int]:
    """Cut a generated row after its first EOS (kept: its probability is part of the sequence) and drop padding."""
    if eos_id in row:
        return row[: row.index(eos_id) + 1]
    while row and row[-1] == pad_id:
        row = row[:-1]
    return row


def sample(model, tokenizer, prompts: list[str], max_new_tokens: int, temperature: float = 1.0, batch_size: int = 64,
           seed: int = 0, top_k: int = 0, top_p: float = 1.0):
    """One completion per prompt (repeat a prompt to get several): (texts, token ids). ``temperature`` 0 = greedy."""
    import torch

    texts, ids = [], []
    device = next(model.parameters()).device
    for start in range(0, len(prompts), batch_size):
        batch = _left_padded(tokenizer, prompts[start : start + batch_size]).to(device)
        torch.manual_seed(seed + start)
        kwargs = (dict(do_sample=True, temperature=temperature, top_k=top_k, top_p=top_p)  # top_k 0 = off
                  if temperature > 0 else dict(do_sample=False))
        with torch.no_grad():
            out = model.generate(**batch, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                                 eos_token_id=tokenizer.eos_token_id, **kwargs)
        for row in out[:, batch["input_ids"].shape[1] :].tolist():
            row = trim(row, tokenizer.eos_token_id, tokenizer.pad_token_id)
            ids.append(row)
            texts.append(tokenizer.decode(row, skip_special_tokens=True))
    return texts, ids


def generate_from_ids(model, prompt_ids: list[list[int]], pad_id: int, eos_id: int, max_new_tokens: int,
                      temperature: float = 1.0, top_p: float = 1.0) -> list[list[int]]:
    """Sample one completion (token ids, trimmed after EOS) per tokenised prompt, in one left-padded batch."""
    import torch

    device = next(model.parameters()).device
    width = max(map(len, prompt_ids))
    ids = torch.full((len(prompt_ids), width), pad_id, device=device)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompt_ids):
        ids[i, width - len(p) :] = torch.tensor(p, device=device)
        mask[i, width - len(p) :] = 1
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=temperature, top_k=0,
                             top_p=top_p, max_new_tokens=max_new_tokens, pad_token_id=pad_id, eos_token_id=eos_id)
    return [trim(row, eos_id, pad_id) or [eos_id] for row in out[:, width:].tolist()]


def sequence_logprobs(model, tokenizer, prompts: list, completions: list[list[int]], batch_size: int = 64,
                      grad: bool = False):
    """sum_t log p(y_t | x, y_<t) over each completion's tokens under ``model``: a list of floats, or with
    ``grad=True`` one tensor that carries the graph (for on-policy estimators). Prompts are strings or token ids."""
    import torch

    out = []
    device = next(model.parameters()).device
    for start in range(0, len(prompts), batch_size):
        rows = [(p if isinstance(p, list) else tokenizer(p, add_special_tokens=False)["input_ids"], c)
                for p, c in zip(prompts[start : start + batch_size], completions[start : start + batch_size])]
        width = max(len(p) + len(c) for p, c in rows)
        ids = torch.full((len(rows), width), tokenizer.pad_token_id)
        mask = torch.zeros_like(ids)
        target = torch.zeros_like(ids, dtype=torch.bool)
        for i, (p, c) in enumerate(rows):
            ids[i, : len(p) + len(c)] = torch.tensor(p + c)
            mask[i, : len(p) + len(c)] = 1
            target[i, len(p) : len(p) + len(c)] = True
        ids, mask, target = ids.to(device), mask.to(device), target.to(device)
        with torch.set_grad_enabled(grad):
            logits = model(input_ids=ids, attention_mask=mask).logits.float()
            logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0]
            out.append((logp * target[:, 1:]).sum(-1))
    seq = torch.cat(out)
    return seq if grad else seq.tolist()
