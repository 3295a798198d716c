"""Shared by the benchmark scripts: run one side in a fresh process, so the sides never share memory or caches."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile


def run_worker(script: str, side: str, *args: str) -> dict:
    """``python SCRIPT --worker SIDE --out TMP ARGS...``; the worker prints its result as the last line, in JSON."""
    with tempfile.TemporaryDirectory() as out:
        proc = subprocess.run([sys.executable, script, "--worker", side, "--out", out, *args], capture_output=True,
                              text=True)
        if proc.returncode != 0:
            sys.exit(f"{side} run failed:\n{proc.stderr[-3000:]}")
        return json.loads(proc.stdout.strip().splitlines()[-1])


def add_online_arguments(ap, batch_help: str = "prompts per iteration") -> None:
    """The arguments every online-RL benchmark shares: iterations, batch, new tokens, repeats and the model (the tiny
    model, a folder, or a widened random-init copy of the tiny model)."""
    ap.add_argument("--iterations", type=int, default=12)
    ap.add_argument("--batch-size", type=int, default=32, help=batch_help)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--hidden-size", type=int, help="benchmark a random-init copy of the tiny model widened to this "
                    "hidden size (512 with --layers 8: 27.6 M parameters), so that model memory is not dwarfed by "
                    "the runtime's")
    ap.add_argument("--layers", type=int, default=8, help="layers of the --hidden-size model")


def run_on_benchmark_model(a, compare) -> None:
    """Build the model first (outside the timed runs): ``a.model`` itself, or with ``--hidden-size`` a random-init
    copy of it widened to that size (kept for the duration of ``compare(a)``); then run ``compare(a)``."""
    from aligntool import models

    models.resolve(a.model)
    with tempfile.TemporaryDirectory() as scaled:
        if a.hidden_size:
            from aligntool.toy.tiny import widened_copy

            a.label = f"{a.model} widened to hidden {a.hidden_size}, {a.layers} layers (random init)"
            a.model = widened_copy(str(models.resolve(a.model)), a.hidden_size, a.layers, scaled)
        compare(a)


def rss_mb(field: str) -> float | None:
    """A /proc/self/status memory field (VmRSS, VmHWM) in MB; None where /proc is missing."""
    from pathlib import Path

    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None
