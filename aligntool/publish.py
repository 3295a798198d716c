"""Sharing a trained model: the model card and `aligntool push`.

``push(folder, repo_id)`` uploads the final model of a run (the top level of its ``output_dir``: weights, config,
tokenizer, chat template, the run's recipe.yaml, summary.json, metrics and ``aligntool eval --out`` results) with a
model card generated from the run's own files, through huggingface_hub (``HfApi.create_repo`` + ``upload_folder``).
Subfolders (``checkpoints/``, ``iter-*/``, ``tensorboard/``, ``merged_base/``, ...), the run's lock, optimizer and
scheduler states and ``training_args.bin`` are never sent (``UPLOAD_IGNORE``). ``train.push_to_hub`` in a recipe does
the same once the run has finished with a loadable model (aligntool/entry.py); transformers' own ``push_to_hub``, which
would upload the Trainer's ``output_dir/checkpoints``, is never switched on (schema.TrainConfig.own_keys).
docs/SHARING.md is the user's guide.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from aligntool import __version__, registry
from aligntool.errors import UserError, first_line

# what upload_folder must not send (huggingface_hub's fnmatch patterns, matched against paths relative to the folder:
# "*/*" is every file in a subfolder -- checkpoints/, iter-*/, tensorboard/, wandb/, merged_base/, soup/)
UPLOAD_IGNORE = ["*/*", ".aligntool.lock", "*.lock", ".*", "optimizer.pt", "scheduler.pt", "*.pt", "*.pth",
                 "rng_state*", "training_args.bin", "slurm-*.out", "*.sbatch"]
CARD_FILE = "README.md"
CARD_TAG = "aligntool"

# the paper of each method: (title, first author et al., year, arXiv id)
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
_BUILT_IN_MODELS = {"tiny": "aligntool's built-in tiny model", "tiny-arith": "aligntool's built-in tiny-arith model",
                    "tiny-tools": "aligntool's built-in tiny-tools model"}


def check_repo_id(repo_id: str, key: str = "--repo-id") -> None:
    """OWNER/NAME as the Hub takes it (huggingface_hub's own validation, and an owner: the repository must be named
    where it goes)."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise UserError(f"{key}: {repo_id!r} is not a Hub repository id ({first_line(exc).rstrip('.')}); expected "
                        "OWNER/NAME, e.g. my-org/qwen2.5-0.5b-dpo") from None
    if not _REPO_ID.match(repo_id):
        raise UserError(f"{key}: {repo_id!r}: expected OWNER/NAME (your user or organisation, a slash, the model's "
                        "name), e.g. my-org/qwen2.5-0.5b-dpo")


def find_token(token: str | None = None) -> str:
    """--token, else huggingface_hub's own (HF_TOKEN, then the cached `hf auth login`); one line when there is none."""
    from huggingface_hub import get_token

    token = token or get_token()
    if not token:
        raise UserError("push: no Hugging Face token: pass --token, set HF_TOKEN, or log in once with "
                        "`hf auth login` (a token with write access: https://huggingface.co/settings/tokens)")
    return token


def check_folder(folder: Path) -> None:
    """A folder that holds a complete final model: a run's output_dir once it finished (summary.json), or any model
    folder aligntool wrote (merge-lora, soup, unpack, compress); never a checkpoint."""
    from aligntool.outputs import CHECKPOINT_PREFIX, model_problem

    if folder.name == "checkpoints" or folder.name.startswith(CHECKPOINT_PREFIX):
        raise UserError(f"OUTPUT: {folder} is a checkpoint, not a final model; push the run's output_dir "
                        f"({folder.parent if folder.name == 'checkpoints' else folder.parent.parent}) once it finished")
    if (folder / "recipe.yaml").is_file() and not (folder / "summary.json").is_file() and (
            folder / "metrics.jsonl").is_file():
        raise UserError(f"OUTPUT: {folder}: the run has not finished (no summary.json): nothing final to push; finish "
                        "it first (aligntool train --resume)")
    problem = model_problem(folder)
    if problem is not None:
        raise UserError(f"OUTPUT: {folder} holds no complete model: {problem}")


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def eval_results(folder: Path) -> dict[str, dict]:
    """The ``aligntool eval --out`` JSON files at the top of ``folder``, by file name (an eval result has the model
    and what it was measured on: ``data``, or lm-eval's ``tasks``)."""
    found = {}
    for path in sorted(folder.glob("*.json")):
        data = _read_json(path)
        if isinstance(data, dict) and "model" in data and ("data" in data or "tasks" in data):
            found[path.name] = data
    return found


def _scalars(result: dict) -> dict[str, float]:
    """The numeric metrics of an eval result (lm-eval's per task as 'task metric')."""
    out = {}
    for key, value in result.items():
        if key == "tasks" and isinstance(value, dict):
            for task, metrics in value.items():
                out.update({f"{task} {m}": v for m, v in metrics.items()
                            if isinstance(v, (int, float)) and not isinstance(v, bool)})
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and key not in _SETTINGS:
            out[key] = value
    return out


def _hub_id(name: str | None) -> str | None:
    """``name`` when it names a Hub repository (not a built-in model, not a local folder)."""
    if not name or name in _BUILT_IN_MODELS or Path(name).expanduser().exists() or name.startswith((".", "/", "~")):
        return None
    return name if _REPO_ID.match(name) or re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name) else None


# keys of an eval result that say how it was measured, not what
_SETTINGS = {"num_prompts", "revision_steps", "num_pairs", "rows", "samples_per_prompt"}


def _dataset_id(source: str) -> str | None:
    """``source`` when it names a Hub dataset OWNER/NAME (not toy, a builder or a local file)."""
    local = Path(source).expanduser().exists() or source.startswith((".", "/", "~"))
    return source if not local and _REPO_ID.match(source) else None


def _datasets(recipe: dict) -> list[str]:
    data = recipe.get("dataset") or {}
    sources = [data.get("path"), data.get("eval_path")] + [m.get("path") for m in data.get("mixture") or []]
    return list(dict.fromkeys(s for s in sources if s))


def _table(rows: dict) -> list[str]:
    lines = ["| metric | value |", "|---|---|"]
    for key, value in rows.items():
        lines.append(f"| {key} | {value:.4g} |" if isinstance(value, float) else f"| {key} | {value} |")
    return lines


def card_data(folder: Path, repo_id: str | None):
    """The card's metadata (huggingface_hub's ModelCardData): base model and datasets where they are Hub ids, the
    library, tags, and the eval results as the Hub's model-index."""
    import yaml
    from huggingface_hub import EvalResult, ModelCardData

    from aligntool.rewards import is_reward_model

    recipe = yaml.safe_load((folder / "recipe.yaml").read_text()) if (folder / "recipe.yaml").is_file() else {}
    method = recipe.get("algorithm")
    base = _hub_id((recipe.get("model") or {}).get("name_or_path"))
    datasets = [d for d in _datasets(recipe) if _dataset_id(d)]
    reward = is_reward_model(str(folder))
    results = []
    for name, result in eval_results(folder).items():
        source = (result.get("data") or {}).get("source") or name
        for metric, value in _scalars(result).items():
            results.append(EvalResult(task_type="text-classification" if reward else "text-generation",
                                      dataset_type=source, dataset_name=source, metric_type=metric,
                                      metric_value=value))
    return ModelCardData(
        base_model=base, datasets=datasets or None,
        library_name="peft" if (folder / "adapter_config.json").is_file() else "transformers",
        pipeline_tag="text-classification" if reward else "text-generation",
        tags=[t for t in (CARD_TAG, method, "trl" if method else None) if t],
        model_name=(repo_id or folder.name).split("/")[-1], eval_results=results or None)


def model_card(folder: Path, repo_id: str | None = None):
    """huggingface_hub's ModelCard for the run in ``folder``: base model, method and its paper, datasets, the recipe
    (the run's recipe.yaml), final metrics (summary.json), the ``aligntool eval`` results found in the folder, the
    aligntool version."""
    from huggingface_hub import ModelCard

    data = card_data(folder, repo_id)
    text = "\n".join(_card_body(folder, data.model_name))
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{text}\n")


def _card_body(folder: Path, title: str) -> list[str]:
    import yaml

    recipe_text = (folder / "recipe.yaml").read_text() if (folder / "recipe.yaml").is_file() else ""
    recipe = yaml.safe_load(recipe_text) if recipe_text else {}
    summary = _read_json(folder / "summary.json") or {}
    method = recipe.get("algorithm") or summary.get("algorithm")
    base = (recipe.get("model") or {}).get("name_or_path")
    lines = [f"# {title}", "", f"Trained with aligntool {__version__}" + (f" by **{method}**." if method else "."),
             "", "## Training", ""]
    if base:
        where = (f"[{base}](https://huggingface.co/{base})" if _hub_id(base)
                 else _BUILT_IN_MODELS.get(base, f"`{base}` (a local folder)"))
        lines.append(f"- Base model: {where}")
    if method:
        spec = registry.ALGORITHMS.get(method)
        paper = registry.PAPERS.get(method)
        cite = (f" Paper: {paper[1]}, \"{paper[0]}\", {paper[2]} ([arXiv:{paper[3]}](https://arxiv.org/abs/{paper[3]}))."
                if paper else "")
        lines.append(f"- Method: `{method}`: {spec.summary if spec else ''}{cite}")
    for source in _datasets(recipe):
        what = "aligntool's toy data" if source == "toy" else (f"[{source}](https://huggingface.co/datasets/{source})"
                                                                if _dataset_id(source) else f"`{source}`")
        lines.append(f"- Data: {what}")
    if summary:
        dist = (summary.get("distributed") or {}).get("described")
        lines.append(f"- Steps: {summary.get('global_step')}, processes: {summary.get('world_size')}"
                     + (f" ({dist})" if dist else "") + f", training time {summary.get('train_time_s')} s")
        final = {k: v for k, v in (summary.get("final_metrics") or {}).items() if isinstance(v, (int, float))}
        if final:
            lines += ["", "## Final metrics (summary.json)", "", *_table(final)]
    results = eval_results(folder)
    if results:
        lines += ["", "## Evaluation (`aligntool eval`)"]
        for name, result in results.items():
            data = result.get("data") or {}
            rows = f", {data['rows']} rows" if data.get("rows") is not None else ""
            lines += ["", f"`{name}`: {data.get('source', 'lm-evaluation-harness tasks')}{rows}", "",
                      *_table(_scalars(result))]
    if recipe_text:
        lines += ["", "## Recipe", "", "The run's resolved recipe (recipe.yaml); `aligntool train --recipe "
                  "recipe.yaml` trains it again.", "", "```yaml", recipe_text.rstrip(), "```"]
    lines += ["", "## Framework versions", "", *[f"- {name}: {version}" for name, version in _versions()]]
    return lines


def _versions() -> list[tuple[str, str]]:
    from importlib.metadata import PackageNotFoundError, version

    out = [("aligntool", __version__)]
    for name in ("transformers", "trl", "torch", "peft", "huggingface_hub"):
        try:
            out.append((name, version(name)))
        except PackageNotFoundError:
            pass
    return out


def _transport_errors() -> tuple[type[BaseException], ...]:
    """The network errors of the HTTP client huggingface_hub uses (httpx from 1.0, requests before)."""
    try:
        import httpx

        return (httpx.HTTPError,)
    except ImportError:
        return ()


def prepare(folder: Path, repo_id: str | None = None, overwrite: bool = False) -> Path:
    """Check ``folder`` and write its model card (README.md) into it; returns the card's path. A README.md aligntool
    did not write is kept unless ``overwrite``."""
    from huggingface_hub import metadata_load

    from aligntool.outputs import write_model_card

    check_folder(folder)
    card = folder / CARD_FILE
    if card.is_file() and not overwrite:
        tags = (metadata_load(card) or {}).get("tags") or []
        if CARD_TAG not in tags:
            raise UserError(f"OUTPUT: {card} exists and was not written by aligntool; pass --overwrite to replace it "
                            "with the generated model card")
    write_model_card(folder, str(model_card(folder, repo_id)))
    return card


def push(folder: str | Path, repo_id: str, private: bool = False, revision: str | None = None,
         token: str | None = None, overwrite: bool = False, log=print) -> str:
    """Upload the final model in ``folder`` with its generated card to ``repo_id`` (created if missing); returns the
    commit's URL. Checks first, in this order: the repo id, the token, the folder."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    folder = Path(folder).expanduser()
    check_repo_id(repo_id)
    token = find_token(token)
    prepare(folder, repo_id, overwrite)
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        info = api.upload_folder(repo_id=repo_id, folder_path=str(folder), revision=revision,
                                 ignore_patterns=UPLOAD_IGNORE,
                                 commit_message=f"aligntool {__version__}: upload the final model and its card")
    except (HfHubHTTPError, OSError, *_transport_errors()) as exc:
        raise UserError(f"push: {repo_id}: {first_line(exc)}") from None
    url = getattr(info, "commit_url", None) or f"https://huggingface.co/{repo_id}"
    log(f"pushed {folder} to {url}")
    return url
