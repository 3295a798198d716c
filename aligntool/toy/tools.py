"""The toy tool task: three-digit sums with a ``calculator`` tool, checked exactly.

Every question is ``"What is a + b?"`` with ``100 <= a, b <= 999``: sums the tiny models cannot do reliably in their
heads, but can copy from a tool's reply. ``calculator`` is a real tool (a Google-style docstring, so
``transformers.utils.get_json_schema`` builds its JSON schema, as ``apply_chat_template(tools=...)``, TRL's
``GRPOTrainer(tools=...)`` and ``aligntool.tools.load_tools`` do); it evaluates integers with ``+ - *`` through
``ast`` (never ``eval``) and raises ``ValueError`` on anything else (a rollout turns the exception into the tool's
error reply).

Split: a fixed 1/8 of the UNORDERED pairs {a, b} (by a hash of ``"min+max"``, the toy world's held-out rule) is held
out; a held-out question's commuted twin ``b + a`` is held out too, so no training question has the same answer and
operands as a held-out one.

Rows (``rows``): a conversational ``prompt`` (one user message) and ``answer`` (the sum as a string), the columns a
reward function receives. ``reward`` follows TRL's reward-function convention: 1.0 when the final answer ends with
the right number, else 0.0 (``final_answer`` says what counts as the final answer).
"""

from __future__ import annotations

import ast
import random
import re
import zlib

LOW, HIGH = 100, 999  # operands: three-digit numbers
MAX_EXPRESSION = 200  # characters the calculator reads
_QUESTION = re.compile(r"What is (\d+) \+ (\d+)\?")
_NUMBER = re.compile(r"-?\d+")
_TOOL_CALL = re.compile(r"<tool_call>.*?(?:</tool_call>|$)", re.S)
_OPS = {ast.Add: lambda x, y: x + y, ast.Sub: lambda x, y: x - y, ast.Mult: lambda x, y: x * y}


def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression of integers with +, - and *.

    Args:
        expression: The expression, e.g. "347 + 589".
    """
    if not isinstance(expression, str) or len(expression) > MAX_EXPRESSION:
        raise ValueError(f"calculator: expected an expression of at most {MAX_EXPRESSION} characters")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError:
        raise ValueError(f"calculator: cannot read {expression!r}; expected integers with + - *") from None
    return str(_evaluate(tree.body, expression))


def _evaluate(node, expression: str) -> int:
    if isinstance(node, ast.Constant) and type(node.value) is int:
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        value = _evaluate(node.operand, expression)
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        return _OPS[type(node.op)](_evaluate(node.left, expression), _evaluate(node.right, expression))
    raise ValueError(f"calculator: {expression!r}: only integers and + - * are supported")


def question(a: int, b: int) -> str:
    return f"What is {a} + {b}?"


def operands(text: str) -> tuple[int, int]:
    """(a, b) of a question; ValueError for a text that is not one."""
    m = _QUESTION.search(text)
    if m is None:
        raise ValueError(f"not a question of the tool task: {text!r}")
    return int(m.group(1)), int(m.group(2))


def is_held_out(a: int, b: int) -> bool:
    """The held-out rule, on the unordered pair: ``a + b`` and ``b + a`` are always on the same side."""
    return zlib.crc32(f"{min(a, b)}+{max(a, b)}".encode()) % 8 == 0


def pairs(split: str, n: int, seed: int = 0) -> list[tuple[int, int]]:
    """``n`` questions (a, b) of ``split`` ("train" or "eval"), distinct as unordered pairs, drawn by ``seed``
    (operands in the order drawn, so both orders occur)."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    rng, seen, out = random.Random(f"tools-{split}-{seed}"), set(), []
    while len(out) < n:
        a, b = rng.randint(LOW, HIGH), rng.randint(LOW, HIGH)
        key = (min(a, b), max(a, b))
        if is_held_out(a, b) == (split == "eval") and key not in seen:
            seen.add(key)
            out.append((a, b))
    return out


def rows(n: int, seed: int = 0, split: str = "train") -> list[dict]:
    """``n`` dataset rows: ``prompt`` (a list with one user message) and ``answer`` (the sum, a string)."""
    return [{"prompt": [{"role": "user", "content": question(a, b)}], "answer": str(a + b)}
            for a, b in pairs(split, n, seed)]


def final_answer(completion) -> str:
    """The text a completion answers with. Messages (TRL's conversational completions): the content of the last
    assistant message. A string: the text after the last tool reply (``</tool_response>``). Tool calls
    (``<tool_call>...</tool_call>``, or an unterminated one) are not an answer and are removed."""
    if isinstance(completion, list):
        texts = [m.get("content") or "" for m in completion if isinstance(m, dict) and m.get("role") == "assistant"]
        text = texts[-1] if texts else ""
        text = text if isinstance(text, str) else ""
    else:
        text = str(completion).rsplit("</tool_response>", 1)[-1]
    return _TOOL_CALL.sub(" ", text)


def is_correct(completion, answer) -> bool:
    """True when the final answer's last number is ``answer``."""
    numbers = _NUMBER.findall(final_answer(completion))
    return bool(numbers) and int(numbers[-1]) == int(answer)


def reward(prompts, completions, answer, **_) -> list[float]:
    """Verifiable 0/1 reward in TRL's convention (``fn(prompts, completions, **columns)``; the dataset's ``answer``
    column arrives as ``answer``, other columns are ignored)."""
    return [1.0 if is_correct(c, a) else 0.0 for c, a in zip(completions, answer, strict=True)]
