"""Row checks: the columns a data kind needs, every cell a string or a conversation (one format per column), unpaired
labels booleans, a chat template for conversational rows. Each bad row is an error naming the row (1-based) and the
column, or a dropped and counted row with ``dataset.drop_invalid_rows``."""

from __future__ import annotations

from aligntool.data.formats import DATA_KINDS, cell_kind
from aligntool.errors import UserError


def check_columns(data, kind: str, where: str) -> tuple[str, ...]:
    """The columns of ``kind`` that ``data`` has (the first option that fits); an error names what is missing."""
    if len(data) == 0:
        raise UserError(f"{where}: dataset is empty")
    options = DATA_KINDS[kind]
    for cols in options:
        if all(c in data.column_names for c in cols):
            return (*cols, *(["prompt"] if kind == "preference" and "prompt" in data.column_names else []))
    wanted = " or ".join("+".join(cols) for cols in options)
    missing = [c for c in options[0] if c not in data.column_names] if kind == "unpaired" else []
    hint = ""
    if kind == "unpaired" and {"chosen", "rejected"} <= set(data.column_names):
        hint = "; this is paired data: set dataset.unpaired_from_pairs: true to train on it (two rows per pair)"
    raise UserError(f"{where}: missing column(s) {', '.join(map(repr, missing)) + ' ' if missing else ''}for {kind} "
                    f"data: expected {wanted}; found: {', '.join(data.column_names)}{hint}")


def _describe(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, list):
        return "an empty list" if not value else "a list that is not {role, content} messages"
    name = type(value).__name__
    return f"{'an' if name[0] in 'aeiou' else 'a'} {name} ({value!r:.40})"


def _label_ok(value) -> bool:
    """An unpaired ``label``: a boolean, or the integer 0 or 1."""
    return isinstance(value, bool) or (isinstance(value, int) and value in (0, 1))


def invalid_rows(data, columns: tuple[str, ...]) -> list[tuple[int, str, str]]:
    """(row index, column, what is wrong) for every bad cell: null, not a string nor a conversation, or a format that
    differs from the column's first valid cell (a conversation among strings, or the reverse). The ``label`` column of
    unpaired data holds booleans (or 0/1) instead."""
    bad = []
    for col in columns:
        values = data[col]
        if col == "label":
            bad += [(i, col, f"is {_describe(v)}; expected a boolean, true (desirable) or false (undesirable), or the "
                     "integer 1 or 0") for i, v in enumerate(values) if not _label_ok(v)]
            continue
        first = next((k for k in map(cell_kind, values) if k is not None), None)
        for i, value in enumerate(values):
            kind = cell_kind(value)
            if kind is None:
                bad.append((i, col, f"is {_describe(value)}; expected a string or a list of "
                            "{role, content} messages"))
            elif kind != first:
                bad.append((i, col, f"is a {kind} but earlier rows hold "
                            f"{'strings' if first == 'text' else 'conversations'}"))
    return sorted(bad)


def check_rows(data, columns: tuple[str, ...], where: str, drop: bool, log=print):
    """Every cell of ``columns`` must be a string or a conversation, one format per column. A bad cell is an error
    naming the row (1-based) and the column, or with ``dataset.drop_invalid_rows`` the row is dropped and counted."""
    bad = invalid_rows(data, columns)
    if not bad:
        return data
    i, col, what = bad[0]
    rows = sorted({b[0] for b in bad})
    if not drop:
        more = f" ({len(rows)} bad rows in all)" if len(rows) > 1 else ""
        raise UserError(f"{where}: row {i + 1}: column {col!r} {what}{more}; fix the data or set "
                        "dataset.drop_invalid_rows: true to skip such rows")
    kept = data.select(sorted(set(range(len(data))) - set(rows)))
    log(f"{where}: dropped {len(rows)} of {len(data)} rows with invalid cells (first: row {i + 1}, column {col!r} "
        f"{what})")
    if len(kept) == 0:
        raise UserError(f"{where}: every row has an invalid cell (first: row {i + 1}, column {col!r} {what})")
    return kept


def check_template(data, columns: tuple[str, ...], tokenizer, where: str) -> None:
    """Conversational rows (lists of {role, content}) go through the tokenizer's chat template; a model without one
    (base checkpoints: GPT-2, Pythia, most pretrained-only models) is named before TRL fails deep inside."""
    conversational = [c for c in columns if cell_kind(data[0][c]) == "conversation"]
    if conversational and not getattr(tokenizer, "chat_template", None):
        from aligntool.tokens import TEMPLATES

        raise UserError(f"{where}: column {conversational[0]!r} holds conversations but the model's tokenizer has no "
                        f"chat template; set model.chat_template: <a Jinja file, or one of {', '.join(TEMPLATES)}>, "
                        "or give plain-text rows")
