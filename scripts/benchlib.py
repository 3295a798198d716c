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
