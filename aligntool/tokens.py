"""Tokenizer conventions of real model families, in one place: stop tokens, BOS, pad and chat templates.

Real checkpoints differ in ways that break training silently (the bugs peers' users hit, e.g. TRL #4481):

- **stop tokens**: a chat model ends its turn with a token that is often not the tokenizer's EOS (``<|im_end|>`` on
  Qwen base tokenizers, ``<end_of_turn>`` on Gemma, ``<|end|>`` on Phi-3, ``<|eot_id|>`` on Llama 3 base), and its
  ``generation_config.json`` lists several. Generation must stop at any of them, and "cut off before EOS" means none
  of them was produced. ``stop_ids`` gathers EOS, the generation config's ``eos_token_id`` and the template's
  end-of-turn token.
- **BOS**: Llama 3, Gemma and Mistral tokenizers put BOS in front of every text, and their chat templates write it
  too. ``encode_prompts`` adds BOS once: when the tokenizer would and the text does not already start with it.
- **pad**: GPT-2, GPT-NeoX, Llama 3 and Mistral ship without one. ``ensure_pad`` picks a token that is not EOS when
  the vocabulary has one (``<|padding|>``, ``<|finetune_right_pad_id|>``, ``<pad>``, the unknown token) and else uses
  EOS, as TRL does. Either way no loss masks by pad id here or in TRL (masks come from attention and completion
  masks), so a real EOS stays in the loss; the tests check the labels of every family.
- **chat template**: ``model.chat_template`` sets one for a tokenizer that has none (a file, or a name in
  ``TEMPLATES``), or replaces the shipped one.
- **training template**: assistant-only SFT loss needs ``{% generation %}`` markers around what the assistant writes
  (transformers' ``return_assistant_tokens_mask``); real templates have none, and TRL swaps in a marked copy only for
  templates byte-identical to those it ships (none of ``TEMPLATES`` nor the tiny model's). ``training_chat_template``
  finds the marked copy (``aligntool/chat_templates/*_training.jinja``, then TRL's); it is used while the trainer
  tokenizes the data only (``chat_template_swapped``), so the saved model keeps its own template.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from aligntool.errors import UserError

TEMPLATES = {
    "chatml": (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' + '\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
    "llama3": (
        "{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + "
        "m['content'] | trim + '<|eot_id|>' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
    ),
    "gemma": (  # Gemma has no system role: a system message is prepended to the first user turn
        "{{ bos_token }}{% set sys = '' %}{% if messages[0]['role'] == 'system' %}"
        "{% set sys = messages[0]['content'] + '\n\n' %}{% set messages = messages[1:] %}{% endif %}"
        "{% for m in messages %}{% set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
        "{{ '<start_of_turn>' + role + '\n' + (sys if loop.first else '') + m['content'] | trim + '<end_of_turn>\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
    ),
    "mistral": (  # v0.3 style: the system message goes with the last user message
        "{{ bos_token }}{% set sys = '' %}{% if messages[0]['role'] == 'system' %}"
        "{% set sys = messages[0]['content'] + '\n\n' %}{% set messages = messages[1:] %}{% endif %}"
        "{% for m in messages %}{% if m['role'] == 'user' %}"
        "{{ '[INST] ' + (sys if loop.last or loop.revindex == 2 else '') + m['content'] + '[/INST]' }}"
        "{% else %}{{ ' ' + m['content'] + eos_token }}{% endif %}{% endfor %}"
    ),
    "phi3": (
        "{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] + '<|end|>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
    ),
    "olmo2": (
        "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'assistant' %}"
        "{{ '<|assistant|>\n' + m['content'] + eos_token + ('' if loop.last else '\n') }}"
        "{% else %}{{ '<|' + m['role'] + '|>\n' + m['content'] + '\n' }}{% endif %}"
        "{% if loop.last and add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}{% endfor %}"
    ),
}
TRAINING_TEMPLATES_DIR = Path(__file__).parent / "chat_templates"
_MARK = "Zq7Xv"  # assistant text no template writes, to find what follows an assistant turn


def set_chat_template(tokenizer, spec: str, key: str = "model.chat_template", base_dir: Path | None = None) -> None:
    """``spec`` is a name in TEMPLATES or a Jinja file (relative to the recipe's folder, then the working dir)."""
    if spec in TEMPLATES:
        tokenizer.chat_template = TEMPLATES[spec]
        return
    candidates = [Path(spec).expanduser()] + ([base_dir / spec] if base_dir and not Path(spec).is_absolute() else [])
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        raise UserError(f"{key}: {spec!r} is neither a template name ({', '.join(TEMPLATES)}) nor a file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{key}: {path}: not UTF-8 text") from None
    if "messages" not in text:
        raise UserError(f"{key}: {path}: does not look like a Jinja chat template (it never reads `messages`)")
    tokenizer.chat_template = text


def _template_text(tokenizer) -> str | None:
    """The tokenizer's chat template (the ``default`` one of a set of named templates)."""
    template = getattr(tokenizer, "chat_template", None)
    return template.get("default") if isinstance(template, dict) else template


def has_generation_markers(template: str | None) -> bool:
    """Whether a chat template marks assistant output with ``{% generation %}`` (TRL's test)."""
    from trl.chat_template_utils import has_generation_markers as trl_has

    return bool(template) and trl_has(template)


def training_chat_template(tokenizer) -> str | None:
    """A copy of the tokenizer's chat template that renders byte-identically and marks each assistant reply and its
    end-of-turn token with ``{% generation %}``: the template itself when it has the markers, aligntool's copy of
    each template in ``TEMPLATES`` and of the tiny model's, else TRL's copy of a checkpoint's template it knows (Qwen,
    Llama 3, Gemma, Phi-3, ...). None when there is none (no template, or one nobody has marked)."""
    template = _template_text(tokenizer)
    if not template:
        return None
    if has_generation_markers(template):
        return template
    from aligntool.toy.tiny import CHAT_TEMPLATE as tiny_template

    ours = {text: name for name, text in TEMPLATES.items()} | {tiny_template: "tiny"}
    if template in ours:
        return (TRAINING_TEMPLATES_DIR / f"{ours[template]}_training.jinja").read_text(encoding="utf-8")
    from trl.chat_template_utils import get_training_chat_template

    try:
        return get_training_chat_template(tokenizer)
    except Exception:  # noqa: BLE001 - TRL raises ValueError for a template it does not know, others while probing it
        return None


@contextlib.contextmanager
def chat_template_swapped(tokenizer, template: str | None):
    """``template`` as the tokenizer's chat template inside the block (a trainer tokenizing its data), the tokenizer's
    own one again after it, whatever happens: what is saved with the model is never the training copy."""
    if template is None or template == tokenizer.chat_template:
        yield
        return
    saved = tokenizer.chat_template
    tokenizer.chat_template = template
    try:
        yield
    finally:
        tokenizer.chat_template = saved


def end_of_turn_id(tokenizer) -> int | None:
    """The special token the chat template writes right after an assistant message (None without a template, or
    when what follows is ordinary text)."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    try:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": _MARK}], tokenize=False)
    except Exception:  # noqa: BLE001 - a template that rejects this conversation has no turn end to find
        return None
    after = text[text.find(_MARK) + len(_MARK):] if _MARK in text else ""
    ids = tokenizer(after, add_special_tokens=False)["input_ids"] if after else []
    special = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
    return ids[0] if ids and ids[0] in special else None


def stop_ids(tokenizer) -> list[int]:
    """Token ids that end a generation: EOS, the model folder's ``generation_config.json`` ``eos_token_id`` (one or
    a list) and the chat template's end-of-turn token. EOS first."""
    cached = getattr(tokenizer, "_aligntool_stop_ids", None)
    if cached is not None:
        return list(cached)
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    config = Path(str(getattr(tokenizer, "name_or_path", ""))) / "generation_config.json"
    if config.is_file():
        import json

        try:
            listed = json.loads(config.read_text()).get("eos_token_id")
        except ValueError:
            listed = None
        ids += listed if isinstance(listed, list) else [listed] if isinstance(listed, int) else []
    eot = end_of_turn_id(tokenizer)
    if eot is not None:
        ids.append(eot)
    ids = list(dict.fromkeys(i for i in ids if isinstance(i, int) and 0 <= i < len(tokenizer)))
    tokenizer._aligntool_stop_ids = ids
    return list(ids)


def adds_bos(tokenizer) -> bool:
    """Whether the tokenizer puts BOS in front of a text by itself (Llama 3, Gemma, Mistral)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    with_special = tokenizer("a")["input_ids"]
    return bool(with_special) and with_special[0] == bos and tokenizer("a", add_special_tokens=False)["input_ids"][
        :1] != [bos]


def encode_prompts(tokenizer, prompts: list[str]) -> list[list[int]]:
    """Token ids of prompts for generation and scoring: BOS once where the tokenizer puts one (not a second time
    when a chat template already wrote it), never an EOS at the end."""
    ids = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
    if adds_bos(tokenizer):
        bos = tokenizer.bos_token_id
        ids = [row if row[:1] == [bos] else [bos, *row] for row in ids]
    return ids


PAD_CANDIDATES = ("<|finetune_right_pad_id|>", "<|padding|>", "<pad>", "<|pad|>", "[PAD]")


def ensure_pad(tokenizer, log=print) -> None:
    """A pad token for a tokenizer without one: a pad-like special token of its vocabulary, else the unknown token
    when it differs from EOS, else EOS (as TRL). Said in the log."""
    if tokenizer.pad_token is not None:
        return
    vocab = tokenizer.get_vocab()
    choice = next((t for t in PAD_CANDIDATES if t in vocab and vocab[t] != tokenizer.eos_token_id), None)
    if choice is None and tokenizer.unk_token is not None and tokenizer.unk_token_id != tokenizer.eos_token_id:
        choice = tokenizer.unk_token
    if choice is None:
        choice = tokenizer.eos_token
        log(f"note: the tokenizer has no pad token; padding with EOS {choice!r} (attention masks keep real EOS "
            "tokens in the loss)")
    else:
        log(f"note: the tokenizer has no pad token; padding with {choice!r}")
    tokenizer.pad_token = choice


def render_prompt(tokenizer, messages: list[dict], tools: list | None = None,
                  chat_template_kwargs: dict | None = None) -> str:
    """A conversational prompt as the text the policy continues: the chat template with the generation prompt, the
    agent's tool schemas as ``tools=`` and ``train.chat_template_kwargs`` (e.g. Qwen3's ``enable_thinking``), as TRL's
    trainers render it. Without tools and kwargs this is the call ``data.prompts_as_text`` makes."""
    return tokenizer.apply_chat_template(messages, tools=tools or None, tokenize=False, add_generation_prompt=True,
                                         **(chat_template_kwargs or {}))


def check_tool_template(tokenizer, where: str = "model") -> dict:
    """The chat-template keywords tool episodes render with (``{}``, or ``{"chat_template": TRL's prefix-preserving
    training copy}`` for a template that renders earlier turns differently once a reply follows, e.g. Qwen3's, as
    TRL's GRPOTrainer does). Refuses, in one line, a chat template the engine cannot run tool episodes with (TRL's
    checks): one that cannot render an assistant tool call and a tool reply (``supports_tool_calling``), one that is
    not prefix-preserving and that TRL cannot patch, or one with no response parser for its tool-call syntax (the
    tokenizer's own ``response_template`` / ``response_schema``, else TRL's ``add_response_schema`` for the families
    it knows: Qwen2.5/Qwen3 ``<tool_call>`` JSON, Llama 3.1/3.2 JSON, ...)."""
    from trl import chat_template_utils as ctu

    known = "TRL's templates with a tool parser: trl/chat_templates/qwen2_5, qwen3, llama3_1, llama3_2, ..."
    if not ctu.supports_tool_calling(tokenizer):
        raise UserError(f"{where}: the chat template cannot render tool calls and tool replies (agent needs a "
                        f"template with tool-call syntax; set model.chat_template to one, e.g. {known})")
    if getattr(tokenizer, "response_template", None) is None and getattr(tokenizer, "response_schema", None) is None:
        try:
            ctu.add_response_schema(tokenizer)
        except ValueError:
            raise UserError(f"{where}: no parser for the tool calls of this chat template ({known}; or give the "
                            "tokenizer a response_template)") from None
    if ctu.is_chat_template_prefix_preserving(tokenizer):
        return {}
    try:  # TRL's GRPOTrainer renders tool episodes with its prefix-preserving training copy (Qwen3's, ...)
        return {"chat_template": ctu.get_training_chat_template(tokenizer)}
    except Exception:  # noqa: BLE001 - TRL raises ValueError for a template it cannot patch
        raise UserError(f"{where}: the chat template renders earlier turns differently once a tool reply follows "
                        "(not prefix-preserving); the episode's tokens could not be appended turn by turn") from None


def tool_suffix_ids(tokenizer, tool_messages: list[dict], chat_template_kwargs: dict | None = None) -> list[int]:
    """The token ids the chat template inserts after an assistant turn that called tools: the turn's end (what follows
    its stop token), the tool replies in the template's tool role, and the next assistant header -- TRL's
    ``GRPOTrainer._get_tool_suffix_ids``: a one-call dummy conversation rendered without and with the replies, the
    first cut after its last stop token (``stop_ids``)."""
    call = [{"type": "function", "function": {"name": tool_messages[0].get("name", "tool"), "arguments": {}}}]
    head = [{"role": "user", "content": "dummy"}, {"role": "assistant", "content": "", "tool_calls": call}]
    kwargs = chat_template_kwargs or {}
    prefix = tokenizer.apply_chat_template(head, tokenize=True, return_dict=False, **kwargs)
    full = tokenizer.apply_chat_template(head + tool_messages, tokenize=True, return_dict=False,
                                         add_generation_prompt=True, **kwargs)
    stops = set(stop_ids(tokenizer))
    ends = [i for i, t in enumerate(prefix) if t in stops]
    prefix = prefix[: ends[-1] + 1] if ends else prefix
    if full[: len(prefix)] != prefix:
        raise UserError("model: the chat template does not render a tool reply after the assistant's turn unchanged")
    return full[len(prefix):]
