"""The README's user-data demonstration, at toy scale: DPO on a slice of Anthropic's HH-RLHF in its published format
(``harmless-base/test.jsonl.gz``: whole-dialogue ``chosen``/``rejected`` pairs, gzipped JSON lines), a reward model
trained on another slice, and ``aligntool eval --data`` on held-out prompts of a third, before (the base model) and
after DPO, with standard errors.

    python scripts/demo_user_data.py [--out DIR] [--dpo-steps 60] [--rm-steps 60]

The data is tests/data/hh-rlhf/harmless-base-test-800.jsonl.gz (the published file's first 800 rows, MIT license):
DPO trains on rows [0, 400), the reward model on rows [400, 700), and both evaluations use rows [700, 800). The
policy is the built-in tiny model (a 4-layer model with a 640-token vocabulary, never trained on English dialogue),
so the figures say whether the pipeline works on data as published, not how well DPO aligns a real assistant.
Every step is an ``aligntool`` command run as a user would run it (a subprocess); the script prints the commands,
the evaluations' JSON figures and a table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
HH = REPO / "tests" / "data" / "hh-rlhf" / "harmless-base-test-800.jsonl.gz"
DATA = [f"dataset.path={HH}", "dataset.format=hh-rlhf"]


def aligntool(*args: str) -> str:
    """Run ``aligntool ARGS`` (this interpreter's), print the command, return its stdout; stop on failure."""
    command = [sys.executable, "-m", "aligntool.cli", *args]
    print("$ aligntool " + " ".join(args), flush=True)
    start = time.time()
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"demo_user_data: aligntool {args[0]} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    print(f"  ({time.time() - start:.0f} s)", flush=True)
    return done.stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=None, help="Folder for the runs (default: a temporary folder).")
    ap.add_argument("--dpo-steps", type=int, default=60)
    ap.add_argument("--rm-steps", type=int, default=60)
    ap.add_argument("--num-prompts", type=int, default=100, help="Held-out prompts of rows [700, 800) to evaluate.")
    a = ap.parse_args()
    out = a.out or Path(tempfile.mkdtemp(prefix="aligntool-demo-"))
    common = ["model.name_or_path=tiny", "train.max_length=512", "train.seed=0", "dataset.toy.seed=0",
              "train.logging_steps=10", "train.disable_tqdm=true"]

    aligntool("train", "--recipe", "reward", *common, *DATA, "dataset.split=train[400:700]",
              f"train.max_steps={a.rm_steps}", "train.per_device_train_batch_size=8", "train.eval_strategy=no",
              "train.save_steps=1000", f"output_dir={out / 'rm'}", "--overwrite")
    aligntool("train", "--recipe", "dpo", *common, *DATA, "dataset.split=train[:400]", "train.truncation_mode=keep_end",
              f"train.max_steps={a.dpo_steps}", "train.per_device_train_batch_size=8", "train.save_steps=1000",
              f"output_dir={out / 'dpo'}", "--overwrite")
    held_out = ["--data", str(HH), "--data-opt", "format=hh-rlhf", "--split", "train[700:800]", "--json"]
    rm = json.loads(aligntool("eval", "--model", str(out / "rm"), *held_out))
    gen = json.loads(aligntool("eval", "--model", str(out / "dpo"), "--reference", "tiny", "--reward-model",
                               str(out / "rm"), "--num-prompts", str(a.num_prompts), *held_out))
    print(json.dumps({"reward_model": rm, "generation": {k: v for k, v in gen.items() if k != "samples"}}, indent=1))
    print(table(rm, gen))


def table(rm: dict, gen: dict) -> str:
    """The README's figures: the reward model's accuracy on held-out pairs, the reward of the base model's and the DPO
    model's samples on held-out prompts, the paired gain, the win rate and the KL."""
    def pm(mean: float, se: float) -> str:
        return f"{mean:.3f} ± {se:.3f}"

    rows = [
        ("reward model: pairwise accuracy on held-out pairs", pm(rm["pairwise_accuracy"],
                                                                 rm["pairwise_accuracy_stderr"])),
        ("reward of the base model's samples (tiny)", pm(gen["reference_reward"], gen["reference_reward_stderr"])),
        ("reward of the DPO model's samples", pm(gen["reward"], gen["reward_stderr"])),
        ("gain, in standard errors", f"{gen['gain_in_stderrs']:+.2f}"),
        ("win rate of the DPO model over the base", f"{gen['win_rate']:.3f}"),
        ("KL(DPO || base), nats per sequence", pm(gen["kl_to_reference"], gen["kl_to_reference_stderr"])),
    ]
    width = max(len(r[0]) for r in rows)
    data = gen.get("data", {})
    rows_rm = rm.get("data", {}).get("rows", "?")
    head = f"held-out: {data.get('rows', '?')} prompts / {rows_rm} pairs of HH-RLHF rows [700, 800)"
    return "\n".join([head] + [f"{name:<{width}}  {value}" for name, value in rows])


if __name__ == "__main__":
    main()
