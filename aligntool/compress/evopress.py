"""EvoPress: evolutionary search for per-layer compression levels (Sieberling et al., ICML 2025, arXiv 2410.14649;
reference code `IST-DASLab/EvoPress`).

One generation, from the parent (the best candidate so far):

1. **Mutation ("level switch")**: each offspring is the parent with ``f = min(U{1..m}, U{1..m})`` flips (biased
   toward 1; depth pruning: always 1). A flip lowers one unit's level and raises another's *in the same group*
   (``space.group``), so the budget stays exactly where it was. Duplicates and the parent itself are rejected.
2. **Multi-stage selection**: stage ``k`` draws a fresh random set of ``tokens_k`` calibration tokens (whole windows,
   no repeats), scores every candidate left, keeps the best ``survivors_k``. The parent joins before the last stage
   (elitism), and the last stage keeps one: the next parent.
3. **Fitness**: mean per-token ``KL(p_dense || q_compressed)`` over the vocabulary (or perplexity), lower is better.

The search state (generation, parent, RNG, history) is written atomically after every generation, so a search that
was stopped resumes where it was and ends exactly where the uninterrupted search would have.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Callable

from aligntool.errors import UserError

Levels = tuple[int, ...]


def mutate(parent: Levels, space, rng: random.Random, max_flips: int) -> Levels:
    child = list(parent)
    flips = 1 if space.mode == "depth" else min(rng.randint(1, max_flips), rng.randint(1, max_flips))
    members: dict[int, list[int]] = {}
    for i, g in enumerate(space.group):
        members.setdefault(g, []).append(i)
    for _ in range(flips):
        lower = [i for i in range(len(child)) if child[i] > space.lo[i]
                 and any(j != i and child[j] < space.hi[j] for j in members[space.group[i]])]
        if not lower:
            break
        i = rng.choice(lower)
        j = rng.choice([j for j in members[space.group[i]] if j != i and child[j] < space.hi[j]])
        child[i] -= 1
        child[j] += 1
    return tuple(child)


def _save(path: Path, state: dict) -> None:
    from aligntool.outputs import write_atomic

    write_atomic(path, json.dumps(state))  # a reader sees the old state or the new one, never half of one


def _rng_from(state) -> random.Random:
    rng = random.Random()
    version, internal, gauss = state
    rng.setstate((version, tuple(internal), gauss))
    return rng


def search(space, fitness: Callable[[Levels, list[int]], float], num_windows: int, seq_len: int, cfg, seed: int,
           state_path: Path, resume: bool, fingerprint: str, log=print, progress: bool = True) -> dict:
    """Run (or resume) the search; returns the final state: ``parent``, ``history`` (one entry per generation)."""
    stages = list(zip(cfg.survivors, cfg.tokens))
    if resume and state_path.is_file():
        state = json.loads(state_path.read_text())
        if state.get("fingerprint") != fingerprint:
            raise UserError(f"--resume: the search state in {state_path} belongs to another recipe or model; "
                            "delete it or run without --resume")
        rng = _rng_from(state["rng"])
        log(f"Resuming the search at generation {state['generation']} of {cfg.generations}")
    else:
        rng = random.Random(seed)
        starts = space.initial(rng)
        parent = starts[0]
        if len(starts) > 1:  # several random starting points: keep the best on the first stage's tokens
            idx = rng.sample(range(num_windows), stages[0][1] // seq_len)
            parent = min(starts, key=lambda c: fitness(c, idx))
        state = {"fingerprint": fingerprint, "generation": 0, "parent": list(parent), "history": []}

    from tqdm import tqdm

    bar = tqdm(total=cfg.generations, initial=state["generation"], desc="EvoPress", unit="gen", disable=not progress)
    while state["generation"] < cfg.generations:
        parent = tuple(state["parent"])
        offspring: list[Levels] = []
        for _ in range(50 * cfg.offspring):  # small spaces may have fewer distinct neighbours than asked for
            if len(offspring) == cfg.offspring:
                break
            child = mutate(parent, space, rng, cfg.max_flips)
            if child != parent and child not in offspring:
                offspring.append(child)
        if not offspring:
            raise UserError("compress: no level switch keeps the budget from this starting point (e.g. bits equal to "
                            "bits_min or bits_max, or a single layer); widen the levels or use method: uniform")
        candidates = offspring
        for k, (keep, tokens) in enumerate(stages):
            idx = rng.sample(range(num_windows), tokens // seq_len)
            if k == len(stages) - 1:
                candidates = [*candidates, parent]  # elitism: the parent competes on the same fresh tokens
            scored = sorted(((fitness(c, idx), c) for c in candidates), key=lambda t: t[0])
            candidates = [c for _, c in scored[:keep]]
            best = scored[0][0]
        space.check(candidates[0])
        state["generation"] += 1
        state["parent"] = list(candidates[0])
        state["history"].append({"generation": state["generation"], "fitness": best,
                                 "improved": tuple(candidates[0]) != parent})
        state["rng"] = list(rng.getstate())
        _save(state_path, state)
        bar.set_postfix(fitness=f"{best:.4g}")
        bar.update(1)
    bar.close()
    return state
