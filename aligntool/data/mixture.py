"""``dataset.mixture``: several sources mixed at set shares, drawn with a seed.

Shares: ``weight`` (relative: weight / sum of weights), ``fraction`` (of the mixture's rows, summing to at most 1), or
neither (equal shares). The total is ``mixture_size``, or unset the largest mixture the sources give without repeating
a row: ``min(rows_i / share_i)`` (the source that runs out first at its share sets it). Source i gives
``round(share_i * total)`` rows (weights: rounded by largest remainder, so the counts sum to the total): drawn without
replacement; a source asked for more rows than it has is taken whole as many times as it fits, the rest drawn without
replacement. The mixed rows are shuffled together. Every draw uses one seed (``dataset.toy.seed``, as the other data
shuffles and ``eval_fraction`` do), so a rerun mixes the same rows.
"""

from __future__ import annotations

import math

from aligntool.errors import UserError


def shares(sources) -> list[float]:
    """Each source's share of the mixture (validated by the schema: all weights, all fractions, or neither)."""
    if all(s.fraction is not None for s in sources):
        return [s.fraction for s in sources]
    weights = [s.weight if s.weight is not None else 1.0 for s in sources]
    return [w / sum(weights) for w in weights]


def counts(sizes: list[int], share: list[float], total: int | None, normalised: bool) -> tuple[int, list[int]]:
    """(total, rows per source): ``total`` given, or the largest one without repeating a row."""
    if total is None:
        total = math.floor(min(n / p for n, p in zip(sizes, share)) + 1e-9)
    exact = [p * total for p in share]
    rows = [math.floor(x + 1e-9) for x in exact]
    # largest remainder: the counts sum to the total (weights), or to the fractions' share of it, never more
    target = total if normalised else min(total, round(sum(exact)))
    for i in sorted(range(len(rows)), key=lambda i: rows[i] - exact[i])[:max(0, target - sum(rows))]:
        rows[i] += 1
    return total, rows


def draw(n: int, count: int, rng) -> list[int]:
    """``count`` row indices of a source of ``n`` rows: whole passes while it has fewer, the rest without
    replacement."""
    passes, rest = divmod(count, n)
    return [*range(n)] * passes + sorted(rng.choice(n, size=rest, replace=False).tolist())


def mix(parts: list, names: list[str], sources, total: int | None, seed: int, log):
    """(the mixed dataset, one record per source) from the sources' datasets ``parts``; ``names`` name them in
    messages (``dataset.mixture[i] <path>``)."""
    import datasets
    import numpy as np

    share = shares(sources)
    sizes = [len(p) for p in parts]
    normalised = not all(s.fraction is not None for s in sources)
    total, rows = counts(sizes, share, total, normalised)
    if sum(rows) == 0:
        raise UserError(f"dataset.mixture: a mixture of {total} rows at these shares takes no row of any source")
    empty = [names[i] for i, c in enumerate(rows) if c == 0]
    if empty:
        raise UserError(f"{empty[0]}: its share of a {total}-row mixture rounds to 0 rows; raise its share or "
                        "dataset.mixture_size")
    rng = np.random.default_rng(seed)
    chosen = [part.select(draw(n, c, rng)) for part, n, c in zip(parts, sizes, rows)]
    keep = [c for c in parts[0].column_names if all(c in p.column_names for p in parts)]
    try:
        mixed = datasets.concatenate_datasets([p.select_columns(keep) for p in chosen])
    except Exception as exc:  # noqa: BLE001 - datasets' feature alignment errors
        raise UserError(f"dataset.mixture: the sources' columns {', '.join(keep)} do not hold the same types (a "
                        f"string in one, a conversation in another?): {str(exc).splitlines()[0]}") from None
    records = []
    for i, (name, n, c, p) in enumerate(zip(names, sizes, rows, share)):
        again = f" (taken {c / n:.2f} times: rows repeat)" if c > n else ""
        log(f"{name}: {c} of its {n} rows, share {p:.1%} of {total}{again}")
        records.append({"source": i, "path": sources[i].path, "share": round(p, 6), "rows_available": n, "rows": c,
                        "repeated": c > n})
    return mixed.shuffle(seed=seed).flatten_indices(), records
