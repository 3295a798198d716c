"""A real model that calls a tool, for the episode tests (tests/test_episodes.py): the tiny model with Qwen2.5's real
chat template (TRL's offline copy) and its special tokens, SFT'd until it writes, for two questions, the tool call
``add(a, b)``, then after the reply "The answer is N.". Greedy and sampled generation then call the tool: the turns
are real ``generate`` calls on real weights. The template's fixed tools block is one added token, so a prompt is ~20
tokens (the rendered text is Qwen2.5's, byte for byte)."""

from __future__ import annotations

import textwrap
from pathlib import Path

TOOL_DOC = '''
def add(a: int, b: int) -> int:
    """Add two integers.

    Args:
        a: The first integer.
        b: The second integer.
    """
'''
TOOL_MODULES = {  # the same schema (name, signature, docstring) with three behaviours
    "ep_tools_ok": TOOL_DOC + "    return a + b\n",
    "ep_tools_raise": TOOL_DOC + "    raise RuntimeError('calculator broken')\n",
    "ep_tools_hang": "import time\n" + TOOL_DOC + "    time.sleep(30)\n    return a + b\n",
    # TRL's environment contract: reset(**row) -> observation, public methods are tools, get_reward()
    "ep_env": "class Adder:\n    def reset(self, **row):\n        self.row, self.calls = row, 0\n"
              "        return row['rest']\n\n    def get_reward(self):\n        return 10.0 * self.calls\n\n"
              + "\n".join("    " + line if line else line for line in TOOL_DOC.replace(
                  "def add(a", "def add(self, a").splitlines())
              + "\n        self.calls += 1\n        return a + b\n",
}
QUESTIONS = [(2, 3), (4, 1)]
REWARD_PY = '''
def reward(prompts, completions, answer, weight=None, **kwargs):
    """1 (or the row's weight) when the final assistant message states the answer (completions: the episode's
    messages, as TRL passes them)."""
    weight = weight or [1.0] * len(answer)
    return [w * float(str(a) in (c[-1].get("content") or "")) for c, a, w in zip(completions, answer, weight)]


def length(prompts, completions, **kwargs):
    """The final message's length / 10: differs between samples that differ."""
    return [len(c[-1].get("content") or "") / 10 for c in completions]
'''


def write_modules(folder: Path) -> None:
    for name, text in TOOL_MODULES.items():
        (folder / f"{name}.py").write_text(textwrap.dedent(text))
    (folder / "ep_reward.py").write_text(textwrap.dedent(REWARD_PY))


def conversation(a: int, b: int) -> list[dict]:
    return [{"role": "user", "content": f"What is {a} + {b}?"}]


def tools_tokenizer(tiny: Path, add_fn):
    """The tiny tokenizer with Qwen2.5's template and tokens; the template's tools block for ``add_fn`` one token."""
    import trl
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.add_tokens(["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"])
    tok.eos_token = "<|im_end|>"
    tok.chat_template = (Path(trl.__file__).parent / "chat_templates" / "qwen2_5.jinja").read_text(encoding="utf-8")
    text = tok.apply_chat_template(conversation(1, 1), tools=[add_fn], tokenize=False)
    block = text[len("<|im_start|>system\n"): text.index("<|im_end|>")]
    tok.add_tokens([block, "What is", " + ", '{"name": "add", "arguments": {"a": ', ', "b": ', "}}\n", "The answer is"])
    return tok


def build(tiny: Path, out: Path, steps: int = 500) -> Path:
    """SFT the tiny model on the two demonstrations (loss on the assistant's tokens only) -> saved to ``out``."""
    import importlib
    import sys

    import torch
    from transformers import AutoModelForCausalLM

    from aligntool.tokens import encode_prompts, render_prompt, tool_suffix_ids

    write_modules(out)
    sys.path.insert(0, str(out))
    add_fn = importlib.import_module("ep_tools_ok").add
    tok = tools_tokenizer(tiny, add_fn)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny)
    model.resize_token_embeddings(len(tok))
    seqs = []
    for a, b in QUESTIONS:
        prompt = encode_prompts(tok, [render_prompt(tok, conversation(a, b), [add_fn])])[0]
        call = tok('<tool_call>\n{"name": "add", "arguments": {"a": %d, "b": %d}}\n</tool_call><|im_end|>' % (a, b),
                   add_special_tokens=False)["input_ids"]
        reply = tool_suffix_ids(tok, [{"role": "tool", "name": "add", "content": str(a + b)}])
        answer = tok(f"The answer is {a + b}.<|im_end|>", add_special_tokens=False)["input_ids"]
        ids = prompt + call + reply + answer
        labels = [-100] * len(prompt) + call + [-100] * len(reply) + answer
        seqs.append((ids, labels))
    width = max(len(i) for i, _ in seqs)
    ids = torch.tensor([i + [tok.pad_token_id] * (width - len(i)) for i, _ in seqs])
    labels = torch.tensor([la + [-100] * (width - len(la)) for _, la in seqs])
    attn = (torch.arange(width)[None] < torch.tensor([len(i) for i, _ in seqs])[:, None]).long()
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3)
    model.train()
    for _ in range(steps):
        loss = model(input_ids=ids, attention_mask=attn, labels=labels).loss
        loss.backward()
        last = loss.item()
        opt.step()
        opt.zero_grad()
    model.eval()
    assert last < 0.005, f"the test model did not learn its demonstrations (loss {last:.3f})"
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


VERSION = 2  # bump when build() changes


def model_path() -> Path:
    """The test model, built once per machine into the aligntool cache (as the tiny model), with its tool modules."""
    from aligntool.toy.tiny import cache_dir, cached_build, tiny_model_path

    tiny = tiny_model_path(log=lambda m: None)
    return cached_build(cache_dir() / f"test-tool-episodes-v{VERSION}", "the tool-episodes test model", "seconds",
                        lambda out, progress: build(tiny, out), log=lambda m: None)
