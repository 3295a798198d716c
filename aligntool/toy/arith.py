"""A verifiable toy task in the toy world's tokenizer: two-number addition, checked exactly.

Every question is ``"Q: a+b= A:"`` with ``0 <= a, b <= MAX_OPERAND``; the answer is the decimal sum, written after one
space (``" 71"``). The tiny model's tokenizer is byte-level BPE trained on reviews, so every digit is a token of its
own and the model has never seen a number: it has to learn the task from the demonstrations, which it does only partly
in a few hundred SFT steps -- the headroom that pass@N (several samples per question) is about.

Questions are split once and for all: a fixed 1/8 of them (by a hash of the question text) is held out, and training
rows never use a held-out question, so held-out scores are not recall of a trained question. The split is by
question text: most held-out questions ``a+b`` have their commuted twin ``b+a`` (same answer) among the training
questions (268 of the 306), so held-out accuracy includes what the model learned from the twin.

Checking (``is_correct``): the completion is cut at the end-of-sequence marker (``<|end|>``), leading whitespace is
dropped, and the text up to the first whitespace must equal the decimal answer exactly ("71" is right, "071", "7 1"
and "71." are wrong, "71 and more" is right: only the first word counts). ``reward`` is the same check as 1.0 / 0.0,
in the ``reward(prompts, completions) -> list[float]`` shape of a verifiable reward for online methods.
"""

from __future__ import annotations

import math
import re

from aligntool.toy import world

MAX_OPERAND = 49
EOS = "<|end|>"
_QUESTION = re.compile(r"Q: (\d+)\+(\d+)= A:\s*$")


def question(a: int, b: int) -> str:
    return f"Q: {a}+{b}= A:"


def all_questions() -> list[str]:
    """Every question of the task, in a fixed order ((MAX_OPERAND + 1) ** 2 = 2,500)."""
    return [question(a, b) for a in range(MAX_OPERAND + 1) for b in range(MAX_OPERAND + 1)]


def prompts(split: str, n: int | None = None, seed: int = 0) -> list[str]:
    """``n`` distinct questions of ``split`` ("train" or "eval"), shuffled by ``seed`` (all of them for n=None)."""
    return world.split_of(all_questions(), split, n, seed)


def answer(prompt: str) -> int:
    """The sum a question asks for; ValueError for a prompt that is not a question of this task."""
    m = _QUESTION.search(prompt)
    if m is None:
        raise ValueError(f"not an arithmetic question: {prompt!r}")
    return int(m.group(1)) + int(m.group(2))


def is_correct(prompt: str, completion: str) -> bool:
    """True when the completion's first word, before any end-of-sequence marker, is exactly the answer."""
    words = completion.split(EOS, 1)[0].split()
    return bool(words) and words[0] == str(answer(prompt))


def reward(prompts: list[str], completions: list[str], **_) -> list[float]:
    """Verifiable reward: 1.0 for a correct completion, 0.0 otherwise (extra keyword arguments are ignored, as TRL
    passes dataset columns to reward functions)."""
    return [1.0 if is_correct(p, c) else 0.0 for p, c in zip(prompts, completions, strict=True)]


def sft_rows(n: int, seed: int = 0, split: str = "train") -> list[dict]:
    """``n`` rows {prompt, completion} with the correct answer as completion. Rows cycle through the split's
    questions in a seeded order, so with n above the number of questions each question repeats (n // pool or one
    more times): a small ``n`` is a small training set of distinct questions."""
    pool = prompts(split, seed=seed)
    return [{"prompt": q, "completion": f" {answer(q)}"} for q in (pool[i % len(pool)] for i in range(n))]


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from ``n`` samples of which ``c`` are correct (Chen et al. 2021, "Evaluating Large Language
    Models Trained on Code", eq. 1 and its numerically stable form):

        pass@k = 1 - C(n - c, k) / C(n, k) = 1 - prod_{i = n - c + 1}^{n} (1 - k / i)

    (1.0 when n - c < k: every k-subset holds a correct sample). Needs 0 <= c <= n and 1 <= k <= n."""
    if not (0 <= c <= n and 1 <= k <= n):
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))
