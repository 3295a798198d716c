"""Install anywhere (issue 29): the sdist and the wheel build (`python -m build`), `twine check` passes, the wheel holds
every file the CLI reads at run time, and the wheel installed non-editable in a fresh virtual environment runs the
README quickstart (train, eval) and `aligntool init` from a directory that is not the repository.

A system test (slow: a build, a venv, a training run): `python3 -m pytest -m system tests/test_wheel.py`. The venv
reuses this environment's packages (--system-site-packages: torch, transformers, ...) and gets the wheel with
`pip install --no-deps --no-index`: no network. This environment may hold an editable install of a checkout; the
test asserts that the venv's own copy is the one imported."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from conftest import REPO

pytestmark = pytest.mark.system

PACKAGE = REPO / "aligntool"
# not part of a build: caches, earlier builds, runs, environments, the git folder
IGNORE = shutil.ignore_patterns(".git", "__pycache__", "*.egg-info", "build", "dist", "runs", ".venv*",
                                ".pytest_cache", ".ruff_cache", "shared")


def _run(cmd, cwd, env=None, timeout=600) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc


def _runtime_dirs() -> set[str]:
    """The folders beside a module that the package reads at run time: ``Path(__file__)...parent / "NAME"`` in its
    source, relative to the package (e.g. recipes, chat_templates)."""
    found = set()
    pattern = re.compile(r"Path\(__file__\)(?:\.resolve\(\))?\.parent\s*/\s*[\"']([^\"']+)[\"']")
    for path in PACKAGE.rglob("*.py"):
        for name in pattern.findall(path.read_text(encoding="utf-8")):
            found.add((path.parent / name).relative_to(PACKAGE).as_posix())
    return found


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict:
    """sdist + wheel of a copy of the source tree (the build writes egg-info beside the sources: not in the repo)."""
    root = tmp_path_factory.mktemp("wheel")
    src, dist = root / "src", root / "dist"
    shutil.copytree(REPO, src, ignore=IGNORE)
    # --no-isolation: the setuptools installed here (the isolated build would download one)
    _run([sys.executable, "-m", "build", "--no-isolation", "--sdist", "--wheel", "--outdir", dist, src], cwd=root)
    wheels, sdists = sorted(dist.glob("*.whl")), sorted(dist.glob("*.tar.gz"))
    assert len(wheels) == 1 and len(sdists) == 1, list(dist.iterdir())
    return {"root": root, "dist": dist, "wheel": wheels[0], "sdist": sdists[0]}


@pytest.fixture(scope="module")
def venv(built) -> dict:
    """A fresh venv with the wheel installed (not editable), and an environment for commands run in it."""
    env_dir = built["root"] / "venv"
    _run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", env_dir], cwd=built["root"])
    python = env_dir / "bin" / "python"
    # pip from the system site installs into the venv (the running interpreter's prefix); --force-reinstall: the
    # system site's aligntool has the same version, which pip would otherwise call satisfied
    _run([python, "-m", "pip", "install", "--no-deps", "--no-index", "--force-reinstall", built["wheel"]],
         cwd=built["root"])
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["PATH"] = f"{env_dir / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    work = built["root"] / "elsewhere"  # an unrelated directory: not the repository, no recipes/ beside it
    work.mkdir()
    return {"dir": env_dir, "python": python, "cli": env_dir / "bin" / "aligntool", "env": env, "work": work}


def test_sdist_and_wheel_pass_twine_and_hold_the_runtime_files(built):
    _run([sys.executable, "-m", "twine", "check", "--strict", built["wheel"], built["sdist"]], cwd=built["root"])
    names = set(zipfile.ZipFile(built["wheel"]).namelist())
    for folder, pattern in (("recipes", "*.yaml"), ("chat_templates", "*.jinja")):
        expected = {f"aligntool/{folder}/{p.name}" for p in (PACKAGE / folder).glob(pattern)}
        assert expected and expected <= names, sorted(expected - names)
    runtime = _runtime_dirs()
    assert {"recipes", "chat_templates"} <= runtime, runtime
    for folder in runtime:  # every folder a module reads beside itself is in the wheel, with what it holds
        shipped = {n for n in names if n.startswith(f"aligntool/{folder}/")}
        source = {f"aligntool/{p.relative_to(PACKAGE).as_posix()}" for p in (PACKAGE / folder).rglob("*")
                  if p.is_file() and "__pycache__" not in p.parts}
        assert source and source <= shipped, (folder, sorted(source - shipped))
    # every module of the package is in the wheel
    modules = {f"aligntool/{p.relative_to(PACKAGE).as_posix()}" for p in PACKAGE.rglob("*.py")}
    assert modules <= names, sorted(modules - names)


def test_the_installed_copy_is_imported(venv):
    proc = _run([venv["python"], "-c", "import aligntool, aligntool.registry as r; print(aligntool.__file__); "
                 "print(r.RECIPES_DIR)"], cwd=venv["work"], env=venv["env"])
    module, recipes = (Path(line) for line in proc.stdout.split())
    assert module.is_relative_to(venv["dir"]), f"imported {module}, not the venv's copy"
    assert recipes.is_relative_to(venv["dir"]) and sorted(p.name for p in recipes.glob("*.yaml")) == sorted(
        p.name for p in (PACKAGE / "recipes").glob("*.yaml"))
    head = Path(venv["cli"]).read_text().splitlines()[0]
    assert head.startswith("#!") and str(venv["dir"]) in head  # the console script runs the venv's interpreter


def test_quickstart_and_init_from_an_unrelated_directory(venv):
    """README's quickstart (shortened): train the built-in dpo recipe, evaluate it against the tiny model; then
    `aligntool init dpo` writes the recipe for editing."""
    cli, work, env = venv["cli"], venv["work"], venv["env"]
    proc = _run([cli, "train", "--recipe", "dpo", "train.max_steps=10", "train.save_steps=10", "dataset.toy.size=160"],
                cwd=work, env=env)
    out = work / "runs" / "dpo"
    assert (out / "model.safetensors").is_file() and (out / "summary.json").is_file(), proc.stderr[-2000:]
    proc = _run([cli, "eval", "--model", "runs/dpo", "--reference", "tiny", "--num-prompts", "8", "--json"],
                cwd=work, env=env)
    import json

    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["data"]["rows"] == 8 and "gold_reward_gain" in result
    _run([cli, "init", "dpo"], cwd=work, env=env)
    text = (work / "dpo.yaml").read_text()
    assert text.startswith("# Written by `aligntool init dpo`") and "algorithm: dpo" in text
    # it loads back (in the venv) to the built-in recipe
    _run([venv["python"], "-c", "from aligntool.recipe.loader import load_recipe as L; "
          "assert L('dpo.yaml').resolved() == L('dpo').resolved()"], cwd=work, env=env)
