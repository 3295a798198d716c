"""`aligntool eval --tasks` against lm-evaluation-harness's own CLI: the same model, task and settings, both figures
side by side (for the README). Each side runs in its own subprocess, offline (HF_DATASETS_OFFLINE, HF_HUB_OFFLINE).

    python scripts/lm_eval_parity.py [--model tiny | FOLDER] [--tasks tests/data/lm_eval_task/reviews_mc.yaml]
                                     [--limit N] [--num-fewshot K] [--batch-size 8]

aligntool's side: ``aligntool eval --model M --tasks T --json`` (lm_eval.simple_evaluate, backend hf); lm-eval's:
``lm_eval --model hf --model_args pretrained=FOLDER --tasks T --output_path DIR`` (its results JSON read back).
Exit code 1 when a metric differs by more than 1e-9.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_TASK = REPO / "tests" / "data" / "lm_eval_task" / "reviews_mc.yaml"


def _env() -> dict:
    return {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}


def _extra(args) -> list[str]:
    return [*(["--limit", str(args.limit)] if args.limit is not None else []),
            *(["--num_fewshot", str(args.num_fewshot)] if args.num_fewshot is not None else [])]


def aligntool_side(args, device: str) -> dict:
    cmd = [sys.executable, "-m", "aligntool.cli", "eval", "--model", args.model, "--tasks", args.tasks, "--json",
           "--batch-size", str(args.batch_size), *[a.replace("_", "-") if a.startswith("--") else a
                                                    for a in _extra(args)]]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), check=False)
    if proc.returncode:
        sys.exit(f"aligntool eval failed: {proc.stderr.strip().splitlines()[-1]}")
    return json.loads(proc.stdout)["tasks"]


def lm_eval_side(args, folder: str, device: str) -> dict:
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args", f"pretrained={folder}", "--tasks",
               args.tasks, "--device", device, "--batch_size", str(args.batch_size), "--output_path", out,
               *_extra(args)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), check=False)
        if proc.returncode:
            sys.exit(f"lm_eval failed: {proc.stderr.strip().splitlines()[-1]}")
        files = glob.glob(os.path.join(out, "**", "results_*.json"), recursive=True)
        results = json.loads(Path(files[0]).read_text())["results"]
    return {task: {k.partition(",")[0]: v for k, v in metrics.items()
                   if isinstance(v, (int, float)) and k.partition(",")[2] in ("", "none") and k != "sample_len"}
            for task, metrics in results.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--tasks", default=str(DEFAULT_TASK))
    parser.add_argument("--limit", type=float, default=None)
    parser.add_argument("--num-fewshot", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    import torch

    from aligntool.models import resolve

    folder = resolve(args.model, key="--model", log=lambda m: print(m, file=sys.stderr))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    ours, theirs = aligntool_side(args, device), lm_eval_side(args, folder, device)
    print(f"model {args.model} ({folder}), device {device}, tasks {args.tasks}")
    print(f"{'task':<28} {'metric':<16} {'aligntool eval':>15} {'lm_eval CLI':>12}")
    worst = 0.0
    for task, metrics in theirs.items():
        for metric, value in metrics.items():
            mine = ours.get(task, {}).get(metric)
            worst = max(worst, abs(mine - value) if mine is not None else float("inf"))
            shown = f"{mine:.6f}" if mine is not None else "missing"
            print(f"{task:<28} {metric:<16} {shown:>15} {value:>12.6f}")
    print(f"largest difference: {worst:.3g}")
    return 0 if worst <= 1e-9 else 1


if __name__ == "__main__":
    sys.exit(main())
