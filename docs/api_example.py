"""aligntool's Python API end to end on the built-in tiny model: train from a built-in recipe, from a dict and with a
reward function written in Python, then evaluate and compress. About half a minute on 2 CPU cores; it writes runs/api-*
in the working directory (and replaces them when run again).

    python docs/api_example.py

This file is the README's example as it stands, and tests/test_api.py runs it (docs/API.md has the whole API).
"""

import aligntool
from aligntool.errors import UserError

# 1. A built-in recipe by name. Keyword arguments are recipe keys: a dict merges into its section.
dpo = aligntool.train("dpo", train={"max_steps": 5, "per_device_train_batch_size": 8}, dataset={"toy": {"size": 200}},
                      output_dir="runs/api-dpo", overwrite=True)
print("DPO:", dpo.model_path, "final loss", round(dpo.metrics["train_loss"], 4))

# 2. A recipe as a dict (what a YAML recipe holds); `overrides` are the command line's KEY=VALUE.
recipe = {
    "algorithm": "sft",
    "model": {"name_or_path": "tiny"},
    "dataset": {"path": "toy", "toy": {"size": 200}},
    "train": {"max_steps": 50, "per_device_train_batch_size": 8, "max_length": 64},
    "output_dir": "runs/api-sft",
}
sft = aligntool.train(recipe, overrides=["train.max_steps=5"], overwrite=True)
print("SFT:", sft.summary["global_step"], "steps ->", sft.model_path)


# 3. A reward function in plain Python, called as TRL calls one: the completions (and the prompts and the dataset's
#    other columns) by keyword, one number per completion.
seen = []


def upbeat_and_short(completions, **columns):
    seen.extend(completions)
    return [float("great" in c or "fantastic" in c) - len(c.split()) / 20 for c in completions]


rl = aligntool.train("reinforce_pp", reward={"function": upbeat_and_short}, output_dir="runs/api-rl",
                     train={"max_steps": 2, "per_device_train_batch_size": 8}, algo={"max_new_tokens": 8},
                     overwrite=True)
print("REINFORCE++:", len(seen), "completions rewarded; mean reward of the last batch", round(rl.metrics["reward"], 3))

# 4. Evaluate (the options and the JSON result of `aligntool eval`) and compress (a compress recipe, here by name).
scores = aligntool.evaluate(dpo, reference="tiny", num_prompts=16, max_new_tokens=12)
print(f"gold reward {scores['gold_reward']:.3f} vs tiny {scores['reference_gold_reward']:.3f}, "
      f"win rate {scores['win_rate']:.3f}")
small = aligntool.compress("compress_quant", model={"name_or_path": dpo.model_path}, compress={"method": "uniform"},
                           calibration={"seq_len": 64, "num_sequences": 8, "heldout_sequences": 4},
                           output_dir="runs/api-dpo-3bit", overwrite=True)
heldout = small.report["heldout"]
print(f"3 bits: {small.report['bytes']['ratio']:.3f} of the bytes, held-out perplexity {heldout['ppl_dense']:.2f} -> "
      f"{heldout['ppl']:.2f} ({small.model_path})")

# 5. A mistake raises aligntool.errors.UserError, whose message is the one line `aligntool train` prints.
try:
    aligntool.train("dpo", train={"max_stepz": 5})
except UserError as exc:
    error = str(exc)
print("error:", error)
