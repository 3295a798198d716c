"""Stage files of multi-stage methods (sample -> score -> select -> train): JSONL written atomically by
aligntool/outputs.py (``write_jsonl``, ``write_stage_index``), each tagged with a hash of the settings that produced
it, so a rerun reuses a finished stage and redoes a stage whose settings changed. Only the main process computes a
stage; the other ranks then read its file."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path


def settings_hash(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def cached_stage(folder: Path, name: str, settings: dict, compute: Callable[[], list[dict]], force: bool = False,
                 log=print) -> list[dict]:
    """Rows of stage ``name``: read from ``folder/name.jsonl`` when its settings hash matches, else computed and saved.

    The hash lives in ``folder/stages.json``; a stage is reused only if every stage before it was too (callers pass
    the upstream hash inside ``settings``)."""
    import torch
    from accelerate import PartialState

    from aligntool.outputs import STAGE_INDEX, write_jsonl, write_stage_index

    path, index = folder / f"{name}.jsonl", folder / STAGE_INDEX
    digest = settings_hash(settings)
    state = PartialState(cpu=not torch.cuda.is_available())  # cpu=True: gloo process group on CPU machines
    with state.main_process_first():
        done = json.loads(index.read_text()) if index.is_file() else {}
        if not force and done.get(name) == digest and path.is_file():
            log(f"stage {name}: reusing {path}")
            return read_jsonl(path)
        if not state.is_main_process:  # the main process has just written it
            return read_jsonl(path)
        log(f"stage {name}: computing -> {path}")
        rows = compute()
        write_jsonl(path, rows)
        done[name] = digest
        write_stage_index(folder, done)
        return rows


def sample_groups(run, policy_path: str, prompts: list[str], k: int, cfg, seed: int) -> list[list[str]]:
    """The sampling step of the self-play methods (SPPO, INPO): ``k`` completions of each prompt from the policy at
    ``policy_path`` on this process's device, with the method's ``temperature``, ``top_p`` and ``max_new_tokens``."""
    from aligntool import models
    from aligntool.sampling import sample

    m = run.recipe.model
    policy = models.load_model(policy_path, **models.options(m)).to(models.run_device()).eval()
    repeated = [p for p in prompts for _ in range(k)]
    texts, _ = sample(policy, run.tokenizer, repeated, cfg.max_new_tokens, cfg.temperature, seed=seed, top_p=cfg.top_p)
    return [texts[i * k : (i + 1) * k] for i in range(len(prompts))]


def note_completions(run, rows: list[dict], step: int, stage: str) -> list[dict]:
    """``completions.jsonl``: the first ``train.num_completions_to_log`` pairs a pipeline sampled and selected (prompt,
    chosen, rejected and their scores or preference probability), tagged with the ``stage`` and ``step`` (the
    iteration; 0 before training), written when the stage is computed (a reused stage was written when it ran);
    returns ``rows``."""
    from aligntool.outputs import append_completions

    append_completions(run.output_dir, step, rows[: run.recipe.train.num_completions_to_log], stage=stage)
    return rows


def iterate(run, name: str, iterations: int, settings: dict, make_rows, make_trainer) -> dict:
    """Iterative self-play (SPPO, INPO): for t = 1..T on a disjoint part of the prompts, rows from the current iterate
    (``make_rows(t, policy_path, prompts)``, cached as ``iter-t/samples.jsonl``), then ``make_trainer(stage)`` trains
    the next iterate into ``iter-t/``; ``iter-t/iteration.done`` marks a finished iteration, which a rerun skips.
    The last iterate is also saved in ``output_dir``; returns the run summary."""
    import datasets

    from aligntool import models
    from aligntool.errors import UserError
    from aligntool.outputs import ITERATION_DONE, is_main_process, log, mark_iteration_done

    prompts = list(dict.fromkeys(run.train_dataset["prompt"]))
    if len(prompts) < iterations:
        raise UserError(f"algo.iterations: {iterations} iterations need at least as many prompts, got {len(prompts)}")
    policy_path, summaries = run.model_path, []
    for t in range(1, iterations + 1):
        stage = run.stage(f"iter-{t}", model_path=policy_path)
        if (stage.output_dir / ITERATION_DONE).is_file():
            log(f"{name}: iteration {t} already finished; reusing {stage.output_dir}")
            policy_path = str(stage.output_dir)
            continue
        part = prompts[t - 1 :: iterations]
        rows = cached_stage(stage.output_dir, "samples", {"policy": policy_path, "prompts": part, **settings},
                            lambda: note_completions(run, make_rows(t, policy_path, part), t, f"{name}/iter-{t}"),
                            log=log)
        if not rows:
            raise UserError(f"{name}: iteration {t}: no prompt gave a preference pair (its samples all tied under "
                            "the reward source)")
        log(f"{name}: iteration {t}/{iterations}: {len(rows)} pairs from {len(part)} prompts")
        stage.train_dataset, stage.eval_dataset = datasets.Dataset.from_list(rows), None
        summary = stage.fit(make_trainer(stage))
        summary["iteration"], summary["pairs"] = t, len(rows)
        summaries.append(summary)
        if is_main_process():
            mark_iteration_done(stage.output_dir)
        policy_path = str(stage.output_dir)

    final = models.load_model(policy_path, **models.options(run.recipe.model))
    if is_main_process():
        final.save_pretrained(run.output_dir, safe_serialization=True)
        run.tokenizer.save_pretrained(run.output_dir)
    from aligntool.outputs import summary

    last = summaries[-1] if summaries else {}
    return summary(name, "pipeline", sum(s["global_step"] for s in summaries),
                   sum(s["train_time_s"] for s in summaries), None, last.get("world_size", 1),
                   last.get("final_metrics"), None, iterations=iterations, final_policy=policy_path,
                   per_iteration=summaries)
