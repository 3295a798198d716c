"""Write the version lock that scripts/install.sh installs by default: every package aligntool (with its dev extras)
needs, directly or through its dependencies, at the version installed in this environment.

    python3 scripts/lock_versions.py > requirements-lock.txt

Run it in an environment where the test suite passed and the README figures were measured (they depend on these
versions: see README, "Reproducible figures"). torch is left out (and so are the packages only torch needs):
scripts/install.sh chooses it: the CPU wheel torch==2.13.0, or the CUDA build a GPU machine has.
"""

from __future__ import annotations

import sys
from importlib import metadata

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT, EXTRAS = "aligntool", ("dev", "deepspeed", "bitsandbytes", "plots", "trackers", "lm-eval", "compressed-tensors")
SKIP = {"torch"}  # chosen by install.sh, with its own dependencies


def closure() -> dict[str, str]:
    """{name: installed version} over the dependency graph of ROOT[EXTRAS], markers evaluated for this machine."""
    found: dict[str, str] = {}
    todo = [(ROOT, set(EXTRAS))]
    while todo:
        name, extras = todo.pop()
        for text in metadata.requires(name) or []:
            req = Requirement(text)
            env_extras = extras or {""}
            if req.marker and not any(req.marker.evaluate({"extra": e}) for e in env_extras):
                continue
            key = canonicalize_name(req.name)
            if key in SKIP or key == ROOT:
                continue
            try:
                version = metadata.version(req.name)
            except metadata.PackageNotFoundError:
                sys.exit(f"lock_versions: {req.name} (needed by {name}) is not installed: install with "
                         "`bash scripts/install.sh --dev --latest` first")
            if key not in found:
                found[key] = version
                todo.append((req.name, set(req.extras)))
            elif req.extras:
                todo.append((req.name, set(req.extras)))
    return found


if __name__ == "__main__":
    versions = closure()
    print("# Tested versions (scripts/lock_versions.py); scripts/install.sh installs these unless given --latest.")
    for name in sorted(versions):
        print(f"{name}=={versions[name]}")
