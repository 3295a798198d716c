"""Seeded fuzzing of what users type and bring: corrupted recipes and corrupted dataset rows. Whatever the damage,
`aligntool train` either trains (the damage left a valid input) or ends in one line with exit code 2 and no
traceback, and a failed run leaves no model, summary or checkpoint behind."""

import json
import random

import pytest

from aligntool.cli import main

RECIPE = """\
train:
  max_steps: 1
  per_device_train_batch_size: 2
  learning_rate: 1.0e-4
  logging_steps: 1
dataset:
  path: {data}
output_dir: {out}
model:
  name_or_path: tiny
algo:
  beta: 0.1
  loss_type: sigmoid
algorithm: dpo
"""  # the keys that keep a run short come first and `algorithm` last: a cut file that still loads stays cheap
JUNK = ["[", "{a", "- x", "!!python/none", "-3", "0", ".nan", ".inf", "'open", "\x00", "a: b: c", "[1, 2]", "{}", "~",
        "true", "9" * 40, "\u00fc\u00df", "*alias", "&anchor x", "%YAML 1.1", "\t"]
CELL_JUNK = [None, 5, 3.2, True, [], {}, [1, 2], {"role": "user"}, [{"role": "user"}], [{"content": 3, "role": "x"}]]


def mutate_recipe(text: str, rng: random.Random) -> bytes:
    lines = text.splitlines()
    op = rng.choice(["value", "delete", "duplicate", "bytes", "truncate", "indent"])
    i = rng.randrange(len(lines))
    if op == "value" and ":" in lines[i]:
        key = lines[i].split(":", 1)[0]
        lines[i] = f"{key}: {rng.choice(JUNK)}"
    elif op == "delete":
        del lines[i]
    elif op == "duplicate":
        lines.insert(rng.randrange(len(lines) + 1), lines[i])
    elif op == "indent":
        lines[i] = " " * rng.randint(1, 5) + lines[i]
    elif op == "truncate":
        return "\n".join(lines).encode()[: rng.randrange(1, len(text))]
    else:
        raw = bytearray("\n".join(lines).encode())
        raw[rng.randrange(len(raw)):rng.randrange(len(raw))] = bytes(
            rng.randrange(256) for _ in range(rng.randint(1, 6)))
        return bytes(raw)
    return ("\n".join(lines) + "\n").encode()


def mutate_rows(rows: list[dict], rng: random.Random) -> bytes:
    """Always an invalid dataset: bad cells, or a damaged line."""
    rows = [dict(r) for r in rows]
    op = rng.choice(["cells", "cells", "line"])
    lines = [json.dumps(r) for r in rows]
    if op == "cells":
        for _ in range(rng.randint(1, 3)):
            rows[rng.randrange(len(rows))][rng.choice(["prompt", "chosen", "rejected"])] = rng.choice(CELL_JUNK)
        lines = [json.dumps(r) for r in rows]
        return ("\n".join(lines) + "\n").encode()
    i = rng.randrange(len(lines))
    damage = rng.choice(["cut", "utf8", "array", "garbage"])
    line = lines[i].encode()
    if damage == "cut":
        line = line[: rng.randrange(1, len(line) - 1)]
    elif damage == "utf8":
        line = line[:10] + b"\xff\xfe" + line[10:]
    elif damage == "array":
        line = b"[1, 2, 3]"
    else:
        line = bytes(rng.randrange(33, 127) for _ in range(12))
    out = [x.encode() for x in lines]
    out[i] = line
    return b"\n".join(out) + b"\n"


def check(capsys, args, out):
    code = main(args)
    err = capsys.readouterr().err
    assert code in (0, 2), err[-2000:]
    if code == 2:
        last = err.strip().splitlines()[-1]
        assert "Traceback" not in err and last.startswith("aligntool: error: ") and last.count("\n") == 0, err
        left = {p.name for p in out.iterdir()} if out.exists() else set()
        assert not left & {"model.safetensors", "summary.json", "checkpoints", ".aligntool.lock"}, left
    return code


@pytest.fixture(scope="module")
def good_rows():
    from aligntool.toy import world

    return [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in world.preference_pairs(6, seed=9)]


@pytest.mark.parametrize("seed", range(40))
def test_corrupted_recipes(seed, capsys, tmp_path, tiny_path, good_rows, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a recipe that lost its output_dir line writes to runs/dpo here
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in good_rows))
    out = tmp_path / "out"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_bytes(mutate_recipe(RECIPE.format(data=data, out=out), random.Random(seed)))
    check(capsys, ["train", "--recipe", str(recipe)], out)


@pytest.mark.parametrize("seed", range(40))
def test_corrupted_dataset_rows(seed, capsys, tmp_path, tiny_path, good_rows, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = tmp_path / "pairs.jsonl"
    data.write_bytes(mutate_rows(good_rows, random.Random(seed)))
    out = tmp_path / "out"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE.format(data=data, out=out))
    assert check(capsys, ["train", "--recipe", str(recipe)], out) == 2
