"""Write README's table of examples (examples/*.yaml) with the memory verdict of each one's dry run, not by hand.

The table sits between ``<!-- examples-table -->`` and ``<!-- /examples-table -->`` in README.md and is replaced as a
whole. Each row is the dry run of one example (aligntool/plan/dryrun.py: the architecture from its shipped
config.json on the meta device, the memory plan per GPU against its ``hardware:``), offline: nothing downloaded,
nothing written but README.md. A test runs ``--check``, so an example or a memory-model change without rerunning
this fails CI.

    python3 scripts/examples_table.py            # rewrite the table in README.md
    python3 scripts/examples_table.py --check    # exit 1 when README.md's table differs from the dry runs
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before huggingface_hub is imported: the dry runs read no hub
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

warnings.filterwarnings("ignore", message=r".*gradient_checkpointing.*deprecated", category=FutureWarning)
README = REPO / "README.md"
START, END = "<!-- examples-table -->", "<!-- /examples-table -->"
METHOD = {"sft": "SFT", "dpo": "DPO", "grpo": "GRPO", "ppo": "PPO", "reward": "reward model"}


def examples() -> list[Path]:
    return sorted((REPO / "examples").glob("*.yaml"))


def _method(run) -> str:
    r = run.loaded.recipe
    name = METHOD.get(run.loaded.spec.name, run.loaded.spec.name)
    if r.peft is not None:
        name += " QLoRA" if r.peft.load_in_4bit else " LoRA"
    elif run.loaded.spec.name not in ("reward",):
        name += " full"
    return name


def _hardware(run) -> str:
    w = run.world
    d = run.loaded.recipe.distributed
    hw = run.loaded.recipe.hardware
    gpu = (hw.gpu if hw and hw.gpu else "GPU").split(" (")[0]
    where = f"{w.nodes} nodes x {w.gpus}" if w.nodes > 1 else f"{w.gpus}"
    sharding = {"ddp": "", "deepspeed": f", ZeRO-{d.zero_stage}", "fsdp": ", FSDP2"}[d.backend]
    vllm = ", vLLM colocated" if run.loaded.recipe.generation.backend == "vllm" else ""
    return f"{where} x {gpu}{sharding}{vllm}"


def row(path: Path) -> str:
    from aligntool.plan.dryrun import gib, memory_size, resolve

    run = resolve(str(path.relative_to(REPO)), [])
    plan = run.plan
    name = path.relative_to(REPO)
    model = run.loaded.recipe.model.name_or_path
    if not plan.gpu_memory:
        word = "no GPU memory given"
    else:
        word = f"{'fits' if plan.fits else '**does not fit**'} in {memory_size(plan.gpu_memory)} GiB"
    return (f"| [`{name.name}`]({name}) | `{model}` | {_method(run)} | {_hardware(run)} | "
            f"{run.arch.params / 1e9:.2f} B | {gib(plan.total)} | {word} |")


def table() -> str:
    cwd = os.getcwd()
    os.chdir(REPO)  # the examples name their configs relative to themselves; rows show repository paths
    try:
        rows = [row(p) for p in examples()]
    finally:
        os.chdir(cwd)
    head = ["| example | model | method | hardware | parameters | plan, GiB per GPU | verdict |",
            "|---|---|---|---|---|---|---|"]
    return "\n".join(head + rows)


def replaced(text: str, body: str) -> str:
    start, end = text.index(START) + len(START), text.index(END)
    return text[:start] + "\n" + body + "\n" + text[end:]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if README.md's table is not current")
    args = parser.parse_args(argv)
    text = README.read_text()
    if START not in text or END not in text:
        print(f"README.md: no {START} ... {END} markers", file=sys.stderr)
        return 1
    new = replaced(text, table())
    if args.check:
        if new != text:
            print("README.md: the examples table is not current; run python3 scripts/examples_table.py",
                  file=sys.stderr)
            return 1
        return 0
    if new != text:
        README.write_text(new)
        print("README.md: examples table rewritten")
    return 0


if __name__ == "__main__":
    sys.exit(main())
