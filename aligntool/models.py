"""Model and tokenizer loading: the built-in tiny model, local folders and hub ids, through transformers."""

from __future__ import annotations

from pathlib import Path

from aligntool.errors import UserError

DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def resolve(name_or_path: str, key: str = "model.name_or_path", log=print) -> str:
    """'tiny' -> the built tiny model's folder; a local path must exist; anything shaped org/name is a hub id."""
    if name_or_path == "tiny":
        from aligntool.toy.tiny import tiny_model_path

        return str(tiny_model_path(log=log))
    local = Path(name_or_path).expanduser()
    if local.exists():
        if not (local / "config.json").is_file():
            raise UserError(f"{key}: {name_or_path}: folder has no config.json (expected a transformers model folder)")
        return str(local)
    parts = name_or_path.split("/")
    if name_or_path.startswith((".", "/", "~")) or len(parts) != 2 or not all(parts):
        raise UserError(f"{key}: {name_or_path}: model path does not exist (expected 'tiny', a local folder or a hub id org/name)")
    return name_or_path  # hub id: transformers downloads it (or finds it in the HF cache)


def _wrap(key: str, name: str, fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except (OSError, ValueError) as exc:
        raise UserError(f"{key}: could not load {name!r}: {str(exc).strip().splitlines()[0]}") from None


def load_tokenizer(path: str, trust_remote_code: bool = False, revision: str | None = None, key="model.name_or_path"):
    from transformers import AutoTokenizer

    tok = _wrap(key, path, AutoTokenizer.from_pretrained, path, trust_remote_code=trust_remote_code, revision=revision)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token  # causal LMs often ship without one; TRL pads with it
    return tok


def load_model(path: str, dtype: str = "auto", trust_remote_code: bool = False, revision: str | None = None,
               head: str = "causal_lm", pad_token_id: int | None = None, key="model.name_or_path"):
    """A causal LM, or a one-output sequence classifier (``head='reward'``) for reward models."""
    import transformers

    kwargs = dict(dtype=DTYPES.get(dtype, "auto"), trust_remote_code=trust_remote_code, revision=revision)
    if head == "reward":
        model = _wrap(key, path, transformers.AutoModelForSequenceClassification.from_pretrained, path, num_labels=1, **kwargs)
        if pad_token_id is not None and model.config.pad_token_id is None:
            model.config.pad_token_id = pad_token_id
        return model
    return _wrap(key, path, transformers.AutoModelForCausalLM.from_pretrained, path, **kwargs)


def make_soup(paths: list[str], weights: list[float] | None, out: Path, key: str = "ref_model.soup", log=print) -> Path:
    """Write the weight-space average of ``paths`` (identical architectures and shapes) to ``out`` as a model folder
    that transformers loads; the tokenizer and config are the first model's. Returns ``out``."""
    import json
    import os
    import shutil

    from safetensors.torch import load_file, save_file

    from aligntool.losses.online import soup

    weights = weights or [1 / len(paths)] * len(paths)
    folders = [Path(resolve(p, key=key, log=log)) for p in paths]
    configs = [json.loads((f / "config.json").read_text()) for f in folders]
    for f, c in zip(folders[1:], configs[1:]):
        if c.get("architectures") != configs[0].get("architectures"):
            raise UserError(f"{key}: {f} is a {c.get('architectures')}, {folders[0]} a {configs[0].get('architectures')}; "
                            "a soup needs one architecture")
    states = []
    for f in folders:
        files = sorted(f.glob("*.safetensors"))
        if not files:
            raise UserError(f"{key}: {f}: no safetensors weights")
        state = {}
        for file in files:
            state.update(load_file(str(file)))
        states.append(state)
    try:
        averaged = soup(states, weights)
    except ValueError as exc:
        raise UserError(f"{key}: {exc}") from None
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(folders[0], tmp, ignore=shutil.ignore_patterns("*.safetensors", "*.safetensors.index.json",
                                                                      "checkpoints", "tensorboard", "*.jsonl", "*.bin"))
    save_file(averaged, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    (tmp / "soup.json").write_text(json.dumps({"models": [str(f) for f in folders], "weights": weights}, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out
