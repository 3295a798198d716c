"""Size limits of the package's code: no module longer than 500 lines, no function (or method) longer than 80, so
that each reads in one sitting. A function's length runs from its ``def`` to its last line (nested functions count
towards the one they are in)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "aligntool"
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 80


def _modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def _name(path: Path) -> str:
    return path.relative_to(PACKAGE).as_posix()


def _functions(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node


def test_no_module_longer_than_500_lines():
    long = {_name(p): n for p in _modules() if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES}
    assert not long, f"modules over {MAX_MODULE_LINES} lines: {long}"


def test_no_function_longer_than_80_lines():
    long = []
    for path in _modules():
        for fn in _functions(ast.parse(path.read_text())):
            first = min([fn.lineno, *(d.lineno for d in fn.decorator_list)])
            if fn.end_lineno - first + 1 > MAX_FUNCTION_LINES:
                long.append(f"{_name(path)}:{fn.lineno} {fn.name} ({fn.end_lineno - first + 1} lines)")
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"
