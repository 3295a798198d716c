"""The built-in ``tiny-tools`` model: the tiny model taught to call ``calculator`` in Qwen2.5's real chat template.

Built once from the tiny model (``aligntool.toy.tiny``), deterministically, and cached as ``tiny-tools-v<N>.<M>``:

- the tokenizer gains the special tokens of Qwen2.5's template (``<|im_start|>``, ``<|im_end|>``: special, as in
  Qwen2.5's tokenizer; ``<tool_call>``, ``</tool_call>``, ``<tool_response>``, ``</tool_response>``: added, not
  special, as there), ``<|im_end|>`` becomes its end-of-sequence token and the embeddings are resized;
- its chat template is TRL's offline copy of Qwen2.5's (``trl/chat_templates/qwen2_5.jinja``, read from the installed
  TRL), so TRL recognises it (``add_response_schema``, ``get_training_chat_template``) and transformers' / TRL's
  response parsers read the model's tool calls;
- the template's fixed system text (the default system line, the "# Tools" instructions, the calculator's schema
  line) is added as a few whole tokens: the rendered text is Qwen2.5's, byte for byte, but a prompt is about 30
  tokens instead of about 570 in the tiny model's 640-token vocabulary, which keeps SFT and RL on the CPU quick;
- then SFT with tiny-arith's loop (``tiny.lm_step``; loss on the assistant's tokens only) on demonstrations rendered
  by that template with ``tools=[calculator]`` on training questions only: a share calls the tool (user -> assistant
  tool call -> tool reply -> "The answer is N."), ``tool_share_large`` of the questions whose sum is 1000 or more and
  ``tool_share_small`` of the others; the rest answer at once (the right sum, which the tiny model mostly cannot
  compute), and a share ``no_tools_share`` is rendered without tools (answered at once). The SFT model therefore
  calls the tool only part of the time: the headroom RL with the tool has to gain. A known weakness: 3-digit tool
  replies are rare in the demonstrations, and the model does not copy them (see docs/AGENTS.md).

Each conversation is cut into pieces at turn boundaries (``pieces``) and tokenised piece by piece, as a rollout sees
it: the prompt's tokens, generated tokens up to ``<|im_end|>``, the inserted tool reply, generated tokens again.
"""

from __future__ import annotations

import random
from pathlib import Path

BUILD_VERSION = 1  # bump when anything below changes what tiny-tools is
TOOLS_SFT = dict(steps=500, batch_size=24, learning_rate=3e-3, warmup=30, seed=0, tool_share_small=0.2,
                 tool_share_large=0.9, no_tools_share=0.1, max_position_embeddings=1024)
QWEN_SPECIAL = ["<|im_start|>", "<|im_end|>"]
QWEN_TOOL_TAGS = ["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"]
EOS = "<|im_end|>"
# the fixed text of a calculator call around its expression, and the role lines, as whole tokens too
CALL_TEXTS = ['\n{"name": "calculator", "arguments": {"expression": "', '"}}\n']
ROLE_TEXTS = ["system\n", "user\n", "assistant\n"]


def tiny_tools_model_path(log=print) -> Path:
    """Path of ``tiny-tools`` (module docstring), building it (and the tiny model it starts from) first if the cache
    lacks it."""
    from aligntool.toy import tiny

    base = tiny.tiny_model_path(log=log)
    return tiny.cached_build(tiny.cache_dir() / f"tiny-tools-v{tiny.BUILD_VERSION}.{BUILD_VERSION}",
                             "the tiny-tools model", "two to four minutes",
                             lambda out, progress: build_tiny_tools_model(out, base, progress=progress), log)


def qwen2_5_template() -> str:
    """Qwen2.5's chat template as the installed TRL ships it offline."""
    import trl

    return (Path(trl.__file__).parent / "chat_templates" / "qwen2_5.jinja").read_text(encoding="utf-8")


def answer_text(total: int) -> str:
    return f"The answer is {total}."


def demonstration(a: int, b: int, use_tool: bool) -> list[dict]:
    """One conversation: the question, then a tool call, its reply and the answer, or the answer at once."""
    from aligntool.toy import tools

    expression = f"{a} + {b}"
    messages = [{"role": "user", "content": tools.question(a, b)}]
    if use_tool:
        call = {"type": "function", "function": {"name": "calculator", "arguments": {"expression": expression}}}
        messages += [{"role": "assistant", "content": "", "tool_calls": [call]},
                     {"role": "tool", "name": "calculator", "content": tools.calculator(expression)}]
    return messages + [{"role": "assistant", "content": answer_text(a + b)}]


def pieces(tokenizer, messages: list[dict], tools=None) -> list[tuple[str, bool]]:
    """(text, generated) pieces of a conversation whose turns after the first user message alternate between the
    assistant and inserted text: each assistant turn is what the model generates after the template's
    ``<|im_start|>assistant\\n`` up to and including ``<|im_end|>``; everything else (the prompt, role markers, tool
    replies) is inserted. Their concatenation is the template's rendering of the whole conversation, up to the
    final assistant turn's end marker."""
    render = lambda msgs, gen: tokenizer.apply_chat_template(msgs, tools=tools, tokenize=False,  # noqa: E731
                                                             add_generation_prompt=gen)
    out, done = [], ""
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = render(messages[:k], True)
        full = render(messages[: k + 1], False)
        full = full[: full.rindex(EOS) + len(EOS)]
        if not (prompt.startswith(done) and full.startswith(prompt)):
            raise ValueError("the chat template does not render turn by turn (not prefix-preserving)")
        out += [(prompt[len(done):], False), (full[len(prompt):], True)]
        done = full
    return out


def fixed_texts(tokenizer, tools) -> list[str]:
    """The template's fixed system text (with ``tools``, and without: the default system line) cut at the special
    tokens and tags (tokens already), longest first."""
    import re

    probe = [{"role": "user", "content": "?"}]
    tags = "|".join(re.escape(t) for t in QWEN_SPECIAL + QWEN_TOOL_TAGS)
    texts = set()
    for offered in (tools, None):
        system = tokenizer.apply_chat_template(probe, tools=offered, tokenize=False).split("<|im_start|>user")[0]
        texts.update(t for t in re.split(tags, system) if len(t.strip()) > 1)
    return sorted(texts, key=lambda t: (-len(t), t))


def tools_tokenizer(base: Path):
    """The tiny model's tokenizer with Qwen2.5's special tokens and tags, its chat template and eos, and the
    template's fixed lines as whole tokens (``fixed_texts``)."""
    from transformers import AutoTokenizer

    from aligntool.toy import tools

    tokenizer = AutoTokenizer.from_pretrained(base)
    tokenizer.add_special_tokens({"additional_special_tokens": QWEN_SPECIAL})
    tokenizer.add_tokens(QWEN_TOOL_TAGS)
    tokenizer.eos_token = EOS
    tokenizer.chat_template = qwen2_5_template()
    tokenizer.add_tokens(fixed_texts(tokenizer, [tools.calculator]) + CALL_TEXTS + ROLE_TEXTS)
    tokenizer.model_max_length = TOOLS_SFT["max_position_embeddings"]
    return tokenizer


def sft_conversations(n: int, seed: int, cfg: dict = TOOLS_SFT) -> list[tuple[list[dict], bool]]:
    """``n`` (demonstration, tools offered) of training questions (cycling through distinct ones), seeded."""
    from aligntool.toy import tools

    rng = random.Random(seed)
    questions = tools.pairs("train", min(n, 20_000), seed=seed)
    out = []
    for i in range(n):
        a, b = questions[i % len(questions)]
        offered = rng.random() >= cfg["no_tools_share"]
        share = cfg["tool_share_large"] if a + b >= 1000 else cfg["tool_share_small"]
        out.append((demonstration(a, b, use_tool=offered and rng.random() < share), offered))
    return out


def encode(tokenizer, messages: list[dict], tools=None) -> tuple[list[int], list[int]]:
    """Token ids of a conversation, piece by piece (``pieces``), and its labels: the generated pieces' tokens, -100
    elsewhere."""
    ids, labels = [], []
    for text, generated in pieces(tokenizer, messages, tools):
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += piece
        labels += piece if generated else [-100] * len(piece)
    return ids, labels


def build_tiny_tools_model(out: Path, base: Path, cfg: dict = TOOLS_SFT, progress: bool = False, log=None) -> None:
    """``tiny-tools`` (module docstring): the tiny model at ``base``, its tokenizer extended (``tools_tokenizer``),
    fine-tuned with tiny-arith's loop on ``steps x batch_size`` demonstrations (``sft_conversations``); saved to
    ``out``."""
    import torch
    from transformers import AutoModelForCausalLM

    from aligntool.toy import tools
    from aligntool.toy.tiny import lm_step

    torch.manual_seed(cfg["seed"])
    tokenizer = tools_tokenizer(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model.resize_token_embeddings(len(tokenizer))
    model.config.max_position_embeddings = cfg["max_position_embeddings"]
    model.config.eos_token_id = tokenizer.eos_token_id
    encoded = [encode(tokenizer, messages, [tools.calculator] if offered else None)
               for messages, offered in sft_conversations(cfg["steps"] * cfg["batch_size"], cfg["seed"], cfg)]
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["learning_rate"], weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / cfg["warmup"]) * max(0.05, 1 - s / cfg["steps"])
    )
    model.train()
    from tqdm.auto import tqdm

    for step in tqdm(range(cfg["steps"]), desc="fine-tuning tiny-tools", disable=not progress, mininterval=2):
        batch = encoded[step * cfg["batch_size"] : (step + 1) * cfg["batch_size"]]
        width = max(len(ids) for ids, _ in batch)
        ids = torch.full((len(batch), width), tokenizer.pad_token_id)
        mask = torch.zeros_like(ids)
        labels = torch.full_like(ids, -100)
        for row, (seq, lab) in enumerate(batch):
            ids[row, : len(seq)], mask[row, : len(seq)], labels[row, : len(seq)] = (
                torch.tensor(seq), 1, torch.tensor(lab))
        loss = lm_step(model, opt, sched, ids, mask, labels)
        if log and (step + 1) % 50 == 0:
            log(f"tiny-tools step {step + 1}/{cfg['steps']}: loss {loss.item():.3f}")
    model.eval()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
