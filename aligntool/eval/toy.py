"""`aligntool eval` on the toy world.

For a causal LM: sample one completion for each of ``num_prompts`` held-out prompts and report the mean gold reward
and its standard error. With a reference model, also sample the reference and report

    reference_gold_reward   mean gold reward of the reference's samples on the same prompts
    win_rate                P(gold(policy sample) > gold(reference sample)), ties counted 1/2
    kl_to_reference         mean over policy samples y ~ pi of  sum_t [log pi(y_t|x,y<t) - log pi_ref(y_t|x,y<t)]
                            (the Monte-Carlo estimate of KL(pi || pi_ref) per sequence, in nats)

For a reward model (a sequence classifier): pairwise accuracy on held-out toy pairs labelled by the gold reward.

``--task arithmetic`` (``evaluate_arithmetic``): the verifiable addition task (``aligntool.toy.arith``) on held-out
questions (never trained on), each answer checked exactly:

    greedy_accuracy   mean over questions of 1[greedy completion is correct]
    pass@k            mean over questions of the unbiased estimator from n = ``samples`` samples with c correct
                      (Chen et al. 2021, "Evaluating Large Language Models Trained on Code", eq. 1):
                      1 - C(n - c, k) / C(n, k); pass@1 = c / n is the sampled accuracy

each with its standard error over questions (sd / sqrt(#questions)). With a reference, the same for it and the gain
of each metric, paired over questions: mean and standard error of d_q = metric_q(model) - metric_q(reference), and
``*_gain_in_stderrs`` = mean(d) / se(d).
"""

from __future__ import annotations

import math
from pathlib import Path

from aligntool.errors import UserError
from aligntool.sampling import sample, sequence_logprobs


def _mean_stderr(values: list[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / (n - 1) if n > 1 else 0.0
    return mean, math.sqrt(var / n)


def _load_lm(path_or_name: str, key: str):
    from aligntool import models

    path = models.resolve(path_or_name, key=key, log=lambda m: None)
    tokenizer = models.load_tokenizer(path, key=key)
    model = models.load_model(path, key=key).eval()
    return model, tokenizer


def evaluate_reward_model(path: str, num_pairs: int, batch_size: int, seed: int) -> dict:
    from aligntool.rewards import reward_model_scorer
    from aligntool.toy import world

    score = reward_model_scorer(path, batch_size, key="--model")
    pairs = world.preference_pairs(num_pairs, seed=seed + 1000, split="eval", bt_temperature=0.0)
    prompts = [r["prompt"] for r in pairs]
    chosen = score(prompts, [r["chosen"] for r in pairs])
    rejected = score(prompts, [r["rejected"] for r in pairs])
    correct = [1.0 if c > r else 0.0 for c, r in zip(chosen, rejected)]
    acc, err = _mean_stderr(correct)
    data = {"source": f"toy world preference pairs (held-out, labelled by the gold reward, seed {seed + 1000}), "
            "not the user's data", "rows": len(pairs)}
    return {"model": path, "kind": "reward_model", "data": data, "num_pairs": len(pairs), "pairwise_accuracy": acc,
            "pairwise_accuracy_stderr": err, "mean_margin": sum(c - r for c, r in zip(chosen, rejected)) / len(pairs)}


def revision_template_of(path: str) -> str:
    """The revision template a model was trained with (its run's recipe.yaml), else SRPO's default."""
    import yaml

    from aligntool.trainers.srpo import DEFAULT_TEMPLATE

    recipe = Path(path) / "recipe.yaml"
    if recipe.is_file():
        data = yaml.safe_load(recipe.read_text()) or {}
        template = (data.get("algo") or {}).get("revision_template")
        if isinstance(template, str):
            return template
    return DEFAULT_TEMPLATE


def evaluate(model: str, reference: str | None = None, num_prompts: int = 128, max_new_tokens: int = 48,
             temperature: float = 1.0, batch_size: int = 64, seed: int = 0, revise: int = 0) -> dict:
    """See the module docstring. ``revise`` > 0 applies that many self-revision steps (SRPO) to the model's samples
    before scoring; the KL is then measured on the final revision given its revision prompt, and the reference's
    samples are not revised (they are the baseline)."""
    from aligntool import models
    from aligntool.rewards import is_reward_model
    from aligntool.toy import world

    path = models.resolve(model, key="--model", log=lambda m: None)
    if is_reward_model(path):
        if reference:
            raise UserError("--reference: applies to language models only; --model is a reward model")
        return evaluate_reward_model(path, num_prompts, batch_size, seed)

    prompts = world.prompts("eval", num_prompts, seed=seed)
    policy, tokenizer = _load_lm(model, "--model")
    texts, ids = sample(policy, tokenizer, prompts, max_new_tokens, temperature, batch_size, seed)
    context = prompts
    if revise:
        from aligntool.trainers.srpo import revision_prompt

        template = revision_template_of(path)
        for step in range(revise):
            context = [revision_prompt(template, p, t) for p, t in zip(prompts, texts)]
            texts, ids = sample(policy, tokenizer, context, max_new_tokens, temperature, batch_size,
                                seed + 7 * (step + 1))
    rewards = [world.gold_reward(t) for t in texts]
    mean, err = _mean_stderr(rewards)
    result = {"model": path, "kind": "causal_lm",
              "data": {"source": f"toy world (held-out prompts, seed {seed})", "rows": len(prompts)},
              "num_prompts": len(prompts), "revision_steps": revise,
              "gold_reward": mean, "gold_reward_stderr": err, "mean_length_tokens": sum(map(len, ids)) / len(ids)}
    if reference:
        ref, ref_tok = _load_lm(reference, "--reference")
        if ref_tok.get_vocab() != tokenizer.get_vocab():
            raise UserError("--reference: its tokenizer differs from the model's; KL needs a shared vocabulary")
        ref_texts, _ = sample(ref, ref_tok, prompts, max_new_tokens, temperature, batch_size, seed + 1)
        ref_rewards = [world.gold_reward(t) for t in ref_texts]
        ref_mean, ref_err = _mean_stderr(ref_rewards)
        lp = sequence_logprobs(policy, tokenizer, context, ids, batch_size)
        lp_ref = sequence_logprobs(ref, tokenizer, context, ids, batch_size)
        kl, kl_err = _mean_stderr([a - b for a, b in zip(lp, lp_ref)])
        wins = [1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(rewards, ref_rewards)]
        result.update(reference=reference, reference_gold_reward=ref_mean, reference_gold_reward_stderr=ref_err,
                      gold_reward_gain=mean - ref_mean,
                      gain_in_stderrs=(mean - ref_mean) / math.sqrt(err**2 + ref_err**2) if err or ref_err else 0.0,
                      kl_to_reference=kl, kl_to_reference_stderr=kl_err, win_rate=sum(wins) / len(wins))
    result["samples"] = [{"prompt": p, "completion": t, "gold_reward": r}
                         for p, t, r in list(zip(prompts, texts, rewards))[:3]]
    return result


TASKS = ("reviews", "arithmetic")
ARITH_MAX_NEW_TOKENS = 8  # the longest answer is " 98" plus EOS: 8 tokens never cut a right answer short


def default_pass_k(samples: int) -> list[int]:
    """pass@1, 4, 8 as far as ``samples`` allows, and pass@``samples``."""
    return sorted({k for k in (1, 4, 8) if k <= samples} | {samples})


def parse_pass_k(text: str, samples: int) -> list[int]:
    """``--pass-k`` "1,4,8" -> [1, 4, 8]: distinct integers 1 <= k <= ``samples``."""
    try:
        ks = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise UserError(f"--pass-k: expected comma-separated integers such as 1,4,8, got {text!r}") from None
    if not ks:
        raise UserError(f"--pass-k: expected comma-separated integers such as 1,4,8, got {text!r}")
    bad = [k for k in ks if not 1 <= k <= samples]
    if bad:
        raise UserError(f"--pass-k: every k must be between 1 and --samples ({samples}), got "
                        f"{', '.join(map(str, bad))}")
    return ks


def arithmetic_scores(model, tokenizer, questions: list[str], samples: int, ks: list[int], max_new_tokens: int,
                      temperature: float, batch_size: int, seed: int) -> dict:
    """Per-question scores of one model: {"greedy_accuracy": [0/1 ...], "pass@k": [...] for k in ``ks``} and the
    first few greedy completions."""
    from aligntool.toy import arith

    greedy, _ = sample(model, tokenizer, questions, max_new_tokens, 0.0, batch_size, seed)
    scores = {"greedy_accuracy": [1.0 if arith.is_correct(q, t) else 0.0 for q, t in zip(questions, greedy)]}
    repeated = [q for q in questions for _ in range(samples)]
    texts, _ = sample(model, tokenizer, repeated, max_new_tokens, temperature, batch_size, seed + 1)
    correct = [sum(arith.is_correct(q, t) for t in texts[i * samples : (i + 1) * samples])
               for i, q in enumerate(questions)]
    for k in ks:
        scores[f"pass@{k}"] = [arith.pass_at_k(samples, c, k) for c in correct]
    return scores, greedy


def evaluate_arithmetic(model: str, reference: str | None = None, num_prompts: int | None = None, samples: int = 8,
                        pass_k: list[int] | None = None, max_new_tokens: int = ARITH_MAX_NEW_TOKENS,
                        temperature: float = 1.0, batch_size: int = 64, seed: int = 0) -> dict:
    """See the module docstring: greedy accuracy and pass@k on ``num_prompts`` held-out questions (all: None)."""
    from aligntool import models
    from aligntool.rewards import is_reward_model
    from aligntool.toy import arith

    ks = pass_k or default_pass_k(samples)
    parse_pass_k(",".join(map(str, ks)), samples)
    path = models.resolve(model, key="--model", log=lambda m: None)
    if is_reward_model(path):
        raise UserError("--task arithmetic: needs a causal language model; --model is a reward model")
    questions = arith.prompts("eval", num_prompts, seed=seed)
    policy, tokenizer = _load_lm(model, "--model")
    scores, greedy = arithmetic_scores(policy, tokenizer, questions, samples, ks, max_new_tokens, temperature,
                                       batch_size, seed)
    result = {"model": path, "kind": "causal_lm", "task": "arithmetic",
              "data": {"source": f"toy arithmetic (held-out questions, seed {seed})", "rows": len(questions)},
              "num_questions": len(questions),
              "samples_per_question": samples, "temperature": temperature}
    for name, values in scores.items():
        result[name], result[f"{name}_stderr"] = _mean_stderr(values)
    if reference:
        ref, ref_tok = _load_lm(reference, "--reference")
        ref_scores, _ = arithmetic_scores(ref, ref_tok, questions, samples, ks, max_new_tokens, temperature,
                                          batch_size, seed)
        result["reference"] = reference
        for name, values in ref_scores.items():
            result[f"reference_{name}"], result[f"reference_{name}_stderr"] = _mean_stderr(values)
        for name in scores:  # paired over questions
            gain, err = _mean_stderr([a - b for a, b in zip(scores[name], ref_scores[name])])
            result[f"{name}_gain"], result[f"{name}_gain_stderr"] = gain, err
            # undefined (null in the JSON) when the paired differences do not vary (or one question)
            result[f"{name}_gain_in_stderrs"] = gain / err if err else 0.0 if gain == 0 else None
    result["samples"] = [{"prompt": q, "completion": t, "correct": bool(c)}
                                for q, t, c in list(zip(questions, greedy, scores["greedy_accuracy"]))[:3]]
    return result
