"""The bodies of the commands other than ``train`` (``cli.py`` holds their options and help): merge-lora, compress,
unpack, eval, soup, suggest, recipes. Heavy imports (torch, transformers, TRL) stay inside the functions, so importing
this module costs nothing and ``aligntool --help`` stays instant."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from aligntool.errors import UserError


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


def merge_lora(adapter: str, out: str, overwrite: bool) -> None:
    from aligntool import models
    from aligntool.outputs import atomic_path, check_model_saved, check_output
    from aligntool.rewards import is_reward_model

    path = Path(adapter).expanduser()
    if not (path / "adapter_config.json").is_file():
        raise UserError(f"merge-lora: {adapter}: no adapter_config.json (expected a LoRA adapter folder)")
    target = Path(out).expanduser()
    check_output(target, overwrite)
    head = "reward" if is_reward_model(str(path)) else "causal_lm"
    model = models.merged_adapter(str(path), key="merge-lora", head=head)
    tokenizer = models.load_tokenizer(str(path), key="merge-lora")
    with atomic_path(target) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    check_model_saved(target, key="--out", what="merged")
    print(target)


def compress(recipe: str, overrides: list[str], resume: bool, overwrite: bool) -> None:
    from aligntool.compress.recipe import load_compress_recipe
    from aligntool.compress.run import compress as run_compress
    from aligntool.outputs import check_model_saved

    loaded = load_compress_recipe(recipe, overrides)
    report = run_compress(loaded, resume=resume, overwrite=overwrite)
    b, h = report["bytes"], report["heldout"]
    _stderr(f"budget: {report['budget']}")
    _stderr(f"held-out perplexity {h['ppl_dense']:.3f} -> {h['ppl']:.3f}, KL(dense||compressed) {h['kl']:.4f}; "
            f"compressed layers {b['compressed_layers_dense']} -> {b['compressed_layers_packed']} bytes "
            f"({b['compressed_layers_ratio']:.3f})")
    check_model_saved(Path(loaded.output_dir), key="output_dir", what="compressed")
    print(loaded.output_dir)


def unpack(packed_dir: Path, out: Path, overwrite: bool) -> None:
    from aligntool.compress.packed import load_packed
    from aligntool.models import load_tokenizer
    from aligntool.outputs import atomic_path, check_model_saved, check_output

    out = out.expanduser()
    check_output(out, overwrite)
    model = load_packed(packed_dir)
    tokenizer = load_tokenizer(str(packed_dir), key="PACKED")
    with atomic_path(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    check_model_saved(out, key="--out", what="unpacked")
    print(out)


def export(output: Path, fmt: str, out: Path | None, overwrite: bool) -> None:
    from aligntool.compress import export as ct
    from aligntool.outputs import check_model_saved

    folder = ct.packed_folder(output)
    if out is None:
        if folder == Path(output).expanduser():
            raise UserError(f"--out: {output} is a packed folder; give the folder to write the export to")
        out = folder.parent / ct.FOLDER
    report = ct.export(output, out, fmt, overwrite)
    conv = report["conversion"]
    _stderr(f"{fmt} ({report['scheme']}): {report['bytes']} bytes; zero points made integer: max |w_ct - w| = "
            f"{conv['max_weight_error_over_scale']:.3f} scale ({conv['max_abs_weight_error']:.3g})")
    check_model_saved(out, key="--out", what="exported")
    print(out)


def evaluate(model: str, reference: str | None, task: str, num_prompts: int | None, samples: int,
             pass_k: str | None, max_new_tokens: int | None, temperature: float, batch_size: int, seed: int,
             revise: int, as_json: bool, user: dict | None = None) -> None:
    """``aligntool eval``: the toy world (default), the user's data (``--data`` / ``--recipe``) or lm-eval tasks
    (``--tasks``); ``user`` holds the options of the last two (see cli.py)."""
    result = eval_result(model, reference, task, num_prompts, samples, pass_k, max_new_tokens, temperature,
                         batch_size, seed, revise, user)
    if as_json:
        print(json.dumps(result))
        return
    _print_result(model, result)


def eval_result(model: str, reference: str | None, task: str, num_prompts: int | None, samples: int,
                pass_k: str | None, max_new_tokens: int | None, temperature: float, batch_size: int, seed: int,
                revise: int, user: dict | None = None) -> dict:
    """The result of ``aligntool eval`` (also written to ``user["out"]`` when given), as ``--json`` prints it; the
    Python API's ``aligntool.evaluate`` returns it."""
    from aligntool.eval import toy as toy_eval

    user = user or {}
    if task not in toy_eval.TASKS:
        raise UserError(f"--task: expected one of {', '.join(toy_eval.TASKS)}, got {task!r}")
    _check_eval_options(task, revise, user)
    out = user.get("out")
    if out is not None:
        out = Path(out).expanduser()
        if out.is_dir():
            raise UserError(f"--out: {out} is a folder; give a file to write the JSON result to")
        if out.exists() and not user.get("overwrite"):
            raise UserError(f"--out: {out} already exists; pass --overwrite to replace it, or choose another file")
    _not_packed(model, "--model")
    if reference is not None:
        _not_packed(reference, "--reference")
    if user.get("tasks"):
        from aligntool.eval.harness import run_tasks

        if reference:
            raise UserError("--reference: applies to the toy world and --data; with --tasks evaluate each model in "
                            "its own call")
        if num_prompts:
            raise UserError("--num-prompts: with --tasks, lm-eval's --limit sets the examples per task")
        result = run_tasks(model, user["tasks"], user.get("include_path") or [], user.get("backend", "hf"),
                           user.get("limit"), user.get("num_fewshot"), batch_size, seed)
    elif user.get("data") or user.get("recipe"):
        result = _evaluate_user(model, reference, num_prompts, max_new_tokens, temperature, batch_size, seed, user)
    elif task == "arithmetic":
        if revise:
            raise UserError("--revise: applies to --task reviews only")
        ks = toy_eval.parse_pass_k(pass_k, samples) if pass_k is not None else toy_eval.default_pass_k(samples)
        result = toy_eval.evaluate_arithmetic(
            model, reference=reference, num_prompts=num_prompts, samples=samples, pass_k=ks,
            max_new_tokens=max_new_tokens or toy_eval.ARITH_MAX_NEW_TOKENS, temperature=temperature,
            batch_size=batch_size, seed=seed)
    else:
        result = toy_eval.evaluate(model, reference=reference, num_prompts=num_prompts or 128,
                                   max_new_tokens=max_new_tokens or 48, temperature=temperature,
                                   batch_size=batch_size, seed=seed, revise=revise)
    if out is not None:
        from aligntool.outputs import write_atomic

        out.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(out, json.dumps(result, indent=1) + "\n")
    return result


def _check_eval_options(task: str, revise: int, user: dict) -> None:
    """Options that do not go together, one line each (before anything loads)."""
    data = user.get("data") or user.get("recipe")
    data_keys = [opt for k, opt in (("data", "--data"), ("recipe", "--recipe"), ("split", "--split"),
                                    ("data_opt", "--data-opt")) if user.get(k)]
    reward_keys = [opt for k, opt in (("reward_model", "--reward-model"), ("reward_fn", "--reward-fn")) if user.get(k)]
    if user.get("tasks"):
        given = data_keys + reward_keys
        if given:
            raise UserError(f"--tasks: runs lm-eval's own tasks on their own data; {' and '.join(given)} appl"
                            f"{'ies' if len(given) == 1 else 'y'} to evaluation on the user's data (a separate call)")
        if task == "arithmetic" or revise:
            raise UserError("--tasks: the toy options --task and --revise do not apply to lm-eval tasks")
        return
    lm_eval_opts = [opt for k, opt in (("include_path", "--include-path"), ("limit", "--limit"),
                                       ("num_fewshot", "--num-fewshot")) if user.get(k) not in (None, [])]
    if user.get("backend", "hf") != "hf":
        lm_eval_opts.append("--backend")
    if lm_eval_opts:
        raise UserError(f"{lm_eval_opts[0]}: applies to lm-eval tasks (--tasks) only")
    if reward_keys and not data:
        raise UserError(f"{reward_keys[0]}: scores generations on the user's data; give --data (the toy world is "
                        "scored by its gold reward)")
    if not data and data_keys:
        raise UserError(f"{data_keys[0]}: applies with --data or --recipe")
    if data and (task == "arithmetic" or revise):
        raise UserError(f"{'--task arithmetic' if task == 'arithmetic' else '--revise'}: a toy-world evaluation; "
                        "it does not apply to --data / --recipe")


def _evaluate_user(model: str, reference: str | None, num_prompts: int | None, max_new_tokens: int | None,
                   temperature: float, batch_size: int, seed: int, user: dict) -> dict:
    """``--data`` / ``--recipe``: generation scored by a reward source, a reward model's pairs, or perplexity."""
    from aligntool import models
    from aligntool.eval import likelihood
    from aligntool.eval import user as user_eval
    from aligntool.rewards import is_reward_model

    cfg, recipe_reward, base_dir = user_eval.data_source(user.get("data"), user.get("split"),
                                                         user.get("data_opt") or [], user.get("recipe"))
    path = models.resolve(model, key="--model", log=lambda m: None)
    if is_reward_model(path):
        given = [o for k, o in (("reward_model", "--reward-model"), ("reward_fn", "--reward-fn")) if user.get(k)]
        if given:
            raise UserError(f"{given[0]}: scores a causal LM's generations; --model is a reward model, evaluated by "
                            "its own scores on preference pairs")
        if reference:
            raise UserError("--reference: applies to language models only; --model is a reward model")
        return user_eval.evaluate_pairs(path, cfg, base_dir, num_prompts, batch_size)
    reward = user_eval.reward_config(user.get("reward_model"), user.get("reward_fn"), recipe_reward)
    if reward is None:
        return likelihood.evaluate_likelihood(path, reference, cfg, base_dir, num_prompts, batch_size)
    return user_eval.evaluate_generation(path, reference, cfg, reward, base_dir, num_prompts, max_new_tokens or 48,
                                         temperature, batch_size, seed)


def _print_result(model: str, result: dict) -> None:
    """A table: its title names the model and what it was measured on (the ``data`` field)."""
    from rich.console import Console
    from rich.table import Table

    data = result.get("data") or {}
    rows = f" ({data['rows']} rows)" if data.get("rows") is not None else ""
    print(f"data: {data.get('source', '?')}{rows}")  # whole, on one line, whatever the terminal's width
    table = Table(title=f"aligntool eval: {model}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("data", str(data.get("source", "?")))
    table.add_row("data_rows", str(data.get("rows")))
    for key, value in result.items():
        if key in ("data", "samples", "note"):
            continue
        if key == "tasks":
            for name, metrics in value.items():
                for metric, v in metrics.items():
                    table.add_row(f"{name} {metric}", f"{v:.4f}" if isinstance(v, float) else str(v))
            continue
        table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
    Console().print(table)
    if result.get("note"):
        print(f"note: {result['note']}")
    for row in result.get("samples") or []:
        rest = {k: v for k, v in row.items() if k not in ("prompt", "completion")}
        print(f"sample: ...{row['prompt'][-60:]!r} -> {row['completion'][:100]!r} {rest}")


def _not_packed(path: str, option: str) -> None:
    """A packed compressed folder is not a model folder: name the command that rebuilds one."""
    from aligntool.compress.packed import is_packed

    if is_packed(Path(path).expanduser()):
        parent = Path(path).expanduser().parent
        also = (f" (or evaluate the compress output {parent} itself, which holds the same weights unpacked)"
                if (parent / "compression_report.json").is_file() else "")
        raise UserError(f"{option}: {path} is a packed compressed model, not a model folder; rebuild one with "
                        f"`aligntool unpack {path} --out DIR` and evaluate DIR{also}")


def soup(models_: list[str], out: Path, weights: list[float] | None, overwrite: bool) -> None:
    from aligntool import models
    from aligntool.outputs import check_model_saved, check_output

    if len(models_) < 2:
        raise UserError("soup: give at least two models")
    if weights and (len(weights) != len(models_) or abs(sum(weights) - 1) > 1e-6):
        raise UserError(f"--weight: need one weight per model ({len(models_)}) summing to 1, got {weights}")
    out = out.expanduser()
    check_output(out, overwrite)
    written = models.make_soup(list(models_), weights or None, out, key="soup", log=_stderr)
    check_model_saved(written, key="--out", what="averaged")
    print(written)


def suggest_for_recipe(recipe: str, overrides: list[str], constants: str, nproc: int) -> None:
    """``aligntool suggest --recipe``: N from the recipe's model, D from its data and schedule."""
    from aligntool import data as data_mod
    from aligntool import models
    from aligntool.recipe import steplaw
    from aligntool.recipe.loader import load_recipe

    loaded = load_recipe(recipe, overrides + [f"train.step_law_constants={constants}"])
    if loaded.recipe.dataset.streaming:
        raise UserError("dataset.streaming: aligntool suggest counts the training set's tokens, which a streamed "
                        "dataset does not know; run it with dataset.streaming=false on the same data")
    m = loaded.recipe.model
    path = models.resolve(m.name_or_path, log=_stderr)
    tokenizer = models.load_tokenizer(path, m.trust_remote_code, m.revision, chat_template=m.chat_template,
                                      base_dir=loaded.base_dir, log=_stderr)
    train_set, _ = data_mod.load_for_recipe(loaded.recipe, loaded.spec.data, tokenizer, log=_stderr,
                                            base_dir=loaded.base_dir)
    s, values = steplaw.for_run(loaded, path, tokenizer, train_set, nproc, force=True)
    accum = loaded.recipe.train.gradient_accumulation_steps or 1
    t = loaded.recipe.train
    print(f"{loaded.source} ({loaded.spec.name}, model {m.name_or_path}, {len(train_set)} training rows; the recipe "
          f"has learning_rate {t.learning_rate or 'default'}, per_device_train_batch_size "
          f"{t.per_device_train_batch_size or 'default'}, max_steps {t.max_steps or 'unset (epochs)'})")
    for line in steplaw.format_suggestion(s, nproc, accum):
        print(line)
    print("recipe: train.learning_rate: auto and train.per_device_train_batch_size: auto apply these values")


# methods of the reference papers that are options of every (or one) algorithm rather than algorithms of their own
OPTIONS = [
    ("train.learning_rate, train.per_device_train_batch_size", "auto",
     "Step Law (Li et al. 2025): eta_opt(N, D), B_opt(D) for the model and the run's tokens; `aligntool suggest`"),
    ("train.optim (+ optimizer.kappa)", "lion_kappa",
     "Lion-kappa (Chen et al. 2023): Lion with sign (l1) or normalised momentum (l2); every trainer"),
    ("train.optim (+ optimizer.rank)", "cosmos",
     "COSMOS (Liu et al. 2025): SOAP on the leading eigensubspace, Muon on the rest, Adam for 1-D; every trainer"),
    ("algo.loss (+ algo.pass_n), sft", "dco",
     "Direct Coverage Optimization (Chen et al. 2025): fine-tuning for pass@N; aligntool/recipes/sft_pass_at_n.yaml"),
    ("dataset.toy.task", "arithmetic", "a verifiable toy task: 'Q: a+b= A:' with exactly checked answers"),
    ("dataset.toy.task", "tools", "the toy tool task: three-digit sums with a calculator (model tiny-tools); "
     "aligntool/recipes/grpo_tools.yaml, reinforce_pp_tools.yaml, remax_tools.yaml"),
    ("compress.saliency (mode sparsity)", "mfac",
     "M-FAC (Frantar et al. 2021): OBS saliency and update from the empirical Fisher; "
     "aligntool/recipes/compress_sparsity_mfac.yaml"),
]


def recipes() -> None:
    from rich.console import Console
    from rich.table import Table

    from aligntool.registry import ALGORITHMS

    table = Table(box=None, show_header=True, header_style="bold")
    for col in ("algorithm", "family", "recipe", "description"):
        table.add_column(col, overflow="fold")
    for spec in ALGORITHMS.values():
        table.add_row(spec.name, spec.family, spec.recipe, spec.summary)
    console = Console(width=max(120, Console().width))
    console.print(table)
    options = Table(box=None, show_header=True, header_style="bold", title="options from the papers, any recipe")
    for col in ("key", "value", "description"):
        options.add_column(col, overflow="fold")
    for row in OPTIONS:
        options.add_row(*row)
    console.print(options)


def init(name: str, out: Path | None, overwrite: bool) -> None:
    """``aligntool init NAME``: the built-in recipe NAME written for editing, every key commented with its
    description (aligntool/recipe/annotate.py), its values as they are."""
    import difflib

    from aligntool import __version__, registry
    from aligntool.outputs import write_atomic
    from aligntool.recipe.annotate import annotate, trl_help
    from aligntool.recipe.loader import builtin_recipe_names, safe_load

    names = builtin_recipe_names()
    if name not in names:
        close = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
        hint = f"did you mean {' or '.join(close)}?" if close else f"known: {', '.join(names)}"
        raise UserError(f"init: no built-in recipe {name!r}; {hint} (`aligntool recipes` lists them)")
    target = (out or Path(f"{name}.yaml")).expanduser()
    if target.is_dir():
        raise UserError(f"--out: {target} is a folder; give the recipe file to write")
    if target.exists() and not overwrite:
        raise UserError(f"init: {target} already exists; pass --overwrite to replace it, or --out another file")
    text = (registry.RECIPES_DIR / f"{name}.yaml").read_text(encoding="utf-8")
    data = safe_load(text) or {}
    header = [f"# Written by `aligntool init {name}` (aligntool {__version__}) from the built-in recipe {name!r}: edit "
              "it, then run", f"#   aligntool {'train' if 'algorithm' in data else 'compress'} --recipe {target}",
              "# Every key below is commented with its description; the keys left at their defaults follow each "
              "section, commented out.", ""]
    if "algorithm" in data:
        from aligntool.recipe.schema import Recipe

        spec = registry.get(data["algorithm"])
        skip = set() if spec.samples else {"reward", "generation"}
        annotated = annotate(text, Recipe, {("algo",): spec.load().AlgoConfig},
                             {("train",): trl_help(spec.trl_config_class())}, skip=skip, header=header)
    else:
        from aligntool.compress.recipe import CompressRecipe

        annotated = annotate(text, CompressRecipe, header=header)
    target.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(target, annotated)
    print(target)
    _stderr(f"edit it, then: aligntool {'train' if 'algorithm' in data else 'compress'} --recipe {target}")


def push(output: Path, repo_id: str, private: bool, revision: str | None, token: str | None, overwrite: bool,
         dry_run: bool) -> None:
    """``aligntool push``: the final model and its generated card to the Hub (aligntool/publish.py)."""
    from aligntool import publish

    folder = output.expanduser()
    if not dry_run:
        publish.push(folder, repo_id, private=private, revision=revision, token=token, overwrite=overwrite,
                     log=_stderr)
        return
    from huggingface_hub.utils import filter_repo_objects

    publish.check_repo_id(repo_id)
    card = publish.prepare(folder, repo_id, overwrite)
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    for name in filter_repo_objects(files, ignore_patterns=publish.UPLOAD_IGNORE):
        print(name)
    _stderr(f"--dry-run: model card written to {card}; nothing uploaded (the files above would be, to {repo_id})")
