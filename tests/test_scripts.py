"""The benchmark and reproduction scripts run end to end (tiny settings) and print / write what they promise."""

import json
import re
import subprocess
import sys

import pytest
from conftest import REPO

pytestmark = pytest.mark.slow


def run_script(name: str, *args: str) -> str:
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / name), *args], capture_output=True, text=True,
                          timeout=900, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_reproduce_overoptimization_quick(tmp_path, tiny_path):
    out = run_script("reproduce_overoptimization.py", "--quick", "--out", str(tmp_path))
    result = json.loads((tmp_path / "overoptimization.json").read_text())
    for obj in ("single", "mean", "wco", "uwo"):
        assert [r["n"] for r in result["bon"][obj]] == [1, 2, 3, 4]
        assert [r["iteration"] for r in result["ppo"][obj]] == [0, 2, 4]
        assert result["ppo"][obj][0]["kl"] == pytest.approx(0.0, abs=1e-4)  # iteration 0 is the reference itself
    # same samples, same gold scores: at n = 1 every objective picks a uniformly random sample
    golds = {round(result["bon"][obj][0]["gold"], 6) for obj in ("single", "mean", "wco", "uwo")}
    assert len(golds) == 1
    assert (tmp_path / "overoptimization.png").stat().st_size > 10_000
    assert "drop from peak" in out


@pytest.mark.system  # ~50 s each on 2 cores: in the system stage (scripts/ci_system.sh)
def test_bench_remax_vs_ppo_prints_ratios(tiny_path):
    out = run_script("bench_remax_vs_ppo.py", "--iterations", "3", "--repeats", "1", "--batch-size", "4",
                     "--max-new-tokens", "8")
    for side in ("remax", "ppo", "ppo-critic"):  # one row per run; the figures themselves are not judged
        assert re.search(rf"^\s+1\s+{side}\s+[\d.]+\s+", out, re.M), out
    for side in ("ppo", "ppo-critic"):
        assert re.search(rf"ReMax/{side}\s+time per iteration [\d.]+\s+training memory ([\d.]+|nan)", out), out
    for side in ("remax", "ppo", "ppo-critic"):  # the distance to the hardware (benchlib; counted in test_benchlib)
        assert re.search(rf"^{side}: per iteration .* = [\d.]+% of measured matmul peak [\d.]+ GFLOP/s", out, re.M), out


@pytest.mark.system  # ~50 s each on 2 cores: in the system stage (scripts/ci_system.sh)
def test_bench_online_vs_trl_prints_ratios(tiny_path):
    out = run_script("bench_online_vs_trl.py", "--iterations", "3", "--repeats", "1", "--batch-size", "2",
                     "--max-new-tokens", "4")
    for side in ("remax", "reinforce_pp", "grpo", "rloo"):  # one row per run; the figures themselves are not judged
        assert re.search(rf"^\s+1\s+{side}\s+[\d.]+\s+", out, re.M), out
    for pair in ("remax/grpo", "remax/rloo", "reinforce_pp/grpo", "reinforce_pp/rloo"):
        assert re.search(rf"{pair}\s+time per generated token [\d.]+\s+time per iteration [\d.]+", out), out
    for side in ("remax", "reinforce_pp", "grpo", "rloo"):
        assert re.search(rf"^generation of {side} .* = [\d.]+% of measured matmul peak", out, re.M), out


def test_bench_compress_prints_both_comparisons(tiny_path):
    out = run_script("bench_compress.py", "--quick", "--models", "tiny")
    for what, first, second in (("sparsity", "EvoPress", "uniform"), ("quant", "EvoPress", "uniform RTN"),
                                ("codebook", "JLCM", "RTN")):
        for label in (first, second):  # one row per run; the figures themselves are not judged
            assert re.search(rf"^\s+tiny\s+{what}\s+{label}\s+[\d.]+\s+[\d.]+", out, re.M), out
        assert re.search(rf"tiny {first}/{second} \({what}\): KL ratio [\d.]+, ppl ratio [\d.]+", out), out
