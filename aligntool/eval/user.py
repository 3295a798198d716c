"""`aligntool eval --data` / `--recipe`: evaluation on the user's own data (docs/EVAL.md has every formula).

The rows are read by ``aligntool.data.load_for_recipe`` from a ``DatasetConfig`` (``--data PATH``, ``--split``,
``--data-opt KEY=VALUE``, or the recipe's ``dataset`` section, its held-out ``eval_path`` first), so every option of
the recipe's dataset section applies here as in training. Three modes, chosen by the model and the options:

- generation (a causal LM with a reward source: ``--reward-model``, ``--reward-fn`` or the recipe's ``reward``):
  one sampled completion per distinct prompt, scored by ``aligntool.rewards.load`` (the code path training uses;
  reward functions get the dataset's other columns as keyword arguments); with ``--reference``, its samples too, the
  win rate (ties 1/2), the Monte-Carlo KL(policy || reference) per sequence and the paired gain;
- pairs (a reward model): pairwise accuracy and margin on the user's preference pairs;
- likelihood (a causal LM without a reward source): NLL per token and perplexity on SFT rows.

Sequences longer than the model's context keep their end (the prompt's last tokens); the result counts them.
"""

from __future__ import annotations

from types import SimpleNamespace

from aligntool.errors import UserError
from aligntool.eval.toy import _mean_stderr
from aligntool.quiet import without_progress_bars


def _shape_error(message: str) -> bool:
    """Whether a data error says the rows are not of the kind asked for (so another kind may fit): data.check_columns'
    "missing column(s) for KIND data: expected ...", or a ``dataset.format`` that gives other kinds of data."""
    return "data: expected" in message or ("dataset.format" in message and " gives " in message
                                           and " trains on " in message)


def parse_data_opts(opts: list[str]) -> dict:
    """``--data-opt KEY=VALUE`` (repeatable) as DatasetConfig fields; VALUE is YAML (``max_samples=20``,
    ``columns={question: prompt}``), a dotted KEY sets a nested field (``columns.question=prompt``)."""
    import yaml

    fields: dict = {}
    for opt in opts:
        key, sep, value = opt.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--data-opt: expected KEY=VALUE (a field of the recipe's dataset section), got {opt!r}")
        try:
            parsed = yaml.safe_load(value) if value.strip() else None
        except yaml.YAMLError as exc:
            raise UserError(f"--data-opt {key}: {value!r} is not a YAML value ({str(exc).splitlines()[0]})") from None
        *parents, leaf = key.strip().split(".")
        node = fields
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise UserError(f"--data-opt {key}: {part} is set to a value already, not a section")
        node[leaf] = parsed
    return fields


def _dataset_config(fields: dict, key: str):
    from pydantic import ValidationError

    from aligntool.recipe.schema import DatasetConfig

    try:
        return DatasetConfig(**fields)
    except ValidationError as exc:
        e = exc.errors()[0]
        where = ".".join(str(p) for p in e["loc"])
        raise UserError(f"{key} {where}: {e['msg']}") from None


def _eval_as_path(fields: dict, base_dir) -> None:
    """The recipe's held-out source as the one to read, as training reads it: an eval file with eval_split at its
    default is read whole; the training source's hub config and files (``name``, ``data_files``) do not apply to a
    local eval file; a training mixture does not apply at all."""
    from aligntool.data import GLOB_CHARS, local_candidates
    from aligntool.recipe.schema import DatasetConfig

    defaults = DatasetConfig.model_fields
    whole = fields["eval_split"] == defaults["eval_split"].default
    fields["path"] = fields["eval_path"]
    local = any(c.is_file() for c in local_candidates(fields["path"], base_dir))
    files = local or any(ch in fields["path"] for ch in GLOB_CHARS)
    # a file or a glob has one split, read whole when eval_split is left at its default; a hub id or a folder has
    # its own splits, and training reads eval_split ('test') there: never the split the model trained on
    fields["split"] = defaults["split"].default if whole and files else fields["eval_split"]
    fields.update({k: None for k in ("mixture", "mixture_size") + (("name", "data_files") if local else ())
                   if k in fields})


def data_source(data: str | None, split: str | None, opts: list[str], recipe: str | None,
                overrides: list[str] = ()) -> tuple:
    """(DatasetConfig, the recipe's RewardConfig or None, base_dir) from the options: the recipe's dataset section
    (its eval_path / eval_split when it has one), with ``--data`` / ``--split`` / ``--data-opt`` over it."""
    fields: dict = {}
    reward, base_dir = None, None
    if recipe is not None:
        from aligntool.recipe.loader import load_recipe

        loaded = load_recipe(recipe, list(overrides))
        base_dir, reward = loaded.base_dir, loaded.recipe.reward
        fields = loaded.recipe.dataset.model_dump(exclude_unset=False)
        held_out = bool(fields.get("eval_path"))
        if held_out:
            _eval_as_path(fields, base_dir)
        # without an eval_path, the recipe's eval_fraction holds out the same rows training held out (load_rows)
        fields.update(eval_path=None, unpaired_from_pairs=False,
                      **({"eval_fraction": 0.0} if held_out or data is not None else {}))
        fields.update({k: False for k in ("streaming",) if k in fields})
    if data is not None:
        fields["path"] = data
    if split is not None:
        fields["split"] = split
    fields.update(parse_data_opts(opts))
    if fields.get("path", "toy") == "toy" and not fields.get("mixture"):
        where = "--data toy" if data == "toy" else f"--recipe {recipe}: its dataset"
        raise UserError(f"{where} is the toy world; give --data FILE, or evaluate the toy world without --data and "
                        "--recipe")
    key = "--data-opt" if opts else "--recipe dataset" if recipe else "--data"
    return _dataset_config(fields, key), reward, base_dir


def reward_config(reward_model: str | None, reward_fn: str | None, recipe_reward):
    """The reward source: ``--reward-model`` / ``--reward-fn`` (both: their sum), else the recipe's ``reward``."""
    from aligntool.recipe.schema import RewardConfig, RewardTerm

    if reward_model and reward_fn:
        return RewardConfig(functions=[RewardTerm(source=reward_model), RewardTerm(function=reward_fn)])
    if reward_model:
        return RewardConfig(source=reward_model)
    if reward_fn:
        return RewardConfig(function=reward_fn)
    return recipe_reward


def describe(cfg, rows: int, base_dir) -> dict:
    from aligntool.data import shown_path

    mixture = getattr(cfg, "mixture", None)
    if mixture:
        source = "mixture of " + ", ".join(f"{shown_path(m.path, base_dir)} split {m.split}" for m in mixture)
    else:
        source = f"{shown_path(cfg.path, base_dir)} split {cfg.split}"
    if getattr(cfg, "eval_fraction", 0):
        source += f", the {cfg.eval_fraction:g} held out for evaluation (dataset.eval_fraction, seed {cfg.toy.seed})"
    return {"source": source, "path": cfg.path, "split": cfg.split, "rows": rows}


def _log(message: str) -> None:
    import sys

    print(message, file=sys.stderr)


@without_progress_bars  # datasets' bars of each map would come before a one-line error
def load_rows(cfg, kinds: tuple[str, ...], tokenizer, base_dir, what: str):
    """(dataset, kind): the data read as the first of ``kinds`` whose columns it has; none fitting is one line that
    says what ``what`` needs and the columns found."""
    from aligntool.data import load_for_recipe

    found = None
    for kind in kinds:
        try:
            recipe = SimpleNamespace(dataset=cfg, algorithm="aligntool eval", train=SimpleNamespace(max_steps=None))
            data, held_out = load_for_recipe(recipe, kind, tokenizer, log=_log, base_dir=base_dir)
            if cfg.eval_fraction and held_out is not None:  # the rows training held out (same seed, same rows)
                data = held_out
        except UserError as exc:
            if not _shape_error(str(exc)):
                raise
            found = str(exc).rpartition("found: ")[2] if "found: " in str(exc) else found
            continue
        if kind == "preference" and "prompt" not in data.column_names:  # conversations: TRL splits them
            from trl.data_utils import extract_prompt

            data = data.map(extract_prompt)
        return data, kind
    raise UserError(f"--data {cfg.path}: {what}; found the columns: {found}")


def _context(model, tokenizer) -> int:
    """Positions the model reads: its config's max_position_embeddings (or the tokenizer's limit when smaller)."""
    ctx = getattr(model.config, "max_position_embeddings", None) or 10**9
    limit = getattr(tokenizer, "model_max_length", None)
    return min(ctx, limit) if isinstance(limit, int) and limit > 0 else ctx


def _gain(values: list[float], reference: list[float]) -> dict:
    """Paired gain over the rows: mean and s.e. of d = value - reference value, and mean(d) / se(d)."""
    gain, err = _mean_stderr([a - b for a, b in zip(values, reference)])
    return {"gain": gain, "gain_stderr": err, "gain_in_stderrs": gain / err if err else 0.0 if gain == 0 else None}


# ------------------------------------------------------------------------------------------------ (a) generation
def unique_prompts(data, tokenizer) -> tuple[list[str], dict]:
    """Distinct prompts in file order (as text) and, for each, the first row's other columns (as training's engine
    passes them to reward functions)."""
    from aligntool.data import cell_kind

    prompts, columns = [], {}
    for row in data.to_list():
        prompt = row["prompt"]
        if cell_kind(prompt) == "conversation":
            prompt = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        if prompt not in columns:
            prompts.append(prompt)
            columns[prompt] = {k: v for k, v in row.items() if k != "prompt"}
    return prompts, columns


def _generate(model, tokenizer, prompt_ids, max_new_tokens, temperature, batch_size, seed):
    """One completion per tokenised prompt, seeded per batch as ``sampling.sample`` seeds it: (texts, ids)."""
    import torch

    from aligntool.sampling import generate_from_ids
    from aligntool.tokens import stop_ids

    stops, texts, ids = stop_ids(tokenizer), [], []
    for start in range(0, len(prompt_ids), batch_size):
        torch.manual_seed(seed + start)
        rows = generate_from_ids(model, prompt_ids[start : start + batch_size], tokenizer.pad_token_id, stops,
                                 max_new_tokens, temperature=temperature, greedy=temperature <= 0, empty_as_stop=False)
        ids += rows
        texts += [tokenizer.decode(r, skip_special_tokens=True) for r in rows]
    return texts, ids


def evaluate_generation(model: str, reference: str | None, cfg, reward_cfg, base_dir, num_prompts: int | None,
                        max_new_tokens: int, temperature: float, batch_size: int, seed: int) -> dict:
    """Mode (a): see the module docstring and docs/EVAL.md."""
    from aligntool import rewards
    from aligntool.eval.toy import _load_lm
    from aligntool.tokens import encode_prompts

    rewards.check_functions(reward_cfg)  # a typo in module:function fails before any model loads
    if reward_cfg.judge and not reference:
        raise UserError("reward.judge: a pairwise judge compares two completions; give --reference to compare the "
                        "model's samples with the reference's (or a reward source that scores one completion)")
    scorer = None if reward_cfg.judge else rewards.load(reward_cfg)  # a bad reward model fails before sampling
    policy, tokenizer = _load_lm(model, "--model")
    data, kind = load_rows(cfg, ("prompt", "preference", "language_modeling"), tokenizer, base_dir,
                           "generation needs prompts: a prompt column, preference pairs (chosen/rejected, the prompt "
                           "implicit or explicit) or prompt/completion rows")
    if kind == "language_modeling" and "prompt" not in data.column_names:
        raise UserError(f"--data {cfg.path}: generation needs prompts; these rows hold whole texts "
                        f"({', '.join(data.column_names)}) and no prompt (without a reward source, eval measures the "
                        "model's perplexity on them)")
    prompts, columns = unique_prompts(data, tokenizer)
    prompts = prompts[:num_prompts] if num_prompts else prompts
    limit = _context(policy, tokenizer) - max_new_tokens
    if limit < 1:
        raise UserError(f"--max-new-tokens: {max_new_tokens} leaves no room for a prompt in the model's context "
                        f"({_context(policy, tokenizer)} positions)")
    prompt_ids = encode_prompts(tokenizer, prompts)
    cut = sum(len(p) > limit for p in prompt_ids)
    prompt_ids = [p[-limit:] for p in prompt_ids]
    texts, ids = _generate(policy, tokenizer, prompt_ids, max_new_tokens, temperature, batch_size, seed)
    cols = {c: [columns[p][c] for p in prompts] for c in (columns[prompts[0]] if prompts else {})}
    result = {"model": model, "kind": "causal_lm", "mode": "generation", "data": describe(cfg, len(data), base_dir),
              "num_prompts": len(prompts), "reward_source": _reward_name(reward_cfg),
              "mean_length_tokens": sum(map(len, ids)) / max(1, len(ids)), "temperature": temperature}
    if cut:
        result["note"] = (f"{cut} of {len(prompts)} prompts exceed {limit} tokens (the model's context less "
                          f"--max-new-tokens): their first tokens were cut, the end kept")
    scores = None
    if scorer is not None:
        scores = scorer(prompts, texts, **cols)
        result["reward"], result["reward_stderr"] = _mean_stderr(scores)
    if reference:
        result.update(_against_reference(reference, reward_cfg, scorer, tokenizer, policy, prompts, prompt_ids,
                                         texts, ids, scores, cols, max_new_tokens, temperature, batch_size, seed))
    result["samples"] = [{"prompt": p, "completion": t, **({"reward": s} if scores else {})}
                         for p, t, s in list(zip(prompts, texts, scores or [None] * len(texts)))[:3]]
    return result


def _reward_name(cfg) -> str:
    if cfg.judge:
        return f"judge {cfg.judge}"
    if cfg.functions:
        return " + ".join(f"{t.weight} * {t.function or t.source}" for t in cfg.functions)
    if cfg.ensemble:
        return f"ensemble ({cfg.aggregate}) of {', '.join(cfg.ensemble)}"
    return cfg.function or cfg.source


def _against_reference(reference, reward_cfg, scorer, tokenizer, policy, prompts, prompt_ids, texts, ids, scores, cols,
                       max_new_tokens, temperature, batch_size, seed) -> dict:
    from aligntool.eval.toy import _load_lm
    from aligntool.sampling import sequence_logprobs

    ref, ref_tok = _load_lm(reference, "--reference")
    if ref_tok.get_vocab() != tokenizer.get_vocab():
        raise UserError("--reference: its tokenizer differs from the model's; KL needs a shared vocabulary")
    ref_texts, _ = _generate(ref, ref_tok, prompt_ids, max_new_tokens, temperature, batch_size, seed + 1)
    lp = sequence_logprobs(policy, tokenizer, prompt_ids, ids, batch_size)
    lp_ref = sequence_logprobs(ref, tokenizer, prompt_ids, ids, batch_size)
    out = {"reference": reference}
    out["kl_to_reference"], out["kl_to_reference_stderr"] = _mean_stderr([a - b for a, b in zip(lp, lp_ref)])
    if reward_cfg.judge:
        from aligntool.preferences import PreferenceSource

        wins = PreferenceSource(reward_cfg).probabilities(prompts, texts, ref_texts)
    else:
        ref_scores = scorer(prompts, ref_texts, **cols)
        out["reference_reward"], out["reference_reward_stderr"] = _mean_stderr(ref_scores)
        gain = _gain(scores, ref_scores)
        out.update(reward_gain=gain["gain"], reward_gain_stderr=gain["gain_stderr"],
                   gain_in_stderrs=gain["gain_in_stderrs"])
        wins = [1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(scores, ref_scores)]
    out["win_rate"], out["win_rate_stderr"] = _mean_stderr(wins)
    return out


# ------------------------------------------------------------------------------------------------ (b) pairs
def _pair_texts(row: dict, tokenizer) -> tuple[str, str, str]:
    """(prompt, chosen, rejected) as text; conversational pairs through the chat template (the prompt rendered with
    the generation prompt, each completion as the rest of its whole conversation's text)."""
    from aligntool.data import cell_kind

    if cell_kind(row["chosen"]) == "text":
        return row["prompt"], row["chosen"], row["rejected"]
    prompt = tokenizer.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)

    def rest(side):
        full = tokenizer.apply_chat_template(row["prompt"] + row[side], tokenize=False)
        return full[len(prompt):] if full.startswith(prompt) else full

    return prompt, rest("chosen"), rest("rejected")


def reward_scores(model, tokenizer, texts: list[str], batch_size: int, context: int) -> tuple[list[float], int]:
    """A reward model's score of each text, texts longer than ``context`` tokens keeping their last ``context``
    tokens; (scores, how many were cut)."""
    import torch

    device = next(model.parameters()).device
    encoded = [tokenizer(t)["input_ids"] for t in texts]
    cut = sum(len(e) > context for e in encoded)
    encoded = [e[-context:] for e in encoded]
    out: list[float] = []
    for start in range(0, len(encoded), batch_size):
        batch = tokenizer.pad({"input_ids": encoded[start : start + batch_size]}, padding=True, return_tensors="pt")
        with torch.no_grad():
            out += model(**batch.to(device)).logits[:, 0].float().tolist()
    return out, cut


def evaluate_pairs(path: str, cfg, base_dir, num_pairs: int | None, batch_size: int) -> dict:
    """Mode (b): a reward model's pairwise accuracy (chosen scored above rejected; a tie counts as wrong) and mean
    margin r(chosen) - r(rejected), each with its standard error over pairs."""
    from aligntool import models
    from aligntool.rewards import reward_model_scorer

    model = reward_model_scorer(path, batch_size, key="--model").model
    tokenizer = models.load_tokenizer(path, key="--model")
    tokenizer.padding_side = "right"
    data, _ = load_rows(cfg, ("preference",), tokenizer, base_dir,
                        "--model is a reward model, evaluated on preference pairs (chosen + rejected, with a prompt "
                        "column or the prompt implicit in both)")
    rows = data.to_list()[:num_pairs] if num_pairs else data.to_list()
    triples = [_pair_texts(r, tokenizer) for r in rows]
    context = _context(model, tokenizer)
    chosen, cut_c = reward_scores(model, tokenizer, [p + c for p, c, _ in triples], batch_size, context)
    rejected, cut_r = reward_scores(model, tokenizer, [p + r for p, _, r in triples], batch_size, context)
    acc, acc_err = _mean_stderr([1.0 if c > r else 0.0 for c, r in zip(chosen, rejected)])
    margin, margin_err = _mean_stderr([c - r for c, r in zip(chosen, rejected)])
    result = {"model": path, "kind": "reward_model", "mode": "pairs", "data": describe(cfg, len(data), base_dir),
              "num_pairs": len(rows), "pairwise_accuracy": acc, "pairwise_accuracy_stderr": acc_err,
              "mean_margin": margin, "mean_margin_stderr": margin_err}
    if cut_c or cut_r:
        result["note"] = (f"{cut_c} chosen and {cut_r} rejected texts exceed the model's {context} positions: each "
                          "keeps its last tokens (the end of the dialogue)")
    return result

