"""``aligntool train --dry-run``: the recipe resolved as training resolves it, without weights, data or a tokenizer,
and its memory plan per GPU (aligntool/plan/memory.py) with a verdict.

Steps (docs/DRY_RUN.md): load and validate the recipe (aligntool/recipe/loader.py, as ``train`` does; reward
functions imported); find the model's architecture (``model.config``, else a local folder's config.json, else the
Hugging Face cache, never the network); build the model on the meta device (no memory) and count its parameters; the
world size from ``--nproc``/``--nnodes`` or the recipe's ``hardware:``; the GPU's memory from ``--gpu-memory`` or
``hardware.gpu_memory``; then ``memory_plan``. Nothing is written, nothing downloaded.

Exit codes: 0 when the plan fits, or when no GPU memory is known (the plan is printed without a verdict); 2 with one
line (``aligntool: error: ...``, after the plan on stdout) when it does not fit, naming the largest components and the
settings that would make it fit; 2 for every bad input (a config that cannot be found names ``model.config``).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from aligntool.errors import UserError
from aligntool.recipe.schema import parse_memory

GIB = 2**30


@dataclass
class Architecture:
    """A model's config and what the meta-device build counted."""

    config: object  # transformers.PretrainedConfig
    source: str  # where the config came from, for the reader
    params: int  # every parameter, tied ones once
    non_embedding: int  # Step Law's N: the weight matrices without input embeddings and output head


@dataclass
class World:
    gpus: int
    nodes: int
    source: str  # --nproc/--nnodes, hardware:, or the default

    @property
    def size(self) -> int:
        return self.gpus * self.nodes


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


def _config_file(spec: str, base_dir: Path) -> Path | None:
    """``model.config``: a config.json or a folder holding one, relative to the recipe's folder, then the working
    directory."""
    path = Path(spec).expanduser()
    for candidate in ([path] if path.is_absolute() else [base_dir / path, Path.cwd() / path]):
        if candidate.is_file():
            return candidate
        if (candidate / "config.json").is_file():
            return candidate / "config.json"
    return None


def _shown(path: Path) -> str:
    """A path as the reader would type it: relative to the working directory when it is under it."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def _from_file(path: Path, key: str, trust_remote_code: bool):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code, local_files_only=True)
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as exc:
        raise UserError(f"{key}: {path}: not a transformers model config ({str(exc).splitlines()[0]})") from None


def find_config(loaded) -> tuple[object, str]:
    """The policy's transformers config and where it came from: ``model.config``, the built-in tiny models, a local
    model folder, or the Hugging Face cache (``local_files_only``: the dry run never downloads)."""
    m = loaded.recipe.model
    if m.config:
        path = _config_file(m.config, loaded.base_dir)
        if path is None:
            raise UserError(f"{loaded.source}: model.config: {m.config}: no config.json there (looked in "
                            f"{loaded.base_dir} and {Path.cwd()}); give a transformers config.json or a folder "
                            "holding one")
        return _from_file(path, "model.config", m.trust_remote_code), _shown(path)
    from aligntool import models

    if m.name_or_path in models.BUILT_IN:  # aligntool's own toy models: built locally (once), nothing downloaded
        path = Path(models.resolve(m.name_or_path, log=_stderr)) / "config.json"
        return _from_file(path, "model.name_or_path", m.trust_remote_code), _shown(path)
    local = Path(m.name_or_path).expanduser()
    if (local / "config.json").is_file():
        path = local / "config.json"
        return _from_file(path, "model.name_or_path", m.trust_remote_code), _shown(path)
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(m.name_or_path, revision=m.revision, local_files_only=True,
                                            trust_remote_code=m.trust_remote_code)
    except (OSError, ValueError) as exc:
        where = ("a LoRA adapter folder: its base model's config is needed" if (local / "adapter_config.json").is_file()
                 else "the folder has no config.json" if local.exists()
                 else "it is not a local folder nor in the Hugging Face cache")
        raise UserError(f"{loaded.source}: model.config: no config for {m.name_or_path!r} ({where}, and the dry run "
                        "downloads nothing); set model.config to the model's config.json or a folder holding one "
                        f"(examples/configs/ has the examples' models){_why(exc)}") from None
    return config, f"{m.name_or_path} (Hugging Face cache)"


def _why(exc: Exception) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f" [{text[:160]}]" if "trust_remote_code" in text else ""


def count_parameters(config, trust_remote_code: bool = False) -> tuple[int, int]:
    """(every parameter, the non-embedding ones) of the causal LM ``config`` describes, built on the meta device as
    ``steplaw.non_embedding_params`` builds it (no memory, no weights read): tied weights are counted once, N leaves
    out the input embeddings, the output head and the vectors (norms, biases)."""
    import torch
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except (ValueError, KeyError) as exc:
        raise UserError(f"model.config: {getattr(config, 'model_type', '?')}: transformers cannot build a causal LM "
                        f"from this config ({str(exc).splitlines()[0]})") from None
    skip = set()
    for module in (model.get_input_embeddings(), model.get_output_embeddings()):
        if module is not None:
            skip.update(id(p) for p in module.parameters())
    params = list(model.parameters())
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.ndim >= 2 and id(p) not in skip)


def architecture(loaded) -> Architecture:
    config, source = find_config(loaded)
    total, non_embedding = count_parameters(config, loaded.recipe.model.trust_remote_code)
    return Architecture(config, source, total, non_embedding)


def world(loaded, nproc: int | None = None, nnodes: int | None = None) -> World:
    """GPUs per node and nodes, each from its flag (``--nproc``, ``--nnodes``) where given, else from the recipe's
    ``hardware:``, else 1."""
    hw = loaded.recipe.hardware
    gpus = nproc or (hw.gpus_per_node if hw is not None else None)
    nodes = nnodes or (hw.nodes if hw is not None else None)
    sources = [flag for flag, value in (("--nproc", nproc), ("--nnodes", nnodes)) if value]
    if hw is not None and ((nproc is None and hw.gpus_per_node) or nnodes is None):
        sources.append("hardware:")
    return World(gpus or 1, nodes or 1, ", ".join(sources) or "default: give --nproc or hardware.gpus_per_node")


def gpu_memory(loaded, option: str | None) -> tuple[int | None, str]:
    """Bytes of one GPU's memory, and where the number came from: ``--gpu-memory``, else ``hardware.gpu_memory``."""
    if option is not None:
        try:
            return parse_memory(option), "--gpu-memory"
        except ValueError as exc:
            raise UserError(f"--gpu-memory: {exc}, got {option!r}") from None
    hw = loaded.recipe.hardware
    if hw is not None and hw.gpu_memory:
        return parse_memory(hw.gpu_memory), "hardware.gpu_memory"
    return None, ""


def reward_model_config(loaded):
    """The config of a reward-model folder the recipe scores with (``reward.source``), or None (gold, functions)."""
    reward = loaded.recipe.reward
    if reward is None or reward.source == "gold" or (":" in reward.source and not Path(reward.source).exists()):
        return None
    path = Path(reward.source).expanduser()
    if not (path / "config.json").is_file():
        raise UserError(f"{loaded.source}: reward.source: {reward.source}: no reward model there (no config.json); "
                        "the dry run reads the reward model's config")
    return _from_file(path / "config.json", "reward.source", False)


def gib(n: float) -> str:
    """GiB with one decimal ("<0.1" for a small part that is not zero)."""
    return "<0.1" if 0 < n < 0.05 * GIB else f"{n / GIB:.1f}"


def memory_size(n: int) -> str:
    value = n / GIB
    return f"{value:.0f}" if abs(value - round(value)) < 0.05 else f"{value:.1f}"


def verdict(plan) -> str:
    """One line: fits / does not fit (with what would) / no memory given."""
    if not plan.gpu_memory:
        return (f"planned: {gib(plan.total)} GiB per GPU (no verdict: give --gpu-memory 80GB or "
                "hardware.gpu_memory)")
    if plan.fits:
        return f"fits: {gib(plan.total)} of {memory_size(plan.gpu_memory)} GiB per GPU"
    return f"does not fit: {gib(plan.total)} GiB > {memory_size(plan.gpu_memory)} GiB per GPU{_remedy(plan)}"


def _remedy(plan) -> str:
    largest = sorted((c for c in plan.components if getattr(c, "counted", True)), key=lambda c: -c.bytes)[:3]
    parts = ", ".join(f"{c.name} {gib(c.bytes)}" for c in largest if c.bytes > 0)
    suggestions = [str(s) for s in (plan.suggestions or [])]
    fix = f"; would fit with: {'; or '.join(suggestions)}" if suggestions else \
        "; no setting aligntool knows makes it fit: more GPUs (--nproc, hardware.gpus_per_node) or a smaller model"
    return f" (largest: {parts} GiB){fix}"


def table(plan) -> list[str]:
    """The plan as text rows: component, GiB per GPU, note; then the total."""
    width = max([len(c.name) for c in plan.components] + [len("component"), len("total")])
    rows = [f"{'component':<{width}}  {'GiB/GPU':>8}  note"]
    for c in plan.components:
        note = f"{c.note or ''}{'' if getattr(c, 'counted', True) else ' (not counted: another phase peaks higher)'}"
        rows.append(f"{c.name:<{width}}  {gib(c.bytes):>8}  {note}".rstrip())
    rows.append(f"{'total':<{width}}  {gib(plan.total):>8}")
    return rows


@dataclass
class DryRun:
    """Everything the dry run resolved, and the plan."""

    loaded: object
    arch: Architecture
    world: World
    memory_source: str
    plan: object

    def header(self) -> list[str]:
        r = self.loaded.recipe
        w = self.world
        return [f"recipe: {self.loaded.source} ({self.loaded.spec.name}, model {r.model.name_or_path})",
                f"architecture: {self.arch.source} ({getattr(self.arch.config, 'model_type', '?')}; "
                f"{self.arch.params:,} parameters, {self.arch.non_embedding:,} non-embedding)",
                f"world: {w.size} GPU{'s' if w.size > 1 else ''} ({w.nodes} node{'s' if w.nodes > 1 else ''} x "
                f"{w.gpus}; {w.source}); distributed: {_distributed(r)}",
                *([f"assumed: {summary}"] if (summary := (getattr(self.plan, "settings", None) or {}).get("summary"))
                  else [])]

    def to_json(self) -> dict:
        a, w = self.arch, self.world
        return {**self.plan.to_json(), "dry_run": {
            "recipe": self.loaded.source, "algorithm": self.loaded.spec.name,
            "model": self.loaded.recipe.model.name_or_path, "config": a.source, "params": a.params,
            "non_embedding_params": a.non_embedding, "world_size": w.size, "nodes": w.nodes,
            "gpus_per_node": w.gpus, "gpu_memory_from": self.memory_source or None, "verdict": verdict(self.plan)}}


def _distributed(recipe) -> str:
    d = recipe.distributed
    text = {"ddp": "ddp", "deepspeed": f"deepspeed ZeRO-{d.zero_stage}", "fsdp": f"fsdp {d.fsdp_sharding}"}[d.backend]
    offload = [w for w, on in (("optimizer", d.offload_optimizer), ("params", d.offload_params)) if on]
    text += f", offload {'+'.join(offload)}" if offload else ""
    if recipe.peft is not None:
        text += ", QLoRA" if recipe.peft.load_in_4bit else ", LoRA"
    if recipe.generation.backend == "vllm":
        text += f", vLLM {recipe.generation.vllm_mode}"
    return text


def resolve(recipe: str, overrides: list[str], *, gpu_memory_option: str | None = None, nproc: int | None = None,
            nnodes: int | None = None) -> DryRun:
    """The recipe resolved and planned, nothing printed (scripts/examples_table.py and the tests call this)."""
    from aligntool import rewards
    from aligntool.plan.memory import memory_plan
    from aligntool.recipe.loader import load_recipe

    loaded = load_recipe(recipe, overrides)
    rewards.check_functions(loaded.recipe.reward)  # as training does: a reward function that cannot be imported
    arch = architecture(loaded)
    w = world(loaded, nproc, nnodes)
    memory, memory_source = gpu_memory(loaded, gpu_memory_option)
    plan = memory_plan(loaded, arch.config, world_size=w.size, gpu_memory=memory,
                       reward_config=reward_model_config(loaded))
    return DryRun(loaded, arch, w, memory_source, plan)


@contextlib.contextmanager
def _hub_offline():
    """HF_HUB_OFFLINE=1 while the dry run imports and resolves: the config lookups are local only anyway, and some
    libraries contact the hub when they are imported (bitsandbytes' kernels check who publishes its CPU kernels).
    huggingface_hub reads the variable when it is imported, so this applies where it is not imported yet (a command
    line process); the variable is restored after."""
    before = os.environ.get("HF_HUB_OFFLINE")
    if "huggingface_hub" not in sys.modules:
        os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = before


def dry_run(recipe: str, overrides: list[str], *, gpu_memory_option: str | None = None, as_json: bool = False,
            nproc: int | None = None, nnodes: int | None = None) -> int:
    """``aligntool train --dry-run``: print the plan (or its JSON); a plan that does not fit ends in one error line."""
    with _hub_offline():
        run = resolve(recipe, overrides, gpu_memory_option=gpu_memory_option, nproc=nproc, nnodes=nnodes)
    plan = run.plan
    if as_json:
        print(json.dumps(run.to_json()))
    else:
        fits = not plan.gpu_memory or plan.fits
        for line in [*run.header(), "", *table(plan), *([""] + [verdict(plan)] if fits else [])]:
            print(line)
    if plan.gpu_memory and not plan.fits:  # the verdict is the error line (stderr, exit 2)
        raise UserError(f"{run.loaded.source}: {verdict(plan)}")
    return 0
