"""Write README's "Supported models" table from the family matrix's test results (not by hand).

Runs the matrix tests -- every command on every family of aligntool/toy/families.py (tests/test_families.py
::test_matrix) and every compress mode on every family (tests/test_compress_families.py) -- reads pytest's JUnit XML,
and replaces the table between ``<!-- supported-models -->`` and ``<!-- /supported-models -->`` in README.md with one
row per family: a check mark where the cell's test passed, a cross where it failed, a dash where it did not run.
Prints the table and exits 1 if any cell failed.

    python3 scripts/supported_models.py            # about 5 minutes on 2 CPU cores
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from aligntool.outputs import write_atomic  # noqa: E402
from aligntool.toy.families import FAMILIES  # noqa: E402

TESTS = ["tests/test_families.py::test_matrix",
         "tests/test_compress_families.py::test_every_mode_compresses_every_family"]
START, END = "<!-- supported-models -->", "<!-- /supported-models -->"


def commands() -> list[str]:
    from test_compress_families import MODES
    from test_families import COMMANDS

    return [*COMMANDS, *(f"compress {m}" for m in MODES)]


def results(xml: Path) -> dict[tuple[str, str], str]:
    """(family, command) -> 'passed' | 'failed' | 'skipped' from pytest's JUnit XML."""
    out = {}
    for case in ET.parse(xml).getroot().iter("testcase"):
        match = re.search(r"\[(.+)\](@[\w-]+)?$", case.get("name", ""))  # pytest-xdist's loadgroup adds @group
        if not match:
            continue
        parts = match.group(1).split("-", 1)
        if case.get("name").startswith("test_every_mode"):  # ids: <family>-<mode> or <mode>-<family>
            family, mode = parts if parts[0] in FAMILIES else parts[::-1]
            command = f"compress {mode}"
        else:
            family, command = parts
        failed = case.find("failure") is not None or case.find("error") is not None
        out[family, command] = "failed" if failed else "skipped" if case.find("skipped") is not None else "passed"
    return out


def table(cells: dict[tuple[str, str], str]) -> str:
    cmds = commands()
    mark = {"passed": "✓", "failed": "✗", "skipped": "–"}
    head = ["family (transformers class)", *(c.replace("compress ", "compress<br>") for c in cmds),
            "what it needed beyond the tiny Llama"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, fam in FAMILIES.items():
        row = [f"`{name}` ({fam.model_type})", *(mark.get(cells.get((name, c), ""), "–") for c in cmds),
               fam.quirks.replace("|", "\\|")]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        xml = Path(tmp) / "matrix.xml"
        subprocess.run([sys.executable, "-m", "pytest", "-q", *TESTS, f"--junitxml={xml}"], cwd=REPO)
        cells = results(xml)
    text = table(cells)
    readme = REPO / "README.md"
    content = readme.read_text()
    if START in content and END in content:
        before, rest = content.split(START, 1)
        content = before + START + "\n" + text + "\n" + END + rest.split(END, 1)[1]
        write_atomic(readme, content)
    print(text)
    failed = sorted(k for k, v in cells.items() if v == "failed")
    print(f"\n{sum(v == 'passed' for v in cells.values())} cells passed, {len(failed)} failed"
          + (f": {failed}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
