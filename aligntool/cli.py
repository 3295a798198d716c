"""The ``aligntool`` command line. Heavy imports (torch, transformers, TRL) happen inside commands, so ``--help``
answers at once."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import List, Optional

import typer

from aligntool import __version__, commands
from aligntool.errors import UserError

app = typer.Typer(
    name="aligntool",
    help="Align and compress language models from one YAML recipe.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

_DEBUG = {"on": False}


def _version(value: bool):
    if value:
        print(f"aligntool {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors."),
):
    _DEBUG["on"] = _DEBUG["on"] or debug


@app.command()
def train(
    recipe: str = typer.Option(..., "--recipe", "-r",
                               help="Recipe YAML file, or a built-in recipe name (dpo, sft, ...)."),
    overrides: Optional[List[str]] = typer.Argument(None, help="Recipe overrides KEY=VALUE, e.g. train.max_steps=50."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the latest complete checkpoint in output_dir "
                                "(the recipe must match the run's own recipe.yaml and process count; a finished run "
                                "is left as it is)."),
    accept_changes: bool = typer.Option(False, "--accept-changes", help="With --resume: continue the checkpoint even "
                                        "though data, model, method, schedule or process count changed (each change "
                                        "is listed); without it such a resume is refused."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the previous run in output_dir (its summary, "
                                   "metrics, checkpoints and iterations); without it such a folder is refused."),
    nproc: int = typer.Option(1, "--nproc", min=1, help="Processes on this node (torchrun): GPUs, or CPU ranks."),
    nnodes: int = typer.Option(1, "--nnodes", min=1, help="Nodes taking part (each runs this command)."),
    node_rank: int = typer.Option(0, "--node-rank", min=0, help="This node's rank, 0..nnodes-1."),
    master_addr: Optional[str] = typer.Option(None, "--master-addr", help="Host of node 0 (multi-node)."),
    master_port: int = typer.Option(29500, "--master-port", min=1, max=65535),
    slurm: bool = typer.Option(False, "--slurm", help="Inside a SLURM job step (the `aligntool slurm` script): take "
                               "nodes, node rank and main address from SLURM, resume if a checkpoint exists."),
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Resolve the recipe without weights or data (the model's "
                                 "config, model.config, built on the meta device) and print its memory plan per GPU "
                                 "with a verdict; exit 2 when it does not fit (docs/DRY_RUN.md)."),
    gpu_memory: Optional[str] = typer.Option(None, "--gpu-memory", help="With --dry-run: one GPU's memory, e.g. 80GB "
                                             "(default: the recipe's hardware.gpu_memory)."),
    as_json: bool = typer.Option(False, "--json", help="With --dry-run: print the plan as one JSON object."),
    ctx: typer.Context = None,
):
    """Train a model as the recipe says; outputs go to the recipe's output_dir."""
    _DEBUG["on"] = _DEBUG["on"] or debug
    if dry_run or gpu_memory is not None or as_json:  # the dry run: nothing trained, written or downloaded
        if not dry_run:
            raise UserError(f"{'--gpu-memory' if gpu_memory is not None else '--json'}: only with --dry-run")
        from aligntool.plan.dryrun import dry_run as plan_run

        given = {n: getattr(ctx.get_parameter_source(n), "name", "") == "COMMANDLINE" for n in ("nproc", "nnodes")}
        raise typer.Exit(plan_run(recipe, list(overrides or []), gpu_memory_option=gpu_memory, as_json=as_json,
                                  nproc=nproc if given["nproc"] else None, nnodes=nnodes if given["nnodes"] else None))
    from aligntool.entry import Launch, start

    launch = Launch(nproc, nnodes, node_rank, master_addr, master_port, slurm)
    if accept_changes and not (resume or slurm):
        raise UserError("--accept-changes: only with --resume (it accepts a changed recipe for the resumed run)")
    code = start(recipe, list(overrides or []), resume, overwrite, launch, _DEBUG["on"], accept_changes=accept_changes)
    if code:
        raise typer.Exit(code)


@app.command("merge-lora")
def merge_lora(
    adapter: str = typer.Argument(..., help="A LoRA adapter folder (a run with a peft section)."),
    out: str = typer.Option(..., "--out", help="Where to write the merged model."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace what --out already holds (refused without "
                                   "it)."),
    debug: bool = typer.Option(False, "--debug"),
):
    """Merge a LoRA adapter into its base model and save a plain transformers model folder (safetensors)."""
    _DEBUG["on"] = _DEBUG["on"] or debug
    commands.merge_lora(adapter, out, overwrite)


@app.command()
def slurm(
    recipe: str = typer.Option(..., "--recipe", "-r", help="Recipe file or algorithm name."),
    overrides: Optional[List[str]] = typer.Argument(None, help="key=value overrides passed to every node."),
    nodes: Optional[int] = typer.Option(None, "--nodes", min=1, help="Default: the recipe's hardware.nodes, else 1."),
    gpus_per_node: Optional[int] = typer.Option(None, "--gpus-per-node", min=0, help="GPUs (= processes) per node; "
                                                "default: the recipe's hardware.gpus_per_node, else 1."),
    time_limit: str = typer.Option(..., "--time", help="SLURM time limit, HH:MM:SS or D-HH:MM:SS."),
    partition: Optional[str] = typer.Option(None, "--partition"),
    account: Optional[str] = typer.Option(None, "--account"),
    cpus_per_task: Optional[int] = typer.Option(None, "--cpus-per-task", min=1),
    signal_lead: int = typer.Option(120, "--signal-lead", min=10, help="Seconds before the limit to checkpoint."),
    out: Optional[str] = typer.Option(None, "--out", help="Script path (default: OUTPUT_DIR/slurm.sbatch)."),
    debug: bool = typer.Option(False, "--debug"),
):
    """Write an sbatch script: srun + torchrun per node, --requeue, a checkpoint and a requeue on SLURM's signal."""
    _DEBUG["on"] = _DEBUG["on"] or debug
    from aligntool.launch.slurm import check_time, sbatch_script
    from aligntool.recipe.loader import load_recipe

    check_time(time_limit)
    overrides = list(overrides or [])
    loaded = load_recipe(recipe, overrides)
    hw = loaded.recipe.hardware  # the machines the recipe is written for give the defaults
    nodes = nodes or (hw.nodes if hw else 1)
    gpus_per_node = gpus_per_node if gpus_per_node is not None else (hw.gpus_per_node if hw and hw.gpus_per_node else 1)
    output_dir = str(Path(loaded.recipe.output_dir).expanduser())
    script = sbatch_script(recipe, overrides, nodes, gpus_per_node, time_limit, output_dir,
                           job_name=f"aligntool-{loaded.spec.name}", partition=partition, account=account,
                           cpus_per_task=cpus_per_task, signal_lead=signal_lead)
    from aligntool.outputs import prepare_output_dir

    # SLURM opens `#SBATCH --output=OUTPUT_DIR/slurm-%j.out` before the script's first line runs: the folder must
    # exist (and be writable) at submission, or the job dies at once ("Could not open stdout file")
    prepare_output_dir(Path(output_dir))
    path = Path(out) if out else Path(output_dir) / "slurm.sbatch"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(script)
    path.chmod(0o755)
    print(path)
    print(f"submit with: sbatch {path}", file=sys.stderr)


@app.command()
def compress(
    recipe: str = typer.Option(..., "--recipe", "-r", help="Compress recipe YAML, or a built-in name "
                               "(compress_sparsity, compress_quant, compress_depth, compress_jlcm)."),
    overrides: Optional[List[str]] = typer.Argument(None,
                                                    help="Recipe overrides KEY=VALUE, e.g. compress.sparsity=0.6."),
    resume: bool = typer.Option(False, "--resume",
                                help="Continue an interrupted EvoPress search from its saved state."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an earlier output in output_dir (refused "
                                   "without it)."),
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors."),
):
    """Compress a model after training (EvoPress per-layer search, uniform baseline, JLCM codebooks); writes a model
    folder transformers loads, its packed form, compression_report.json and levels.png."""
    _DEBUG["on"] = _DEBUG["on"] or debug
    commands.compress(recipe, list(overrides or []), resume, overwrite)


@app.command()
def unpack(
    packed_dir: Path = typer.Argument(..., metavar="PACKED",
                                      help="A packed folder (OUTPUT_DIR/packed of a compress run)."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder to write the rebuilt model to."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace what --out already holds (refused without "
                                   "it)."),
    debug: bool = typer.Option(False, "--debug"),
):
    """Rebuild a model folder from the packed compressed form (checksum checked)."""
    _DEBUG["on"] = _DEBUG["on"] or debug
    commands.unpack(packed_dir, out, overwrite)


@app.command()
def export(
    output: Path = typer.Argument(..., metavar="OUTPUT", help="A compress output folder (or its packed/ folder)."),
    fmt: str = typer.Option("compressed-tensors", "--format", help="compressed-tensors: the format transformers and "
                            "vLLM load quantized checkpoints from (mode quant only)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Folder to write; default OUTPUT/compressed-tensors."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace what --out already holds (refused without "
                                   "it)."),
    debug: bool = typer.Option(False, "--debug"),
):
    """Write a compressed model in another format (compressed-tensors: transformers and vLLM load it)."""
    _DEBUG["on"] = _DEBUG["on"] or debug
    commands.export(output, fmt, out, overwrite)


@app.command("eval")
def evaluate(
    model: str = typer.Option(..., "--model", "-m",
                              help="Model folder (a train output_dir), 'tiny', 'tiny-arith', or a hub id."),
    reference: Optional[str] = typer.Option(None, "--reference",
                                            help="Reference model for KL and win rate, or for the gains on "
                                                 "arithmetic ('tiny' ok)."),
    task: str = typer.Option("reviews", "--task", help="Toy world: reviews: gold reward, KL, win rate; "
                             "arithmetic: greedy accuracy and pass@k on held-out toy addition questions."),
    data: Optional[str] = typer.Option(None, "--data", help="The user's data instead of the toy world (a file, "
                                       "folder, glob or hub id, as dataset.path): prompts (generation, with a reward "
                                       "source), preference pairs (a reward model) or SFT rows (perplexity)."),
    split: Optional[str] = typer.Option(None, "--split", help="Split of --data, with slices (test[:200])."),
    data_opt: Optional[List[str]] = typer.Option(None, "--data-opt", help="KEY=VALUE: any field of a recipe's "
                                                 "dataset section for --data (repeatable), e.g. max_samples=50."),
    recipe: Optional[str] = typer.Option(None, "--recipe", "-r", help="Take the data (dataset: its eval_path "
                                         "first) and the reward source (reward:) from this recipe."),
    reward_model: Optional[str] = typer.Option(None, "--reward-model", help="Score generations on --data with "
                                               "this reward-model folder."),
    reward_fn: Optional[str] = typer.Option(None, "--reward-fn", help="Score generations on --data with "
                                            "module:function (fn(prompts, completions, **columns))."),
    tasks: Optional[str] = typer.Option(None, "--tasks", help="lm-evaluation-harness tasks, comma-separated: "
                                        "names (hellaswag,gsm8k) or task YAML files."),
    include_path: Optional[List[str]] = typer.Option(None, "--include-path", help="Folder of lm-eval task YAMLs "
                                                     "(repeatable)."),
    backend: str = typer.Option("hf", "--backend", help="lm-eval backend: hf, or vllm where vLLM is installed."),
    limit: Optional[float] = typer.Option(None, "--limit", min=0, help="lm-eval: examples per task (< 1: a "
                                          "fraction)."),
    num_fewshot: Optional[int] = typer.Option(None, "--num-fewshot", min=0, help="lm-eval: few-shot examples."),
    num_prompts: Optional[int] = typer.Option(None, "--num-prompts", min=1,
                                              help="Prompts (pairs, rows) to evaluate; toy default 128 (all held-out "
                                                   "questions for arithmetic), --data default all."),
    samples: int = typer.Option(8, "--samples", min=1, help="arithmetic: sampled completions per question."),
    pass_k: Optional[str] = typer.Option(None, "--pass-k", help="arithmetic: the k of pass@k, comma-separated, "
                                         "each <= --samples; default 1,4,8 (those <= --samples) and --samples."),
    max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens", min=1,
                                                 help="Default 48 (reviews, --data), 8 (arithmetic)."),
    temperature: float = typer.Option(1.0, "--temperature", min=0.0, help="Sampling temperature; 0 = greedy."),
    batch_size: int = typer.Option(64, "--batch-size", min=1),
    seed: int = typer.Option(0, "--seed"),
    revise: int = typer.Option(0, "--revise", min=0, help="Self-revision steps (SRPO) applied before scoring."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of a table."),
    out: Optional[Path] = typer.Option(None, "--out", help="Also write the result as JSON to this file."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the --out file if it exists."),
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors."),
):
    """Score a model: on the toy world (default), on the user's data (--data / --recipe: generations scored by a
    reward source, a reward model's pairwise accuracy, or perplexity), or on lm-eval tasks (--tasks); docs/EVAL.md."""
    _DEBUG["on"] = _DEBUG["on"] or debug
    commands.evaluate(model, reference, task, num_prompts, samples, pass_k, max_new_tokens, temperature, batch_size,
                      seed, revise, as_json, user=dict(
                          data=data, split=split, data_opt=list(data_opt or []), recipe=recipe,
                          reward_model=reward_model, reward_fn=reward_fn, tasks=tasks,
                          include_path=list(include_path or []), backend=backend, limit=limit,
                          num_fewshot=num_fewshot, out=out, overwrite=overwrite))


@app.command()
def soup(
    models_: List[str] = typer.Argument(..., metavar="MODEL...", help="Two or more model folders (or hub ids)."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder to write the averaged model to."),
    weights: Optional[List[float]] = typer.Option(None, "--weight", "-w", help="One per model (default equal)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace what --out already holds (refused without "
                                   "it)."),
    debug: bool = typer.Option(False, "--debug"),
):
    """Average models in weight space (a SALSA soup) and write a model folder transformers loads. LoRA adapter
    folders of one base are merged into it first and the merged models averaged (the exact average of the models;
    averaging the A and B matrices would not be)."""
    commands.soup(list(models_), out, weights, overwrite)


@app.command()
def bon(
    model: str = typer.Option("tiny", "--model", "-m", help="Policy to sample from."),
    reward: Optional[List[str]] = typer.Option(None, "--reward", "-r",
                                               help="Reward-model folder; repeat for an ensemble. Default: gold."),
    aggregate: str = typer.Option("mean", "--aggregate", help="Ensemble objective: mean, wco or uwo."),
    uwo_lambda: float = typer.Option(0.5, "--uwo-lambda", min=0.0),
    n_max: int = typer.Option(16, "--n", min=1, help="Largest n (samples drawn per prompt)."),
    num_prompts: int = typer.Option(64, "--num-prompts", min=1),
    seed: int = typer.Option(0, "--seed"),
    as_json: bool = typer.Option(False, "--json"),
    debug: bool = typer.Option(False, "--debug"),
):
    """Best-of-n with the unbiased estimator over n = 1..N: proxy and gold reward against KL (Coste et al. 2023)."""
    import json

    from pydantic import ValidationError

    from aligntool.eval.bon import best_of_n
    from aligntool.recipe.schema import RewardConfig

    reward = list(reward or [])
    try:
        cfg = RewardConfig(source=reward[0] if len(reward) == 1 else "gold",
                           ensemble=reward if len(reward) > 1 else None,
                           aggregate=aggregate, uwo_lambda=uwo_lambda)
    except ValidationError as exc:
        e = exc.errors()[0]
        raise UserError(f"--reward/--aggregate: {e['msg']}") from None
    result = best_of_n(model, cfg, n_max, num_prompts, seed=seed)
    if as_json:
        print(json.dumps(result))
        return
    print(f"{'n':>4} {'KL bound':>9} {'proxy':>8} {'gold':>8}")
    for row in result["curve"]:
        print(f"{row['n']:>4} {row['kl_bound']:>9.3f} {row['proxy']:>8.3f} {row['gold']:>8.3f}")


@app.command()
def suggest(
    recipe: Optional[str] = typer.Option(None, "--recipe", "-r", help="Count N from this recipe's model and D from its "
                                         "data and schedule (train.max_steps or epochs, batch, processes)."),
    overrides: Optional[List[str]] = typer.Argument(None, help="Recipe overrides KEY=VALUE."),
    params: Optional[float] = typer.Option(None, "--params", help="N: non-embedding parameters (instead of a recipe)."),
    tokens: Optional[float] = typer.Option(None, "--tokens", help="D: training tokens (instead of a recipe)."),
    seq_len: Optional[float] = typer.Option(None, "--seq-len", help="Tokens per sequence, for the batch in sequences."),
    nproc: int = typer.Option(1, "--nproc", min=1, help="Processes the run will use (shares the batch)."),
    constants: str = typer.Option("tool", "--constants", help="tool: the authors' bootstrap-mean fit (default); "
                                  "paper: the rounded constants printed in the paper."),
):
    """Step Law (Li et al. 2025): the suggested peak learning rate and batch size for a recipe (or N and D)."""
    from aligntool.recipe import steplaw

    if constants not in steplaw.CONSTANTS:
        raise UserError(f"--constants: expected one of {', '.join(steplaw.CONSTANTS)}, got {constants!r}")
    if recipe is None:
        if params is None or tokens is None:
            raise UserError("suggest: give --recipe, or --params N and --tokens D")
        if params <= 0 or tokens <= 0 or (seq_len is not None and seq_len <= 0):
            raise UserError(f"suggest: --params, --tokens and --seq-len must be positive, got {params}, {tokens}, "
                            f"{seq_len}")
        for line in steplaw.format_suggestion(steplaw.suggest(int(params), tokens, seq_len, constants), nproc):
            print(line)
        return
    if params is not None or tokens is not None:
        raise UserError("suggest: give either --recipe or --params/--tokens, not both")
    commands.suggest_for_recipe(recipe, list(overrides or []), constants, nproc)


@app.command()
def recipes():
    """List every algorithm with a one-line description and its recipe file."""
    commands.recipes()


@app.command()
def init(
    name: str = typer.Argument(..., metavar="NAME", help="A built-in recipe name (`aligntool recipes` lists them)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="File to write (default: ./NAME.yaml)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the file if it exists (refused without it)."),
    debug: bool = typer.Option(False, "--debug"),
):
    """Write a built-in recipe to a file for editing, every key commented with its description (the keys it leaves
    at their defaults listed, commented out)."""
    _DEBUG["on"] = _DEBUG["on"] or debug
    commands.init(name, out, overwrite)


@app.command()
def push(
    output: Path = typer.Argument(..., metavar="OUTPUT", help="A finished run's output_dir (or another model folder "
                                  "aligntool wrote: merge-lora, soup, unpack, compress)."),
    repo_id: str = typer.Option(..., "--repo-id", help="Hub repository OWNER/NAME (created if missing)."),
    private: bool = typer.Option(False, "--private", help="Create the repository private (an existing one keeps its "
                                 "visibility)."),
    revision: Optional[str] = typer.Option(None, "--revision", help="Branch to upload to (created if missing); "
                                           "default main."),
    token: Optional[str] = typer.Option(None, "--token", help="Hub token with write access (default: HF_TOKEN, "
                                        "then the one `hf auth login` saved)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a README.md in OUTPUT that aligntool did not "
                                   "write with the generated model card."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Write the model card (OUTPUT/README.md) and list the files "
                                 "that would be uploaded; upload nothing."),
    debug: bool = typer.Option(False, "--debug"),
):
    """Upload a run's final model (never its checkpoints) to the Hugging Face Hub with a generated model card: base
    model, method and paper, data, recipe, final metrics, `aligntool eval --out` results in OUTPUT (docs/SHARING.md)."""
    _DEBUG["on"] = _DEBUG["on"] or debug
    commands.push(output, repo_id, private, revision, token, overwrite, dry_run)


@app.command()
def doctor(as_json: bool = typer.Option(False, "--json", help="Print one JSON object.")):
    """Versions, devices, threads and caches, and the incompatibilities aligntool can detect (for bug reports)."""
    import json

    from aligntool.doctor import report

    rows, warnings = report()
    if as_json:
        print(json.dumps({"environment": dict(rows), "warnings": warnings}))
        return
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    for w in warnings:
        print(f"warning: {w}")
    if not warnings:
        print("no known incompatibility found")


@app.command()
def tiny():
    """Build (first time, ~1 min) or find the built-in tiny model and print its folder."""
    from aligntool.toy.tiny import tiny_model_path

    print(tiny_model_path(log=lambda m: print(m, file=sys.stderr)))


# options of `accelerate launch` that users give to `aligntool train`: what aligntool takes instead
_ACCELERATE_LAUNCH = (
    "is an option of `accelerate launch`, not of aligntool: run `accelerate launch --config_file FILE -m aligntool.cli "
    "train --recipe ...`, or let aligntool launch it (--nproc N, and the recipe's distributed.backend: ddp, deepspeed "
    "or fsdp)")
_ACCELERATE_FLAGS = {
    "config_file": _ACCELERATE_LAUNCH, "use_deepspeed": _ACCELERATE_LAUNCH, "deepspeed_config_file": _ACCELERATE_LAUNCH,
    "use_fsdp": _ACCELERATE_LAUNCH, "multi_gpu": _ACCELERATE_LAUNCH,
    "zero_stage": "is an option of `accelerate launch`; aligntool takes distributed.backend=deepspeed "
                  "distributed.zero_stage=N",
    "num_processes": "is an option of `accelerate launch`; aligntool takes --nproc N",
    "num_machines": "is an option of `accelerate launch`; aligntool takes --nnodes N",
    "machine_rank": "is an option of `accelerate launch`; aligntool takes --node-rank N",
    "main_process_ip": "is an option of `accelerate launch`; aligntool takes --master-addr HOST",
    "main_process_port": "is an option of `accelerate launch`; aligntool takes --master-port PORT",
    "mixed_precision": "is an option of `accelerate launch`; aligntool takes train.bf16=true or train.fp16=true",
}


def _usage_message(exc: Exception) -> str:
    """One line for a command-line mistake: Typer's message with its suggestions (the close option or command
    names), and where the command's help is."""
    option = getattr(exc, "option_name", None) or ""
    ctx = getattr(exc, "ctx", None)
    command = ctx.command_path if ctx is not None else "aligntool"
    accelerate = _ACCELERATE_FLAGS.get(option[2:].replace("-", "_")) if option.startswith("--") else None
    if accelerate and command.endswith(" train"):
        return f"{option} {accelerate}"
    possibilities = [p for p in getattr(exc, "possibilities", None) or [] if p != "--help"]
    if option and possibilities:  # click's "(Possible options: ...)", said as aligntool says it elsewhere
        message = f"{getattr(exc, 'message', exc)} (did you mean {' or '.join(possibilities)}?)"
    else:
        message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
    message = " ".join(message.split()).rstrip(".")  # one line
    if ctx is None:
        return message
    return f"{message}{' See' if message.endswith('?') else '; see'} `{command} --help`"


def main(argv: list[str] | None = None) -> int:
    """Entry point: a ``UserError`` or a command-line usage error becomes one line on stderr and exit code 2
    (traceback only with --debug)."""
    import warnings

    from aligntool import quiet

    # transformers 5 renamed gradient_checkpointing; TRL still uses the old names on every step
    warnings.filterwarnings("ignore", message=r".*gradient_checkpointing.*deprecated", category=FutureWarning)
    warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.*deprecated", category=FutureWarning)
    quiet.install()  # bitsandbytes' import-time kernel-loader warnings (TRL and peft import it)
    args = list(sys.argv[1:] if argv is None else argv)
    _DEBUG["on"] = "--debug" in args
    if not args:  # no_args_is_help: the help, on stdout, as `aligntool --help` prints it
        args = ["--help"]
    try:
        rc = app(args=args, prog_name="aligntool", standalone_mode=False)
    except UserError as exc:
        if _DEBUG["on"]:
            raise
        print(f"aligntool: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except typer.Exit as exc:
        return exc.exit_code
    except typer.TyperException as exc:  # Typer's own (vendored click) usage errors: unknown option, bad value, ...
        if _DEBUG["on"]:
            raise
        print(f"aligntool: error: {_usage_message(exc)}", file=sys.stderr)
        return UserError.exit_code
    except typer.Abort:
        print("aligntool: aborted", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("aligntool: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # preemption and friends
        from aligntool.launch.preemption import Preempted

        if isinstance(exc, Preempted):  # a checkpoint was written: resumable, but not finished
            if os.environ.get("RANK", "0") == "0":
                print(f"aligntool: {exc}", file=sys.stderr)
            # under torchrun a rank exits 0 (any other code is a failure to torchrun); the launcher exits 75
            return 0 if "LOCAL_RANK" in os.environ else Preempted.exit_code
        raise
    return rc if isinstance(rc, int) else 0


if __name__ == "__main__":
    sys.exit(main())
