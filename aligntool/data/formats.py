"""Data kinds and row shapes: what each kind of method trains on, the toy rows of each kind, and the conversions
between shapes (implicit prompts, paired -> unpaired, 0/1 labels, conversational prompts as text).

Formats are TRL's own, so a dataset that works with a TRL trainer works here:

=================  ==============================================================================================
data kind          accepted columns (standard = plain strings, conversational = lists of {role, content})
=================  ==============================================================================================
language_modeling  ``text`` | ``messages`` | ``prompt`` + ``completion``
preference         ``chosen`` + ``rejected``, with an explicit ``prompt`` or with the prompt implicit in both
                   (plain texts: their common start, or in HH-RLHF dialogues up to the last
                   ``"\\n\\nAssistant:"``, see ``split_implicit_prompt``; conversations: TRL splits them)
prompt             ``prompt`` (other columns are ignored), for methods that sample their own completions
unpaired           ``prompt`` + ``completion`` + ``label`` (true: desirable, false: undesirable), TRL's unpaired
                   preference format, for KTO; ``dataset.unpaired_from_pairs`` reads paired data instead
=================  ==============================================================================================

Published shapes (HH-RLHF, Alpaca, ShareGPT, UltraFeedback-binarized, GSM8K) become these columns through
``dataset.format`` and other column names through ``dataset.columns`` (published.py; docs/DATASETS.md).

Unpaired labels must be booleans. Integer 0/1 (what pandas, CSV exports and many JSON dumps write) are accepted and
turned into false/true; anything else (strings such as "yes" or "true", other numbers, null) is an error naming the
row, or a dropped row with ``dataset.drop_invalid_rows``. A paired dataset becomes unpaired data with two rows per pair
(chosen -> true, rejected -> false), shuffled with ``dataset.toy.seed``: TRL's KTOTrainer reads the rows in order and
estimates its KL term from each batch's completions rotated by one row, so a pair's two rows must not sit side by
side (nor all desirable rows first).
"""

from __future__ import annotations

from aligntool.errors import UserError

DATA_KINDS: dict[str, list[tuple[str, ...]]] = {
    "language_modeling": [("text",), ("messages",), ("prompt", "completion")],
    "preference": [("chosen", "rejected")],
    "prompt": [("prompt",)],  # methods that sample their own completions (RSO, SPPO)
    "unpaired": [("prompt", "completion", "label")],  # KTO: TRL's unpaired preference format
}


def toy_rows(kind: str, size: int, seed: int, split: str, bt_temperature: float, task: str = "reviews") -> list[dict]:
    from aligntool.toy import world

    if task == "arithmetic":
        from aligntool.toy import arith

        if kind == "language_modeling":
            return arith.sft_rows(size, seed=seed, split=split)
        if kind == "prompt":
            return [{"prompt": p} for p in arith.prompts(split, size, seed=seed)]
        raise UserError(f"dataset.toy.task: 'arithmetic' has demonstrations and prompts, no {kind} data; "
                        "use task 'reviews' or an algorithm that trains on demonstrations (sft) or samples its own")
    if task == "tools":
        from aligntool.toy import tools

        if kind == "prompt":
            return tools.rows(size, seed=seed, split=split)
        raise UserError(f"dataset.toy.task: 'tools' has prompts (with an answer column), no {kind} data; use an "
                        "algorithm that samples its own completions (grpo, reinforce_pp, remax, ppo, p3o)")
    if kind == "language_modeling":
        return world.sft_rows(size, seed=seed, split=split)
    if kind == "preference":
        return world.preference_pairs(size, seed=seed, split=split, bt_temperature=bt_temperature)
    if kind == "prompt":
        return [{"prompt": p} for p in world.prompts(split, size, seed=seed)]
    if kind == "unpaired":  # `size` rows from the toy world's preference pairs: chosen -> true, rejected -> false
        pairs = world.preference_pairs((size + 1) // 2, seed=seed, split=split, bt_temperature=bt_temperature)
        return unpair_rows(pairs, seed)[:size]
    raise ValueError(f"no toy data for data kind {kind!r}")


def unpair_rows(pairs: list[dict], seed: int) -> list[dict]:
    """Two unpaired rows per preference pair, (prompt, chosen, true) and (prompt, rejected, false), in a seeded random
    order (see the module docstring for why not side by side)."""
    import random

    rows = [{"prompt": p["prompt"], "completion": p[col], "label": col == "chosen"}
            for p in pairs for col in ("chosen", "rejected")]
    random.Random(seed).shuffle(rows)
    return rows


ASSISTANT_TURN = "\n\nAssistant:"  # HH-RLHF's dialogue format: "\n\nHuman: ...\n\nAssistant: ..." turns


def split_implicit_prompt(row: dict) -> dict:
    r"""(prompt, chosen, rejected) of a pair whose ``chosen`` and ``rejected`` texts each hold the whole exchange.

    The prompt is their common start (TRL's ``extract_prompt``), except in dialogue-formatted texts (HH-RLHF's
    ``\n\nHuman: ... \n\nAssistant: ...``): two replies often begin with the same letters ("D" of "DuckDuckGo" and
    of "Duckduckgo"), and the common start then runs into the replies and cuts a word in two. There the prompt ends at
    the last ``\n\nAssistant:`` of the common start, as TRL's own HH conversion script
    (examples/datasets/hh-rlhf-helpful-base.py) splits it, and each completion is the rest of its text (from the
    space after the colon)."""
    from trl.data_utils import extract_prompt

    split = extract_prompt(row)
    common = split["prompt"]
    if not common.endswith(ASSISTANT_TURN) and ASSISTANT_TURN in common:
        end = common.rfind(ASSISTANT_TURN) + len(ASSISTANT_TURN)
        return {"prompt": row["chosen"][:end], "chosen": row["chosen"][end:], "rejected": row["rejected"][end:]}
    return split


def implicit_prompts(data, where: str, log=print):
    """Pairs of plain texts without a ``prompt`` column get one (``split_implicit_prompt``); conversational pairs and
    pairs with a prompt are left to TRL, which splits conversations at the first differing message."""
    if "prompt" in data.column_names or cell_kind(data[0]["chosen"]) != "text":
        return data
    dialogue = sum(ASSISTANT_TURN in c for c in data["chosen"])
    data = data.map(split_implicit_prompt)
    if dialogue:
        log(f"note: {where}: no prompt column: each pair's prompt is its dialogue up to the last "
            f"'\\n\\nAssistant:' turn the two texts share ({dialogue} of {len(data)} rows are dialogues; other "
            "rows: their common start)")
    return data


def cell_kind(value) -> str | None:
    """'text', 'conversation' (a list of {role, content} messages) or None for anything else."""
    if isinstance(value, str):
        return "text"
    if isinstance(value, list) and value and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in value):
        return "conversation"
    return None


def labels_as_bool(data):
    """Unpaired labels given as 0/1 become the booleans TRL's KTOTrainer expects (checked by ``check_rows`` first)."""
    import datasets

    if "label" not in data.column_names or data.features["label"] == datasets.Value("bool"):
        return data
    return data.cast_column("label", datasets.Value("bool"))


def prompts_as_text(data, tokenizer, where: str):
    """Conversational prompts (lists of messages) become text through the tokenizer's chat template with the
    generation prompt, as TRL does for the offline methods; the sampling methods then work on strings."""
    if "prompt" not in data.column_names or cell_kind(data[0]["prompt"]) != "conversation":
        return data
    return data.map(lambda row: {"prompt": tokenizer.apply_chat_template(row["prompt"], tokenize=False,
                                                                          add_generation_prompt=True)})
