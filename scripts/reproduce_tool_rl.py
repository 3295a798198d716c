"""Does RL teach the tiny model to use a tool? The toy tool task (aligntool/toy/tools.py) end to end.

Accuracy (0/1 reward on the final answer) and tool-call rate on held-out questions (split on the unordered pair, so
no commuted twin of a held-out question is trained on), greedy and sampled at T = 1, for:

- ``sft``: ``tiny-tools`` as built (SFT on demonstrations that call the calculator about half of the time);
- ``grpo+tools``: after GRPO with the calculator (TRL's GRPOTrainer, aligntool/recipes/grpo_tools.yaml);
- ``reinforce_pp+tools``: after REINFORCE++ with the calculator (the engine's rollout, reinforce_pp_tools.yaml);
- ``*-no-tools``: the same recipes without ``agent.tools`` (the prompts offer no tool): the control, whose gain is
  what RL on the task gives without the tool.

Every model is evaluated with the calculator offered (the task), on the same held-out questions; each line gives mean
+- s.e. over questions, and each trained model its paired gain over ``sft`` (per-question differences: mean, s.e.,
and the gain in standard errors). Training goes through the Python API (``aligntool.train``; ``--overwrite`` trains
again over runs left in ``--out``).

    python scripts/reproduce_tool_rl.py [--quick] [--only sft] [--questions 200] [--out runs/tool_rl]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

RECIPES = {"grpo+tools": "grpo_tools", "reinforce_pp+tools": "reinforce_pp_tools"}
CONTROLS = {"grpo-no-tools": "grpo_tools", "reinforce_pp-no-tools": "reinforce_pp_tools"}


def mean_se(values: list[float]) -> tuple[float, float]:
    n = len(values)
    m = sum(values) / n
    var = sum((v - m) ** 2 for v in values) / (n - 1) if n > 1 else 0.0
    return m, math.sqrt(var / n)


def evaluate(model_path: str, questions: list[dict], *, greedy: bool, seed: int, max_turns: int = 3,
             max_new_tokens: int = 32) -> dict[str, list[float]]:
    """Per-question scores: ``accuracy`` (the toy reward on the whole episode) and ``tool_call`` (1 when the episode
    called the tool at least once), the calculator offered, at most ``max_turns`` turns of ``max_new_tokens``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from aligntool.models import resolve
    from aligntool.online.episodes import run_episodes
    from aligntool.recipe.agent import AgentConfig
    from aligntool.toy import tools

    path = resolve(model_path, log=lambda m: None)
    tokenizer = AutoTokenizer.from_pretrained(path)
    lm = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    agent = AgentConfig(tools=["aligntool.toy.tools:calculator"], max_turns=max_turns)
    episodes = run_episodes(lm, tokenizer, [q["prompt"] for q in questions], [tools.calculator], agent,
                              max_new_tokens=max_new_tokens, temperature=1.0, top_p=1.0,
                              seeds=[seed * 100_003 + i for i in range(len(questions))], greedy=greedy)
    completions = [e.messages[len(q["prompt"]):] for e, q in zip(episodes, questions, strict=True)]
    rewards = tools.reward(None, completions, [q["answer"] for q in questions])
    return {"accuracy": rewards, "tool_call": [1.0 if e.tool_calls else 0.0 for e in episodes]}


def paired(a: list[float], b: list[float]) -> tuple[float, float]:
    return mean_se([y - x for x, y in zip(a, b, strict=True)])


def train(name: str, recipe: str, out: Path, quick: bool, no_tools: bool, overwrite: bool) -> str:
    """Train through the Python API (``aligntool.train``); returns the final model's folder. ``no_tools``: the
    recipe without its agent section (the prompts offer no tool)."""
    import aligntool

    overrides = [f"output_dir={out / name}", "train.report_to=none"]
    if quick:
        overrides += ["train.max_steps=4", "train.save_steps=4"]
    if no_tools:
        overrides += ["agent=null"]
    return str(aligntool.train(recipe, overrides=overrides, overwrite=overwrite).model_path)


def table(results: dict[str, dict[str, dict[str, list[float]]]]) -> list[str]:
    """One line per model and mode: accuracy and tool-call rate (mean +- s.e.), and for a trained model the paired
    gains over ``sft`` on the same questions (mean +- s.e., and in standard errors)."""
    def gain(a, b):
        g, se = paired(a, b)
        return f"{g:+.3f} +- {se:.3f} ({g / se:+.1f} s.e.)" if se > 0 else f"{g:+.3f} +- 0"

    lines = [f"{'model':24} {'mode':7} {'accuracy':>15} {'tool calls':>15} {'paired acc gain vs sft':>28} "
             f"{'paired call gain vs sft':>28}"]
    base = results.get("sft")
    for name, modes in results.items():
        for mode, scores in modes.items():
            acc, tool = mean_se(scores["accuracy"]), mean_se(scores["tool_call"])
            gains = ["", ""]
            if base is not None and name != "sft":
                gains = [gain(base[mode][k], scores[k]) for k in ("accuracy", "tool_call")]
            lines.append(f"{name:24} {mode:7} {acc[0]:.3f} +- {acc[1]:.3f} {tool[0]:.3f} +- {tool[1]:.3f} "
                         f"{gains[0]:>28} {gains[1]:>28}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="4 training steps and 32 questions: the plumbing only")
    parser.add_argument("--questions", type=int, default=None, help="held-out questions (default 300; quick 32)")
    parser.add_argument("--only", default=None, help="comma-separated models: sft, grpo+tools, reinforce_pp+tools, "
                        "grpo-no-tools, reinforce_pp-no-tools (default: all)")
    parser.add_argument("--out", type=Path, default=Path("runs/tool_rl"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true", help="train again over runs left in --out")
    args = parser.parse_args(argv)
    from aligntool.toy import tools

    n = args.questions or (32 if args.quick else 300)
    questions = tools.rows(n, seed=args.seed, split="eval")
    names = ["sft", *RECIPES, *CONTROLS] if args.only is None else args.only.split(",")
    results = {}
    for name in names:
        if name == "sft":
            path = "tiny-tools"
        elif name in RECIPES or name in CONTROLS:
            path = train(name, RECIPES.get(name) or CONTROLS[name], args.out, args.quick, name in CONTROLS,
                         args.overwrite)
        else:
            parser.error(f"--only: unknown model {name!r}")
        results[name] = {mode: evaluate(path, questions, greedy=mode == "greedy", seed=args.seed)
                         for mode in ("greedy", "T=1")}
        print(f"evaluated {name}", file=sys.stderr)
    lines = table(results)
    print("\n".join(lines))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "tool_rl.json").write_text(json.dumps({"questions": n, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
