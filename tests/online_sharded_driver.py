"""Run several online recipes one after the other in one `torchrun` launch (the 2-process tests of
test_online_sharded.py): the processes, their gloo group and the imports are set up once for all of them.
Usage: torchrun --nproc_per_node 2 tests/online_sharded_driver.py OUT_ROOT NAME:RECIPE[,override...] ... -- OVERRIDES"""

import sys
from pathlib import Path

from aligntool.recipe.loader import load_recipe
from aligntool.train import train

if __name__ == "__main__":
    from accelerate.state import AcceleratorState

    repo = Path(__file__).resolve().parent.parent
    out_root, rest = Path(sys.argv[1]), sys.argv[2:]
    split = rest.index("--")
    runs, common = rest[:split], rest[split + 1 :]
    deepspeed = "distributed.backend=deepspeed" in common
    for spec in runs:  # NAME:RECIPE[,override...]; a leading "+" resumes NAME's run from its latest checkpoint
        resume = spec.startswith("+")
        name, recipe_and_extra = spec.lstrip("+").split(":", 1)
        recipe, *extra = recipe_and_extra.split(",")
        recipes = repo / "aligntool" / "recipes"
        train(load_recipe(recipes / f"{recipe}.yaml", [*common, *extra, f"output_dir={out_root / name}"]),
              resume=resume, accept_changes=resume)  # a resume runs on to a larger train.max_steps
        if deepspeed:  # the next run's DeepSpeed plugin carries its own config (FSDP's is the same for all runs)
            AcceleratorState._reset_state(reset_partial_state=False)
