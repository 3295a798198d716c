"""Command-line usage errors and what is printed before an error (issue 26, items 9-11): every mistake on the command
line is one line on stderr and exit code 2, with nothing (no traceback, no library chatter, no progress bar) before
it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from conftest import REPO, user_error

from aligntool.cli import app, main
from aligntool.recipe.loader import resolve_recipe_path

# (argv, words the one line must contain): at least one usage error of every command
USAGE_ERRORS = [
    (["--foo"], ["No such option: --foo", "aligntool --help"]),
    (["trian"], ["No such command 'trian'", "'train'"]),
    (["train"], ["Missing option '--recipe'", "aligntool train --help"]),
    (["train", "--recipe", "dpo", "--nproc", "abc"], ["Invalid value for '--nproc'"]),
    (["train", "--recip", "dpo"], ["--recip", "did you mean --recipe?"]),
    (["train", "--recipe", "dpo", "--node-rank", "-1"], ["--node-rank"]),
    (["train", "--config_file", "zero3.yaml", "--recipe", "dpo"],
     ["--config_file", "accelerate launch --config_file FILE -m aligntool.cli train", "distributed.backend"]),
    (["train", "--num_processes", "2", "--recipe", "dpo"], ["accelerate launch", "--nproc"]),
    (["merge-lora"], ["Missing argument", "aligntool merge-lora --help"]),
    (["merge-lora", "adapter", "--out", "x", "--bogus"], ["No such option: --bogus"]),
    (["slurm", "--recipe", "dpo"], ["Missing option '--time'"]),
    (["slurm", "--recipe", "dpo", "--time", "1:00:00", "--nodes", "0"], ["--nodes"]),
    (["compress"], ["Missing option '--recipe'", "aligntool compress --help"]),
    (["compress", "--recipe", "compress_quant", "--resum"], ["--resum", "did you mean --resume?"]),
    (["unpack"], ["Missing argument 'PACKED'"]),
    (["unpack", "packed"], ["Missing option '--out'"]),
    (["export"], ["Missing argument 'OUTPUT'"]),
    (["eval", "--model", "tiny", "--num-promts", "3"], ["--num-promts", "did you mean --num-prompts?"]),
    (["eval"], ["Missing option '--model'"]),
    (["eval", "--model", "tiny", "--samples", "many"], ["--samples"]),
    (["soup", "a", "b"], ["Missing option '--out'"]),
    (["soup", "a", "b", "--out", "c", "--weight", "half"], ["--weight"]),
    (["bon", "--n", "0"], ["Invalid value for '--n'"]),
    (["bon", "--num-prompt", "4"], ["did you mean --num-prompts?"]),
    (["suggest", "--params", "many"], ["--params"]),
    (["suggest", "--nproc", "0"], ["--nproc"]),
    (["recipes", "--all"], ["No such option: --all", "aligntool recipes --help"]),
    (["recipes", "dpo"], ["unexpected extra argument"]),
    (["doctor", "--jsn"], ["did you mean --json?"]),
    (["tiny", "--force"], ["No such option: --force", "aligntool tiny --help"]),
    (["init"], ["Missing argument 'NAME'", "aligntool init --help"]),
    (["init", "dpo", "--overwrit"], ["did you mean --overwrite?"]),
    (["push", "runs/dpo"], ["Missing option '--repo-id'", "aligntool push --help"]),
]


@pytest.mark.parametrize("argv,words", USAGE_ERRORS, ids=[" ".join(a) for a, _ in USAGE_ERRORS])
def test_usage_error_is_one_line_and_exit_code_2(capsys, argv, words):
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == 2, err
    assert out == "", out
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("aligntool: error: "), err
    for word in words:
        assert word in lines[0], (word, lines[0])


def test_every_command_has_a_usage_error_case():
    commands = set(typer.main.get_command(app).commands)
    tested = {argv[0] for argv, _ in USAGE_ERRORS if not argv[0].startswith("-")}
    assert commands <= tested, commands - tested


def test_usage_error_with_debug_keeps_the_traceback():
    with pytest.raises(typer.TyperException):
        main(["train", "--recipe", "dpo", "--nproc", "abc", "--debug"])


def test_no_arguments_prints_the_help(capsys):
    assert main([]) == 0
    out, err = capsys.readouterr()
    assert "train" in out and "Usage" in out and err == ""


# --recipe: a did-you-mean over the built-in recipe names and over the YAML files of the folder named
@pytest.mark.parametrize("recipe,suggestion", [
    ("dop", "'dpo'"), ("dpo.yaml", "'dpo'"), ("sft-pass-at-n", "'sft_pass_at_n'"),
    ("compress_qant", "'compress_quant'"), ("aligntool/recipes/dop.yaml", "'aligntool/recipes/dpo.yaml'")])
def test_recipe_name_typo_suggests_the_closest(monkeypatch, recipe, suggestion):
    monkeypatch.chdir(REPO)
    message = user_error(resolve_recipe_path, recipe)
    assert "recipe file not found" in message and "did you mean" in message and suggestion in message, message


def test_a_recipes_folder_path_of_a_built_in_recipe_points_to_its_name(monkeypatch, tmp_path):
    """`--recipe recipes/dpo.yaml` (the path in a clone before the recipes moved into the package) where there is no
    such folder: the one line names `--recipe dpo`."""
    monkeypatch.chdir(tmp_path)
    message = user_error(resolve_recipe_path, "recipes/dpo.yaml")
    assert "recipe file not found" in message and "--recipe dpo" in message, message


def test_unknown_recipe_name_says_where_the_built_in_names_are(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    message = user_error(resolve_recipe_path, "zzzz")
    assert "no built-in recipe" in message and "aligntool recipes" in message, message


# a real console script, as a user (and the project's stop hook) runs it: exactly one line, nothing before it


def _console(tmp_path, *args, **env) -> subprocess.CompletedProcess:
    script = Path(sys.executable).with_name("aligntool")
    cmd = [str(script)] if script.is_file() else [shutil.which("aligntool") or "aligntool"]
    environ = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
               **env}
    return subprocess.run([*cmd, *args], capture_output=True, text=True, cwd=tmp_path, env=environ, timeout=300)


def _one_line(proc: subprocess.CompletedProcess, *words: str) -> str:
    both = proc.stdout + proc.stderr
    assert proc.returncode == 2, both[-3000:]
    lines = [line for line in both.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("aligntool: error: "), both[-3000:]
    assert "\r" not in both, repr(both[-3000:])  # no progress bar drawn and erased
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


def test_console_script_misspelt_command(tmp_path):
    _one_line(_console(tmp_path, "trian"), "'trian'", "'train'")


def test_console_script_misspelt_recipe_key_is_the_only_output(tmp_path):
    # TRL's import pulls in bitsandbytes, whose kernel loader logged one or two lines before this one
    _one_line(_console(tmp_path, "train", "--recipe", "dpo", "train.learning_rte=1e-5"), "learning_rate")


def test_console_script_missing_column_is_the_only_output(tmp_path):
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"p{i}", "chose": "a", "rejected": "b"}) + "\n" for i in range(4)))
    # a fresh datasets cache: datasets draws its "Generating train split" bar for a file it has not read before;
    # offline, bitsandbytes' kernel loader logged two lines (the kernels package's, then its own)
    proc = _console(tmp_path, "train", "--recipe", "dpo", f"dataset.path={data}", f"output_dir={tmp_path / 'out'}",
                    HF_DATASETS_CACHE=str(tmp_path / "datasets-cache"), HF_HUB_OFFLINE="1")
    _one_line(proc, "chosen", str(data))


def test_bitsandbytes_import_is_quiet_only_while_it_is_imported():
    pytest.importorskip("bitsandbytes")
    code = ("import logging; from aligntool import quiet; quiet.install(); import bitsandbytes; "
            "logging.getLogger('bitsandbytes.later').warning('a warning after the import')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0 and proc.stderr == "a warning after the import\n", proc.stderr


def test_progress_bars_are_restored_after_the_data_checks():
    from datasets.utils import are_progress_bars_disabled

    from aligntool.quiet import no_progress_bars

    before = are_progress_bars_disabled()
    with no_progress_bars():
        inside = are_progress_bars_disabled()
    assert are_progress_bars_disabled() == before
    from datasets import config

    assert inside or config.HF_DATASETS_DISABLE_PROGRESS_BARS is not None
