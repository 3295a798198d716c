"""`aligntool recipes` and the structural recipe checks (unknown keys with did-you-mean, types, ranges) work where torch
is absent (a login node): run in a subprocess whose imports of torch, transformers, TRL, accelerate and PEFT fail.
Checks of a value against a list only TRL knows (the DPO / GRPO / KTO / CPO loss types) come after the structural
ones, in the loader's second pass, and may import TRL."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import REPO

BLOCKED = ("torch", "transformers", "trl", "accelerate", "peft")

CHILD = r'''
import importlib.abc, json, sys

BLOCKED = set(sys.argv[1].split(","))


class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"blocked for this test: {name}")
        return None


sys.meta_path.insert(0, Blocker())
assert not BLOCKED & set(sys.modules), "imported before the test began"

import contextlib, io

from aligntool.cli import main
from aligntool.errors import UserError
from aligntool.recipe.loader import load_recipe
from aligntool.registry import ALGORITHMS

out = {"errors": {}, "loaded": {}}
listing = io.StringIO()
with contextlib.redirect_stdout(listing):
    out["recipes_rc"] = main(["recipes"])
out["recipes"] = listing.getvalue()


def error(recipe, overrides):
    try:
        load_recipe(recipe, overrides)
    except UserError as exc:
        return str(exc)
    except ImportError as exc:
        return f"ImportError: {exc}"
    return None


for name, spec in ALGORITHMS.items():
    fields = list(spec.load().AlgoConfig.model_fields)  # the method module imports no torch or TRL
    out["errors"][name] = {
        "algo_key": [fields[0], error(spec.recipe, [f"algo.{fields[0]}x=1"])],
        "top_key": error(spec.recipe, ["modle.name_or_path=tiny"]),
        "range": error(spec.recipe, ["train.max_steps=0"]),
        "type": error(spec.recipe, ["train.seed=abc"]),
    }
    # a valid recipe: loads, or stops at a check against TRL's own list (after the structural pass)
    out["loaded"][name] = error(spec.recipe, [])
for case, overrides in {"beta_range": ["algo.beta=-1"], "beta_type": ["algo.beta=abc"],
                        "label_smoothing": ["algo.label_smoothing=0.5"]}.items():
    out["errors"]["dpo:" + case] = error("dpo", overrides)
out["errors"]["ppo:lam"] = error("ppo", ["algo.lam=2"])
out["errors"]["grpo:num_generations"] = error("grpo", ["algo.num_generations=1"])
out["modules"] = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
print(json.dumps(out))
'''


def _run_blocked() -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", CHILD, ",".join(BLOCKED)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_recipes_and_structural_checks_without_torch():
    from aligntool.registry import ALGORITHMS

    out = _run_blocked()
    assert out["modules"] == []
    assert out["recipes_rc"] in (0, None)
    for name, spec in ALGORITHMS.items():
        assert name in out["recipes"] and spec.recipe in out["recipes"]
        errors = out["errors"][name]
        field, message = errors["algo_key"]
        assert message and f"unknown key 'algo.{field}x' (did you mean '{field}'?)" in message, (name, message)
        assert "unknown key 'modle' (did you mean 'model'?)" in errors["top_key"], (name, errors["top_key"])
        assert "train.max_steps: input should be greater than 0" in errors["range"], (name, errors["range"])
        assert "train.seed: input should be a valid integer" in errors["type"], (name, errors["type"])
        loaded = out["loaded"][name]
        assert loaded is None or loaded.startswith("ImportError: blocked for this test: trl"), (name, loaded)
    assert "algo.beta: input should be greater than 0" in out["errors"]["dpo:beta_range"]
    assert "algo.beta: input should be a valid number" in out["errors"]["dpo:beta_type"]
    assert "algo.label_smoothing: input should be less than 0.5" in out["errors"]["dpo:label_smoothing"]
    assert "algo.lam: input should be less than or equal to 1" in out["errors"]["ppo:lam"]
    assert "algo.num_generations: input should be greater than or equal to 2" in \
        out["errors"]["grpo:num_generations"]
    # the methods without a TRL list load in full
    assert out["loaded"]["ppo"] is None and out["loaded"]["sft"] is None
