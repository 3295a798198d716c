"""Datasets as they are published: ``dataset.columns`` (a rename map from the data's names to aligntool's) and
``dataset.format`` (a named published shape converted to the columns of the method's data kind). docs/DATASETS.md
describes each shape with its source; the conversions:

=============  =====================================  ===========================================================
format         source columns                         becomes (by data kind; others are an error)
=============  =====================================  ===========================================================
trl            TRL's standard/conversational columns  unchanged
hh-rlhf        chosen, rejected (whole dialogues)     preference: prompt (up to the last "\\n\\nAssistant:"),
                                                      chosen, rejected; prompt: prompt; language_modeling:
                                                      prompt + completion (the chosen reply)
alpaca         instruction, input (optional), output  language_modeling: prompt + completion; prompt: prompt
sharegpt       conversations [{from, value}], system  language_modeling: messages [{role, content}]; prompt: the
               (optional)                             messages before the last assistant turn
ultrafeedback  prompt, chosen, rejected (message      preference: prompt, chosen, rejected as conversations (TRL's
               lists), messages (optional)            ``extract_prompt``); prompt: prompt; language_modeling:
                                                      messages (the chosen conversation where there is none)
gsm8k          question, answer (worked solution      prompt: prompt, answer (the number after '####'), solution;
               ending in '#### <number>')             language_modeling: prompt + completion (the solution)
=============  =====================================  ===========================================================

Unpaired data (KTO) reads the paired shapes through ``dataset.unpaired_from_pairs``.
"""

from __future__ import annotations

from aligntool.data.formats import split_implicit_prompt
from aligntool.errors import UserError

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant",
                  "bing": "assistant", "bard": "assistant", "system": "system", "function_call": "assistant",
                  "observation": "tool", "tool": "tool"}
KIND_WORDS = {"language_modeling": "language-modeling", "preference": "preference", "prompt": "prompt",
              "unpaired": "unpaired"}


def column_names(data) -> list[str]:
    """The columns of a Dataset, or of an IterableDataset whose features are not known yet (its first row's)."""
    if data.column_names is not None:
        return list(data.column_names)
    return list(next(iter(data)).keys())


def apply_columns(data, columns: dict | None, where: str):
    """``dataset.columns``: rename FROM the data's names TO aligntool's; a name the data lacks is an error listing the
    columns found."""
    if not columns:
        return data
    found = column_names(data)
    missing = [c for c in columns if c not in found]
    if missing:
        raise UserError(f"{where}: dataset.columns names {', '.join(map(repr, missing))}, not a column of the data; "
                        f"found: {', '.join(found)}")
    clash = [t for s, t in columns.items() if t in found and t not in columns and t != s]
    if clash:
        raise UserError(f"{where}: dataset.columns renames a column to {clash[0]!r}, which the data already has; "
                        f"rename or drop that one too (columns found: {', '.join(found)})")
    return data.rename_columns({s: t for s, t in columns.items() if s != t})


# ------------------------------------------------------------------------------------------------ the conversions
def _hh(kind: str):
    if kind == "prompt":
        return lambda row, i: {"prompt": split_implicit_prompt(row)["prompt"]}
    if kind == "language_modeling":
        def demonstration(row, i):
            split = split_implicit_prompt(row)
            return {"prompt": split["prompt"], "completion": split["chosen"]}
        return demonstration
    return lambda row, i: split_implicit_prompt(row)


def _alpaca_prompt(row: dict) -> str:
    extra = (row.get("input") or "").strip()
    return row["instruction"] if not extra else f"{row['instruction']}\n\n{extra}"


def _alpaca(kind: str):
    if kind == "prompt":
        return lambda row, i: {"prompt": _alpaca_prompt(row)}
    return lambda row, i: {"prompt": _alpaca_prompt(row), "completion": row["output"]}


def _sharegpt_messages(row: dict, i: int, where: str) -> list[dict]:
    turns = row["conversations"]
    if not isinstance(turns, list):
        raise UserError(f"{where}: row {i + 1}: 'conversations' is not a list of {{from, value}} turns")
    messages = [{"role": "system", "content": row["system"]}] if isinstance(row.get("system"), str) and row[
        "system"].strip() else []
    for turn in turns:
        role = SHAREGPT_ROLES.get(turn.get("from") if isinstance(turn, dict) else None)
        if role is None or not isinstance(turn.get("value"), str):
            raise UserError(f"{where}: row {i + 1}: a ShareGPT turn is {turn!r:.80}; expected {{from, value}} with "
                            f"from one of {', '.join(SHAREGPT_ROLES)}")
        messages.append({"role": role, "content": turn["value"]})
    return messages


def _sharegpt(kind: str, where: str):
    if kind == "prompt":
        def prompt(row, i):
            messages = _sharegpt_messages(row, i, where)
            last = max((k for k, m in enumerate(messages) if m["role"] == "assistant"), default=len(messages))
            return {"prompt": messages[:last]}
        return prompt
    return lambda row, i: {"messages": _sharegpt_messages(row, i, where)}


def _ultrafeedback(kind: str):
    from trl.data_utils import extract_prompt

    if kind == "prompt":
        return lambda row, i: {"prompt": row["prompt"]}
    if kind == "language_modeling":
        return lambda row, i: {"messages": row.get("messages") or row["chosen"]}
    return lambda row, i: extract_prompt({"chosen": row["chosen"], "rejected": row["rejected"]})


def gsm8k_final_answer(solution: str) -> str | None:
    """GSM8K's final answer: the text after the last '####' of the worked solution, stripped, thousands separators
    removed ('1,000' -> '1000'); None without a '####'."""
    if "####" not in solution:
        return None
    return solution.rsplit("####", 1)[1].strip().replace(",", "")


def _gsm8k(kind: str, where: str):
    def convert(row, i):
        answer = gsm8k_final_answer(row["answer"]) if isinstance(row["answer"], str) else None
        if not answer:
            raise UserError(f"{where}: row {i + 1}: 'answer' does not end in '#### <number>' as GSM8K's worked "
                            f"solutions do ({row['answer']!r:.60})")
        if kind == "language_modeling":
            return {"prompt": row["question"], "completion": "\n" + row["answer"]}
        return {"prompt": row["question"], "answer": answer, "solution": row["answer"]}
    return convert


# format: (source columns needed, data kinds it gives, converter factory)
FORMATS = {
    "trl": ((), ("language_modeling", "preference", "prompt", "unpaired"), None),
    "hh-rlhf": (("chosen", "rejected"), ("preference", "prompt", "language_modeling"), lambda k, w: _hh(k)),
    "alpaca": (("instruction", "output"), ("language_modeling", "prompt"), lambda k, w: _alpaca(k)),
    "sharegpt": (("conversations",), ("language_modeling", "prompt"), _sharegpt),
    "ultrafeedback": (("prompt", "chosen", "rejected"), ("preference", "prompt", "language_modeling"),
                      lambda k, w: _ultrafeedback(k)),
    "gsm8k": (("question", "answer"), ("prompt", "language_modeling"), _gsm8k),
}


def apply_format(data, fmt: str | None, kind: str, where: str, algorithm: str, from_pairs: bool = False):
    """``dataset.format``: the published shape ``fmt`` as the columns of data kind ``kind`` (paired rows where KTO
    reads pairs, ``from_pairs``). A shape that cannot give that kind, or data without the shape's columns, is a
    one-line error."""
    if fmt is None:
        return data
    needs, kinds, factory = FORMATS[fmt]
    shape = "preference" if from_pairs else kind
    if shape not in kinds:
        hint = ("; set dataset.unpaired_from_pairs: true to read its pairs as unpaired rows"
                if kind == "unpaired" and "preference" in kinds else "")
        raise UserError(f"{where}: dataset.format {fmt!r} gives {' or '.join(KIND_WORDS[k] for k in kinds)} data; "
                        f"{algorithm} trains on {KIND_WORDS[kind]} data{hint}")
    found = column_names(data)
    missing = [c for c in needs if c not in found]
    if missing:
        raise UserError(f"{where}: dataset.format {fmt!r} expects the column(s) {', '.join(needs)}; missing "
                        f"{', '.join(missing)}; found: {', '.join(found)} (dataset.columns renames them)")
    if factory is None:
        return data
    # datasets' cache keys a map by its function's pickle, which names module functions without their code: a
    # conversion changed between versions would be served from the old cache
    fresh = {"load_from_cache_file": False} if hasattr(data, "__len__") else {}
    return data.map(factory(shape, where), with_indices=True, remove_columns=found, **fresh)
