"""GSM8K rewards for GRPO / PPO: the completion's final number against the reference answer.

``dataset.format: gsm8k`` gives each prompt row an ``answer`` column (the number after ``####`` in GSM8K's worked
solution, commas removed); aligntool passes the dataset's other columns to reward functions as keyword lists (TRL's
reward-function convention), so ``accuracy(prompts, completions, answer)`` sees the reference of each completion.

The completion's answer is, in order: the number after its last ``####`` (GSM8K's own format), else inside its last
``\\boxed{...}`` (the usual chain-of-thought format), else its last number. Numbers are compared as exact fractions
after removing commas, a leading ``$`` and a trailing ``.``: ``1,000`` = ``1000`` = ``1000.00``.
"""

from __future__ import annotations

import re
from fractions import Fraction

_NUMBER = r"-?\$?\d[\d,]*(?:\.\d+)?"
_HASHES = re.compile(rf"####\s*({_NUMBER})")
_BOXED = re.compile(rf"\\boxed\{{\s*({_NUMBER})\s*\}}")
_ANY = re.compile(_NUMBER)


def _text(completion) -> str:
    """A completion as text: a string, or (conversational data) the content of its messages."""
    if isinstance(completion, list):
        return "\n".join(str(m.get("content", "")) for m in completion if isinstance(m, dict))
    return str(completion)


def _value(number: str | None) -> Fraction | None:
    if number is None:
        return None
    cleaned = number.replace(",", "").replace("$", "").rstrip(".")
    try:
        return Fraction(cleaned)
    except (ValueError, ZeroDivisionError):
        return None


def final_number(completion) -> str | None:
    """The answer a completion gives (see the module's docstring), or None when it holds no number."""
    text = _text(completion)
    for pattern in (_HASHES, _BOXED, _ANY):
        found = pattern.findall(text)
        if found:
            return found[-1]
    return None


def accuracy(prompts, completions, answer, **columns) -> list[float]:
    """1.0 when the completion's final number equals the reference answer, else 0.0."""
    out = []
    for completion, reference in zip(completions, answer):
        got, want = _value(final_number(completion)), _value(str(reference))
        out.append(1.0 if got is not None and got == want else 0.0)
    return out


def format_ok(prompts, completions, **columns) -> list[float]:
    """1.0 when the completion ends its reasoning with ``#### <number>`` (GSM8K's answer line), else 0.0."""
    return [1.0 if _HASHES.search(_text(c)) else 0.0 for c in completions]
