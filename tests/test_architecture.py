"""The layer table of docs/ARCHITECTURE.md is the specification of the package's imports; this test holds the code to
it. Every ``import`` and ``from ... import`` in aligntool/ counts, at module level or inside a function, absolute or
relative: every module is in exactly one layer, no module imports a module of a higher layer, and no two files import
each other, directly or round a longer loop."""

from __future__ import annotations

import ast
import fnmatch
import re
from pathlib import Path

from conftest import REPO

PACKAGE = REPO / "aligntool"
DOC = REPO / "docs" / "ARCHITECTURE.md"


def layer_table(text: str) -> list[tuple[str, list[str]]]:
    """(layer, path patterns under aligntool/) for each row of the table under '## Layers', from the top layer down.
    The patterns are the backticked words of the second column: ``cli.py``, ``online/*`` (a folder and everything
    under it)."""
    section = text.split("\n## Layers", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not line.startswith("|") or len(cells) < 2 or set(cells[0]) <= set("-: ") or cells[0] == "layer":
            continue
        rows.append((cells[0], re.findall(r"`([^`]+)`", cells[1])))
    return rows


def module_name(path: Path, package: Path) -> str:
    parts = list(path.relative_to(package.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules(package: Path) -> dict[str, Path]:
    return {module_name(p, package): p for p in sorted(package.rglob("*.py"))}


def imports(path: Path, package: Path, known: dict[str, Path]) -> set[str]:
    """The aligntool modules ``path`` imports anywhere in its body (functions included). ``from a.b import c`` counts
    as an import of ``a.b.c`` when that is a module, else of ``a.b``; a package's ``__init__`` that Python runs on
    the way to a submodule is not counted (it is not what the code asked for)."""
    name = module_name(path, package)
    parent = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = parent.split(".")
                base = base[:len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for alias in node.names:
                found.add(f"{source}.{alias.name}" if f"{source}.{alias.name}" in known else source)
    resolved = set()
    for target in found:
        if target != "aligntool" and not target.startswith("aligntool."):
            continue
        while target not in known:  # an attribute path (import aligntool.x.y where y is not a module)
            target = target.rpartition(".")[0]
        if target != name:
            resolved.add(target)
    return resolved


def layers_of(path: Path, package: Path, table) -> list[int]:
    rel = path.relative_to(package).as_posix()
    return [i for i, (_, patterns) in enumerate(table) if any(fnmatch.fnmatchcase(rel, p) for p in patterns)]


def violations(table, package: Path = PACKAGE) -> list[str]:
    """Every broken rule, one line each (empty: the code follows the table)."""
    known, found = modules(package), []
    for layer, patterns in table:
        for p in patterns:
            if not any(fnmatch.fnmatchcase(path.relative_to(package).as_posix(), p) for path in known.values()):
                found.append(f"layer {layer!r}: `{p}` names no file")
    rank = {}
    for name, path in known.items():
        at = layers_of(path, package, table)
        if len(at) != 1:
            names = ", ".join(table[i][0] for i in at)
            found.append(f"{path.relative_to(package.parent)}: in {len(at)} layers ({names}); each module belongs "
                         "to exactly one")
        else:
            rank[name] = at[0]
    graph = {name: imports(path, package, known) for name, path in known.items()}
    for name, targets in graph.items():
        for target in sorted(targets):
            if name in rank and target in rank and rank[target] < rank[name]:  # rows run from the top layer down
                found.append(f"{name} ({table[rank[name]][0]}) imports {target} ({table[rank[target]][0]}), a higher "
                             "layer")
    found += [f"import loop: {' -> '.join(loop)}" for loop in loops(graph)]
    return found


def loops(graph: dict[str, set[str]]) -> list[list[str]]:
    """One loop through each strongly connected group of two or more modules (Tarjan's algorithm)."""
    index, low, stack, on_stack, groups = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(set(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    found = []
    for group in groups:  # a path from the group's first module back to itself, inside the group
        start = min(group)
        paths, seen = [[start]], {start}
        while paths:
            path = paths.pop(0)
            nxt = sorted(w for w in graph[path[-1]] if w in group)
            if start in nxt:
                found.append([*path, start])
                break
            for w in nxt:
                if w not in seen:
                    seen.add(w)
                    paths.append([*path, w])
    return found


def test_the_layer_table_holds():
    table = layer_table(DOC.read_text(encoding="utf-8"))
    assert len(table) >= 5, table
    problems = violations(table)
    assert not problems, "docs/ARCHITECTURE.md's layer table and the imports disagree:\n" + "\n".join(problems)


def test_the_check_catches_planted_violations(tmp_path):
    """The same check on a copy of the tree with a violation of each kind planted."""
    import shutil

    table = layer_table(DOC.read_text(encoding="utf-8"))
    copy = tmp_path / "aligntool"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))

    def check_copy():
        return violations(table, copy)

    assert check_copy() == []
    steplaw = copy / "recipe" / "steplaw.py"
    steplaw.write_text(steplaw.read_text() + "\n\ndef _planted():\n    from aligntool.online import engine  # noqa\n")
    assert any("aligntool.recipe.steplaw (recipe) imports aligntool.online.engine" in p for p in check_copy())
    steplaw.write_text(steplaw.read_text().replace("from aligntool.online import engine", "from ..train import x"))
    assert any("aligntool.recipe.steplaw (recipe) imports aligntool.train" in p for p in check_copy())
    steplaw.write_text((PACKAGE / "recipe" / "steplaw.py").read_text())
    errors = copy / "errors.py"  # a loop inside one layer: errors <-> outputs
    errors.write_text(errors.read_text() + "\n\ndef _planted():\n    import aligntool.outputs  # noqa\n")
    assert any(p.startswith("import loop: aligntool.errors -> aligntool.outputs -> aligntool.errors")
               for p in check_copy()), check_copy()
    errors.write_text((PACKAGE / "errors.py").read_text())
    (copy / "stray.py").write_text("")
    assert any("stray.py: in 0 layers" in p for p in check_copy())
