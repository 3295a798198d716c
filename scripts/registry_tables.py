"""Write README's algorithm and capability tables from the registry (aligntool/registry.py), not by hand.

Each table sits between ``<!-- registry:NAME -->`` and ``<!-- /registry -->`` in README.md (NAME: algorithms,
capabilities) and is replaced as a whole. The ``algo`` keys come from each method's ``AlgoConfig`` (so this imports
the method modules). A test runs ``--check``, so a registry entry added or changed without rerunning this fails CI.

    python3 scripts/registry_tables.py            # rewrite the tables in README.md
    python3 scripts/registry_tables.py --check    # exit 1 (naming the tables) when README.md differs
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from aligntool import registry  # noqa: E402

README = REPO / "README.md"
END = "<!-- /registry -->"
BATCH_UNITS = {"rows": "rows of the dataset", "prompts": "prompts per iteration", "completions": "completions",
               "generated": "rows it generates"}
VLLM = {"engine": "aligntool's engine", "trl": "TRL's trainer"}


def cell(text: str) -> str:
    return text.replace("|", "\\|")


def module_path(spec: registry.AlgorithmSpec) -> str:
    return f"`{spec.module.replace('.', '/')}.py`"


def yaml_value(v) -> str:
    return f"[{', '.join(map(str, v))}]" if isinstance(v, (list, tuple)) else str(v)


def algo_keys(spec: registry.AlgorithmSpec, seen: dict[str, str]) -> str:
    """The ``algo`` keys of the method (its AlgoConfig's fields), or "as `dpo`" for a named variant of a module an
    earlier row has, with the variant's preset."""
    preset = ", ".join(f"`{k}: {yaml_value(v)}`" for k, v in spec.algo_defaults.items())
    preset = f"; preset {preset}" if preset else ""
    if spec.module in seen:
        return f"as `{seen[spec.module]}`{preset}"
    seen[spec.module] = spec.name
    fields = spec.load().AlgoConfig.model_fields
    return ", ".join(f"`{k}`" for k in fields) + preset


def algorithms() -> str:
    rows = ["| algorithm | what it is | kind | data | `algo` keys | module |", "|---|---|---|---|---|---|"]
    seen: dict[str, str] = {}
    for spec in registry.ALGORITHMS.values():
        rows.append(f"| `{spec.name}` | {cell(spec.summary)} | {spec.kind} | {spec.data} | {algo_keys(spec, seen)} | "
                    f"{module_path(spec)} |")
    return "\n".join(rows)


def capabilities() -> str:
    rows = ["| algorithm | takes `reward` (samples) | `generation.backend` | `reward.judge` | value head | "
            "`per_device_train_batch_size` counts | ZeRO-3 / FSDP on the engine |", "|---|---|---|---|---|---|---|"]
    yes = {True: "yes", False: "—"}
    for spec in registry.ALGORITHMS.values():
        backends = ", ".join(spec.backends) + (f" ({VLLM[spec.vllm]})" if spec.vllm else "")
        sharded = "—" if spec.kind != "online" else ("yes" if spec.sharded else
                                                     "no: samples from the reference (ddp or ZeRO-2)")
        rows.append(f"| `{spec.name}` | {yes[spec.samples]} | {backends} | {yes[spec.preferences]} | "
                    f"{yes[spec.value_head]} | {BATCH_UNITS[spec.batch_unit]} | {sharded} |")
    return "\n".join(rows)


TABLES = {"algorithms": algorithms, "capabilities": capabilities}


def render(content: str) -> str:
    """README text with every registry table regenerated."""
    for name, make in TABLES.items():
        start = f"<!-- registry:{name} -->"
        if start not in content:
            raise SystemExit(f"README.md: no {start} marker")
        before, rest = content.split(start, 1)
        if END not in rest:
            raise SystemExit(f"README.md: {start} has no {END} after it")
        content = before + start + "\n" + make() + "\n" + END + rest.split(END, 1)[1]
    return content


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="fail when README.md's tables differ from the registry")
    args = ap.parse_args()
    content = README.read_text(encoding="utf-8")
    new = render(content)
    if args.check:
        if new != content:
            print("README.md: the registry tables differ from aligntool/registry.py; run "
                  "python3 scripts/registry_tables.py", file=sys.stderr)
            return 1
        return 0
    if new != content:
        README.write_text(new, encoding="utf-8")
    print(f"README.md: {', '.join(TABLES)} tables {'rewritten' if new != content else 'unchanged'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
