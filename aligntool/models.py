"""Model and tokenizer loading: the built-in tiny model, local folders and hub ids, through transformers."""

from __future__ import annotations

from pathlib import Path

from aligntool.errors import UserError, first_line

DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


BUILT_IN = {"tiny": "tiny_model_path", "tiny-arith": "tiny_arith_model_path",  # built on first use, then cached
            "tiny-tools": "tiny_tools:tiny_tools_model_path"}  # [module of aligntool.toy (tiny):]function


def resolve(name_or_path: str, key: str = "model.name_or_path", log=print) -> str:
    """'tiny' -> the built tiny model's folder, 'tiny-arith' -> the tiny model fine-tuned on toy addition
    (``aligntool.toy.tiny.tiny_arith_model_path``), 'tiny-tools' -> the tiny model taught to call a calculator in
    Qwen2.5's chat template (``aligntool.toy.tiny_tools.tiny_tools_model_path``); then a local folder, if there is
    one; else anything shaped org/name, or a bare name such as 'gpt2', is a hub id."""
    if name_or_path in BUILT_IN:
        import importlib

        module, _, function = BUILT_IN[name_or_path].rpartition(":")
        return str(getattr(importlib.import_module(f"aligntool.toy.{module or 'tiny'}"), function)(log=log))
    local = Path(name_or_path).expanduser()
    if local.exists():
        if not (local / "config.json").is_file() and not (local / "adapter_config.json").is_file():
            raise UserError(f"{key}: {name_or_path}: folder has no config.json (expected a transformers model folder "
                            "or a LoRA adapter folder)")
        return str(local)
    parts = name_or_path.split("/")
    if name_or_path.startswith((".", "/", "~")) or len(parts) > 2 or not all(parts):
        raise UserError(f"{key}: {name_or_path}: model path does not exist "
                        f"(expected a built-in model ({', '.join(map(repr, BUILT_IN))}), a local folder or a hub id "
                        "org/name)")
    # not a local folder: a hub id, org/name or a bare name such as 'gpt2' (the hub's models without an org)
    try:
        check_hub(name_or_path, key)
    except UserError as exc:
        if len(parts) == 1:
            raise UserError(f"{exc}; nor is it a local folder ({local.absolute()}) or a built-in model "
                            f"({', '.join(map(repr, BUILT_IN))})") from None
        raise
    return name_or_path  # hub id: transformers downloads it (or finds it in the HF cache)


def check_hub(repo_id: str, key: str, revision: str | None = None) -> None:
    """A hub id that is not in the local HF cache needs the hub: on a machine without network say so at once, instead
    of transformers' minute of retries and a message about cached files."""
    import os
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(repo_id, "config.json", revision=revision)
    if isinstance(cached, str):
        return
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    if not offline:
        host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
        try:
            socket.create_connection((host, 443), timeout=HUB_TIMEOUT_S).close()
            return
        except OSError:
            pass
    why = "HF_HUB_OFFLINE is set" if offline else "this machine cannot reach the hub (offline?)"
    raise UserError(f"{key}: {repo_id!r} is a hub id, it is not in the local HF cache and {why}; download it on a "
                    "machine with network (huggingface-cli download) and give the local folder instead")


HUB_TIMEOUT_S = 5


def options(model_cfg, revision: bool = False) -> dict:
    """The loading options of a recipe's ``model`` section, as ``load_model`` keywords (``revision`` only for the
    hub model itself, not for a run's own outputs)."""
    opts = dict(dtype=model_cfg.dtype, trust_remote_code=model_cfg.trust_remote_code,
                attn_implementation=model_cfg.attn_implementation)
    if revision:
        opts["revision"] = model_cfg.revision
    return opts


def check_attention(attn_implementation: str | None, key: str = "model.attn_implementation") -> None:
    """flash_attention_2 needs a CUDA GPU and the flash-attn package: say which is missing before loading."""
    if attn_implementation != "flash_attention_2":
        return
    import importlib.util

    import torch

    if not torch.cuda.is_available():
        raise UserError(f"{key}: flash_attention_2 needs a CUDA GPU and this machine has none; use sdpa (the "
                        "default) or eager")
    if importlib.util.find_spec("flash_attn") is None:
        raise UserError(f"{key}: flash_attention_2 needs the flash-attn package (pip install flash-attn "
                        "--no-build-isolation); or use sdpa")


def check_remote_code(path: str, key: str, trust_remote_code: bool) -> None:
    """A local model folder that ships its own modelling code (``auto_map`` in config.json) is named with the key to
    set, instead of transformers' question on stdin or its long error."""
    import json

    config = Path(path) / "config.json"
    if trust_remote_code or not config.is_file():
        return
    try:
        cfg = json.loads(config.read_text())
    except ValueError:
        raise UserError(f"{config}: not valid JSON") from None
    import transformers
    from transformers import CONFIG_MAPPING

    if cfg.get("auto_map") and cfg.get("model_type") not in CONFIG_MAPPING:
        raise UserError(f"{key}: {path} ships its own modelling code (auto_map in config.json) for model type "
                        f"{cfg.get('model_type')!r}, which transformers does not know; set model.trust_remote_code: "
                        "true if you trust that code")
    if cfg.get("model_type") and cfg.get("model_type") not in CONFIG_MAPPING:
        raise UserError(f"{key}: {path}: model type {cfg.get('model_type')!r} is not known to transformers "
                        f"{transformers.__version__} (a newer transformers, or a folder that is not a "
                        "transformers model?)")


def run_device():
    """The device this process computes on: its own GPU (``LOCAL_RANK``) when there is one, else the CPU."""
    import os

    import torch

    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    return torch.device("cpu")


def disable_dropout(model) -> None:
    """Dropout off everywhere in ``model``, as TRL's trainers do by default (``disable_dropout``): TRL's
    ``disable_dropout_in_model`` zeroes every ``nn.Dropout`` (LoRA's ``lora_dropout`` included), and the float
    ``attention_dropout`` / ``dropout`` that attention modules of Llama, Qwen, Mistral, ... apply functionally in
    training mode are set to 0 too (TRL's helper misses those)."""
    from trl.trainer.utils import disable_dropout_in_model

    disable_dropout_in_model(model)
    for module in model.modules():
        for name in ("attention_dropout", "dropout"):
            if isinstance(getattr(module, name, None), float):
                setattr(module, name, 0.0)


def _wrap(key: str, name: str, fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except (OSError, ValueError) as exc:
        raise UserError(f"{key}: could not load {name!r}: {first_line(exc)}") from None


CLASSIFIER_SUFFIXES = ("ForSequenceClassification", "ForTokenClassification", "ForQuestionAnswering")


def check_weights(path: str, key: str) -> None:
    """A local model folder must hold weights that read back: a missing or truncated safetensors file (a run that was
    cut, a disk fault) is named in one line instead of failing deep inside transformers."""
    folder = Path(path)
    if not folder.is_dir():
        return  # a hub id: transformers checks its own downloads
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors"))
    if not files and not any(folder.glob("*.bin")):
        raise UserError(f"{key}: {path}: no model weights here (no *.safetensors file); a run that did not finish?")
    for file in files:
        try:
            with safe_open(str(file), "pt") as fh:
                fh.keys()
        except Exception as exc:  # noqa: BLE001 - safetensors' own error type
            raise UserError(f"{key}: {file}: truncated or corrupted safetensors file ({first_line(exc)})") from None


def architectures(path: str, trust_remote_code: bool = False, revision: str | None = None) -> list[str]:
    """The ``architectures`` a model's config declares ([] if it declares none)."""
    import json

    config = Path(path) / "config.json"
    if config.is_file():
        try:
            return list(json.loads(config.read_text()).get("architectures") or [])
        except ValueError:
            raise UserError(f"{config}: not valid JSON") from None
    if Path(path).is_dir():
        return []
    from transformers import AutoConfig

    cfg = _wrap("model", path, AutoConfig.from_pretrained, path, trust_remote_code=trust_remote_code, revision=revision)
    return list(getattr(cfg, "architectures", None) or [])


def check_head(path: str, head: str, key: str, trust_remote_code: bool = False, revision: str | None = None) -> None:
    """A causal LM where one is needed: a reward model (a sequence classifier) given as the policy or the reference
    would load with a freshly initialised LM head and train on noise."""
    if head != "causal_lm":
        return
    archs = architectures(path, trust_remote_code, revision)
    if archs and all(a.endswith(CLASSIFIER_SUFFIXES) for a in archs):
        raise UserError(f"{key}: {path} is a {archs[0]} (a reward or classifier model); this needs a causal language "
                        "model (a ...ForCausalLM)")


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")


def load_tokenizer(path: str, trust_remote_code: bool = False, revision: str | None = None, key="model.name_or_path",
                   chat_template: str | None = None, base_dir: Path | None = None, log=lambda message: None):
    """The tokenizer of a model folder or hub id, with a pad token (``aligntool.tokens.ensure_pad``) and, when given,
    ``chat_template`` (a template name or a Jinja file) in place of its own."""
    from transformers import AutoTokenizer

    from aligntool import tokens

    folder = Path(path)
    if folder.is_dir() and not any((folder / f).is_file() for f in TOKENIZER_FILES):
        raise UserError(f"{key}: {path}: no tokenizer here (none of {', '.join(TOKENIZER_FILES)}); copy the base "
                        "model's tokenizer files into this folder")
    tok = _wrap(key, path, AutoTokenizer.from_pretrained, path, trust_remote_code=trust_remote_code, revision=revision)
    if tok.eos_token is None:
        raise UserError(f"{key}: {path}: the tokenizer has no EOS token; set eos_token in its tokenizer_config.json")
    tokens.ensure_pad(tok, log=log)
    if chat_template:
        tokens.set_chat_template(tok, chat_template, base_dir=base_dir)
    return tok


def is_adapter(path: str) -> bool:
    """A LoRA adapter folder (a peft run's output): adapter_config.json and no config.json of its own."""
    return (Path(path) / "adapter_config.json").is_file() and not (Path(path) / "config.json").is_file()


def load_model(path: str, dtype: str = "auto", trust_remote_code: bool = False, revision: str | None = None,
               head: str = "causal_lm", pad_token_id: int | None = None, key="model.name_or_path",
               quantization_config=None, attn_implementation: str | None = None):
    """A causal LM, or a one-output sequence classifier (``head='reward'``) for reward models, whose score is read
    at the last token that is not padding (``pad_token_id``: the tokenizer's). A LoRA adapter folder (a peft run's
    output) loads as its base with the adapter merged."""
    import transformers

    if is_adapter(path):
        model = merged_adapter(path, dtype, trust_remote_code, key=key, head=head, pad_token_id=pad_token_id)
        # peft froze the base's weights when it wrapped them; merged, they are a plain model's again, which full
        # fine-tuning of an adapter output trains (else "element 0 of tensors does not require grad")
        return model.requires_grad_(True)
    check_weights(path, key)
    check_remote_code(path, key, trust_remote_code)
    check_head(path, head, key, trust_remote_code, revision)
    check_attention(attn_implementation)
    kwargs = dict(dtype=DTYPES.get(dtype, "auto"), trust_remote_code=trust_remote_code, revision=revision)
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
    if head == "reward":
        model = _wrap(key, path, transformers.AutoModelForSequenceClassification.from_pretrained, path, num_labels=1,
                      **kwargs)
        if pad_token_id is not None:  # the tokenizer's pad (it may have been chosen at load) marks the last token
            model.config.pad_token_id = pad_token_id
        return model
    try:
        return transformers.AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as exc:
        if attn_implementation and "attention implementation" in str(exc):
            raise UserError(f"model.attn_implementation: {path}: {attn_implementation} is not supported by this "
                            "architecture in this transformers; use eager") from None
        raise UserError(f"{key}: could not load {path!r}: {first_line(exc)}") from None


def make_soup(paths: list[str], weights: list[float] | None, out: Path, key: str = "ref_model.soup", log=print) -> Path:
    """Write the weight-space average of ``paths`` (identical architectures and shapes) to ``out`` as a model folder
    that transformers loads; the tokenizer and config are the first model's. Returns ``out``.

    A LoRA adapter folder counts as its base with the adapter merged: the soup of adapters of one base is
    base + sum_i w_i B_i A_i, the average of the models they make. (Averaging the A and B matrices themselves would
    give (sum w_i B_i)(sum w_i A_i), which is not that, so adapters are never averaged as adapters.)"""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    from aligntool.losses.online import soup

    weights = weights or [1 / len(paths)] * len(paths)
    folders = [Path(resolve(p, key=key, log=log)) for p in paths]
    adapters = [f for f in folders if is_adapter(f)]
    configs = [_soup_config(f, key) for f in folders]
    for f, c in zip(folders[1:], configs[1:]):
        if c.get("architectures") != configs[0].get("architectures"):
            raise UserError(f"{key}: {f} is a {c.get('architectures')}, "
                            f"{folders[0]} a {configs[0].get('architectures')}; "
                            "a soup needs one architecture")
    states, merged = [], None
    for f in folders:
        if is_adapter(f):  # its base with the adapter merged, as load_model gives it
            model = merged_adapter(str(f), key=key)
            merged = model if merged is None else merged
            states.append({k: v.detach() for k, v in model.state_dict().items()})
            continue
        check_weights(str(f), key)
        files = sorted(f.glob("*.safetensors"))
        if not files:
            raise UserError(f"{key}: {f}: no safetensors weights")
        state = {}
        for file in files:
            state.update(load_file(str(file)))
        states.append(state)
    if adapters:  # a merged model's state dict names tied tensors twice; a saved folder may name them once
        names = set.intersection(*(set(s) for s in states))
        states = [{k: v for k, v in s.items() if k in names} for s in states]
    try:
        averaged = soup(states, weights)
    except ValueError as exc:
        raise UserError(f"{key}: {exc}") from None
    from aligntool.outputs import atomic_path

    record = json.dumps({"models": [str(f) for f in folders], "weights": weights}, indent=2)
    with atomic_path(out) as tmp:
        if adapters:  # written as transformers writes the merged model (config of the base, tied weights once)
            first = merged if is_adapter(folders[0]) else load_model(str(folders[0]), key=key)
            first.load_state_dict(averaged, strict=False)
            first.save_pretrained(tmp, safe_serialization=True)
            load_tokenizer(str(folders[0]), key=key).save_pretrained(tmp)
        else:
            shutil.copytree(folders[0], tmp, ignore=shutil.ignore_patterns(
                "*.safetensors", "*.safetensors.index.json", "checkpoints", "tensorboard", "*.jsonl", "*.bin"))
            save_file(averaged, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "soup.json").write_text(record)
    return out


def _soup_config(folder: Path, key: str) -> dict:
    """config.json of a model folder, or of the base a LoRA adapter folder names (its architecture)."""
    import json

    if is_adapter(folder):
        cfg = json.loads((folder / "adapter_config.json").read_text())
        base = cfg.get("base_model_name_or_path")
        if not base:
            raise UserError(f"{key}: {folder}/adapter_config.json names no base_model_name_or_path")
        folder = Path(resolve(base, key=key, log=lambda m: None))
    if not (folder / "config.json").is_file():
        raise UserError(f"{key}: {folder}: no config.json")
    return json.loads((folder / "config.json").read_text())


def merged_adapter(path: str, dtype: str = "auto", trust_remote_code: bool = False, key: str = "ADAPTER",
                   head: str = "causal_lm", pad_token_id: int | None = None):
    """The base model named in a LoRA adapter folder's adapter_config.json, with the adapter merged into its weights."""
    import json

    from peft import PeftModel

    cfg = json.loads((Path(path) / "adapter_config.json").read_text())
    base_path = cfg.get("base_model_name_or_path")
    if not base_path:
        raise UserError(f"{key}: {path}/adapter_config.json names no base_model_name_or_path")
    base = load_model(resolve(base_path, key=key, log=lambda m: None), dtype, trust_remote_code, key=key, head=head,
                      pad_token_id=pad_token_id)
    check_weights(path, key)
    return _wrap(key, path, PeftModel.from_pretrained, base, path).merge_and_unload()


def check_target_modules(peft, model, key: str = "peft.target_modules") -> None:
    """Every LoRA target module of the recipe must exist in ``model``; the error lists its linear modules."""
    from torch import nn

    targets = peft.target_modules
    if targets == "all-linear":
        return
    targets = [targets] if isinstance(targets, str) else list(targets)
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    missing = [t for t in targets if t not in names]
    if missing:
        from transformers.pytorch_utils import Conv1D  # GPT-2's projections: peft adapts them too

        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D))})
        raise UserError(f"{key}: {', '.join(map(repr, missing))} matches no module of the model; its linear modules "
                        f"are: {', '.join(linear)}")


def four_bit_config(peft):
    """bitsandbytes 4-bit loading of the frozen base (QLoRA); a clear error where there is no CUDA GPU."""
    import torch

    if not torch.cuda.is_available():
        raise UserError("peft.load_in_4bit: 4-bit loading (QLoRA) needs a CUDA GPU with bitsandbytes; this machine has "
                        "none -- drop load_in_4bit to train LoRA on the full-precision base")
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=peft.bnb_4bit_quant_type, bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
