"""Checks of a run's settings before anything loads or trains: ``train.*`` values that transformers would reject deep
inside the Trainer (a logger whose package is missing, an accelerate YAML as ``train.deepspeed``) or accept and ignore
(fp16 on a CPU), ``train.max_length`` against the model's positions, and max_steps beside num_train_epochs."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from aligntool.errors import UserError
from aligntool.outputs import log
from aligntool.recipe.loader import LoadedRecipe

# transformers' logging integrations (train.report_to) and the package each needs
REPORT_PACKAGES = {"wandb": "wandb", "mlflow": "mlflow", "comet_ml": "comet-ml", "neptune": "neptune",
                   "clearml": "clearml", "dvclive": "dvclive", "swanlab": "swanlab", "trackio": "trackio",
                   "codecarbon": "codecarbon", "dagshub": "dagshub", "azure_ml": "azureml-core", "flyte": "flytekit",
                   "kubeflow": "kubeflow", "tensorboard": "tensorboard"}
# the trackers of aligntool's ``trackers`` extra (pyproject.toml)
EXTRA_TRACKERS = {"wandb": "wandb", "mlflow": "mlflow-skinny"}
# the loggers the rollout engine (the online methods) reaches through accelerate's trackers
ENGINE_TRACKERS = ("tensorboard", "wandb", "mlflow", "trackio", "comet_ml", "swanlab", "clearml", "dvclive")


def report_to_list(value) -> list[str]:
    """``train.report_to`` as a list of logger names, as transformers reads it: None and "none" -> [], a name -> [it],
    "all" stays "all" (expanded by ``installed_loggers``)."""
    if value is None:
        return []
    names = [value] if isinstance(value, str) else list(value)
    return [n for n in names if n != "none"]


def installed_loggers(names: list[str], online: bool) -> list[str]:
    """The loggers a run reports to: ``names`` with "all" expanded to every installed one (those the rollout engine
    supports, for an online method), tensorboard always among them."""
    from transformers.integrations.integration_utils import get_available_reporting_integrations

    out = set(names) - {"all"}
    if "all" in names:
        out |= {n for n in get_available_reporting_integrations() if not online or n in ENGINE_TRACKERS}
    return sorted(out | {"tensorboard"})


def _check_report_to(names: list[str], source: str, online: bool = False) -> None:
    """A logger of ``train.report_to`` must be one transformers knows (accelerate's trackers, for an online method)
    and its package installed: named here, before any model loads, instead of transformers' RuntimeError traceback
    when the Trainer builds its callbacks (or accelerate's warning, which drops the tracker)."""
    from transformers.integrations.integration_utils import (
        INTEGRATION_TO_CALLBACK,
        get_available_reporting_integrations,
    )

    available = set(get_available_reporting_integrations())
    for name in names:
        if name in ("none", "all"):
            continue
        if name not in INTEGRATION_TO_CALLBACK:
            raise UserError(f"{source}: train.report_to: unknown logger {name!r}; expected one of "
                            f"{', '.join(sorted(INTEGRATION_TO_CALLBACK))} (tensorboard is always on)")
        if online and name not in ENGINE_TRACKERS:
            raise UserError(f"{source}: train.report_to: {name} is not available to the online methods, which log "
                            f"through accelerate's trackers: {', '.join(ENGINE_TRACKERS)}")
        if name not in available:
            package = REPORT_PACKAGES.get(name, name)
            how = "pip install 'aligntool[trackers]'" if name in EXTRA_TRACKERS else f"pip install {package}"
            raise UserError(f"{source}: train.report_to: {name} needs the {EXTRA_TRACKERS.get(name, package)} "
                            f"package, which is not installed ({how}), or drop {name} from train.report_to")


def _check_deepspeed_file(value: str, source: str) -> None:
    """``train.deepspeed`` (transformers' field) takes a DeepSpeed JSON config; an accelerate config (the YAML
    ``accelerate config`` writes, with ``distributed_type: DEEPSPEED``) is a common mix-up, which transformers reports
    as a bare JSON error."""
    if value.lstrip().startswith("{"):
        return  # an inline JSON text: transformers parses it
    path = Path(value).expanduser()
    hint = ("a DeepSpeed JSON config file; or set distributed.backend: deepspeed (and distributed.zero_stage), for "
            "which aligntool writes deepspeed.json itself")
    if not path.is_file():
        raise UserError(f"{source}: train.deepspeed: {path}: file not found; expected {hint}")
    text = path.read_text(errors="replace")
    try:
        json.loads(text)
        return
    except ValueError:
        pass
    try:
        parsed = yaml.safe_load(text)
    except yaml.YAMLError:
        parsed = None
    if isinstance(parsed, dict) and ({"distributed_type", "compute_environment", "deepspeed_config"} & set(parsed)):
        raise UserError(f"{source}: train.deepspeed: {path} is an accelerate config (YAML), not a DeepSpeed config; "
                        f"train.deepspeed takes {hint} (an accelerate config goes to `accelerate launch "
                        "--config_file`)")
    raise UserError(f"{source}: train.deepspeed: {path} is not valid JSON; expected {hint}")


def check_train_settings(loaded: LoadedRecipe) -> None:
    """``train.*`` values that transformers would only reject deep inside the Trainer (a logger whose package is
    missing, an accelerate YAML as ``train.deepspeed``) or accept and ignore (fp16 on a CPU): checked before anything
    loads."""
    _check_report_to(report_to_list(loaded.recipe.train.report_to), loaded.source, loaded.spec.kind == "online")
    deepspeed = (loaded.recipe.train.model_extra or {}).get("deepspeed")
    if isinstance(deepspeed, str):
        _check_deepspeed_file(deepspeed, loaded.source)
    import torch

    if loaded.recipe.train.fp16 and not torch.cuda.is_available():
        # transformers accepts fp16 on a CPU and then trains in fp32 as if it were not set (fp16 mixed precision is
        # CUDA autocast + a loss scaler): refuse rather than let the recipe say what the run does not do
        raise UserError(f"{loaded.source}: train.fp16: fp16 mixed precision needs a CUDA GPU and this machine has "
                        "none (the run would be fp32); use train.bf16: true (torch's CPU autocast) or drop train.fp16")


def check_positions(run) -> None:
    """``train.max_length`` against the positions the model has: a model with learned absolute positions (GPT-2's
    ``n_positions``) has no embedding row past them (an IndexError deep in the forward pass): refused with both
    numbers. A rotary model runs past its configured ``max_position_embeddings`` but was not trained there: a note."""
    max_length = run.recipe.train.max_length
    if max_length is None:
        return
    from transformers import AutoConfig

    m = run.recipe.model
    try:
        cfg = AutoConfig.from_pretrained(run.model_path, trust_remote_code=m.trust_remote_code, revision=m.revision)
    except Exception:  # noqa: BLE001 - the model's own loading reports a bad config
        return
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    positions = getattr(cfg, "n_positions", None) or getattr(cfg, "max_position_embeddings", None)
    if not isinstance(positions, int) or max_length <= positions:
        return
    rotary = bool(getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None)
                  or getattr(cfg, "rotary_dim", None) or getattr(cfg, "rotary_pct", None))
    if rotary:
        log(f"note: train.max_length={max_length} is beyond the model's configured context (max_position_embeddings "
            f"{positions}): its rotary positions run past what it was trained on, and quality may drop there")
        return
    raise UserError(f"{run.loaded.source}: train.max_length: {max_length} tokens, but {m.name_or_path} has learned "
                    f"positions for {positions} tokens only (n_positions / max_position_embeddings in its config); "
                    f"set train.max_length <= {positions}")


def note_steps_and_epochs(run) -> None:
    """``train.max_steps`` and ``train.num_train_epochs`` both set: transformers trains max_steps and ignores the
    epochs; say so (a recipe's max_steps and an epochs override would otherwise run the recipe's steps silently)."""
    t = run.recipe.train
    if t.max_steps is not None and t.num_train_epochs is not None:
        log(f"note: train.max_steps={t.max_steps} and train.num_train_epochs={t.num_train_epochs} are both set: "
            f"max_steps wins (as in transformers), the run stops after {t.max_steps} steps; set train.max_steps=-1 "
            "(or null) to train by epochs")
