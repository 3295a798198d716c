"""Small random-init models of real families, with tokenizers that keep each family's conventions, for tests.

Each family's model is built from its own transformers config class, small (hidden 64, 2 layers) but with the
family's quirks switched on: GPT-2's Conv1D layers, GPT-NeoX's parallel residual and partial rotary, Qwen2's q/k/v
biases and untied head, Qwen3's q/k norms, Llama 3's GQA and rope scaling, Gemma 2/3's soft-capping, sliding window
and scaled tied embeddings, Mistral's sliding window, Phi-3's fused qkv, OLMo 2's q/k norms, Qwen2-MoE's routed and
shared experts. The tokenizer is a byte-level BPE trained on the toy corpus plus the family's special tokens, with
its BOS/EOS/pad behaviour (BOS added by the tokenizer or by the template, pad or no pad, an end-of-turn token that
differs from EOS) and its chat template written from the documented format (ChatML, Llama 3 headers, Gemma turns,
Mistral [INST], Phi-3, OLMo 2); GPT-2 and GPT-NeoX have no chat template, like the base checkpoints.
``generation_config.json`` lists the stop tokens the real checkpoints list (EOS and end of turn).

``family_model_path(name)`` builds a family once and caches it under ``$ALIGNTOOL_CACHE/families-v<N>/<name>``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from aligntool.tokens import TEMPLATES

BUILD_VERSION = 1  # bump when anything below changes what is built
VOCAB_SIZE = 512  # BPE merges on the toy corpus, before the family's special tokens
HIDDEN = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
              max_position_embeddings=512)

@dataclass(frozen=True)
class Family:
    model_type: str
    config: dict
    specials: list[str]  # added first, in this order, so their ids are small and stable
    eos: str
    bos: str | None = None
    pad: str | None = None
    unk: str | None = None
    add_bos: bool = False  # the tokenizer itself puts BOS in front (Llama 3, Gemma, Mistral)
    template: str | None = None  # a name in aligntool.tokens.TEMPLATES
    stop: list[str] = field(default_factory=list)  # generation_config eos_token_id beside EOS (end of turn)
    quirks: str = ""


FAMILIES: dict[str, Family] = {
    "gpt2": Family(
        "gpt2", dict(n_embd=64, n_layer=2, n_head=4, n_positions=512), ["<|endoftext|>"],
        eos="<|endoftext|>", bos="<|endoftext|>", unk="<|endoftext|>",
        quirks="Conv1D projections, learned positions, no pad token, no chat template"),
    "gpt_neox": Family(
        "gpt_neox", dict(HIDDEN, rotary_pct=0.25, use_parallel_residual=True), ["<|endoftext|>", "<|padding|>"],
        eos="<|endoftext|>", bos="<|endoftext|>",
        quirks="parallel residual, partial rotary (25%), fused query_key_value, no pad token set, no chat template"),
    "qwen2": Family(
        "qwen2", dict(HIDDEN, num_key_value_heads=2, tie_word_embeddings=False),
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], eos="<|im_end|>", pad="<|endoftext|>", template="chatml",
        stop=["<|endoftext|>"], quirks="GQA, q/k/v biases, untied head, ChatML, no BOS"),
    "qwen3": Family(
        "qwen3", dict(HIDDEN, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True),
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], eos="<|endoftext|>", pad="<|endoftext|>", template="chatml",
        stop=["<|im_end|>"], quirks="q/k norms, GQA, ChatML whose end of turn <|im_end|> is not EOS, pad = EOS"),
    "llama3": Family(
        "llama", dict(HIDDEN, num_key_value_heads=2, tie_word_embeddings=False, rope_theta=500000.0,
                      rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                        original_max_position_embeddings=128)),
        ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
         "<|finetune_right_pad_id|>"],
        eos="<|eot_id|>", bos="<|begin_of_text|>", add_bos=True, template="llama3", stop=["<|end_of_text|>"],
        quirks="GQA, llama3 rope scaling, BOS from the tokenizer and from the template, no pad token"),
    "gemma2": Family(
        "gemma2", dict(HIDDEN, num_key_value_heads=2, head_dim=16, sliding_window=16, query_pre_attn_scalar=16),
        ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"],
        eos="<eos>", bos="<bos>", pad="<pad>", unk="<unk>", add_bos=True, template="gemma", stop=["<end_of_turn>"],
        quirks="logit soft-capping, sliding window, tied scaled embeddings, <end_of_turn> is not EOS, BOS twice "
               "if the template's text is tokenized with special tokens"),
    "gemma3": Family(
        "gemma3_text", dict(HIDDEN, num_key_value_heads=2, head_dim=16, sliding_window=16, query_pre_attn_scalar=16,
                            layer_types=["sliding_attention", "full_attention"]),
        ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"],
        eos="<eos>", bos="<bos>", pad="<pad>", unk="<unk>", add_bos=True, template="gemma", stop=["<end_of_turn>"],
        quirks="q/k norms, local/global layers, tied scaled embeddings, <end_of_turn> is not EOS"),
    "mistral": Family(
        "mistral", dict(HIDDEN, num_key_value_heads=2, sliding_window=16, tie_word_embeddings=False),
        ["<unk>", "<s>", "</s>", "[INST]", "[/INST]"], eos="</s>", bos="<s>", unk="<unk>", add_bos=True,
        template="mistral", quirks="sliding window, [INST] template, BOS from the tokenizer and the template, no pad"),
    "phi3": Family(
        "phi3", dict(HIDDEN, num_key_value_heads=4, tie_word_embeddings=False),
        ["<unk>", "<s>", "<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"],
        eos="<|endoftext|>", bos="<s>", pad="<|endoftext|>", unk="<unk>", template="phi3", stop=["<|end|>"],
        quirks="fused qkv_proj and gate_up_proj, <|end|> ends a turn but EOS is <|endoftext|>, pad = EOS"),
    "olmo2": Family(
        "olmo2", dict(HIDDEN, num_key_value_heads=4, tie_word_embeddings=False),
        ["<|endoftext|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>"],
        eos="<|endoftext|>", bos="<|endoftext|>", pad="<|pad|>", template="olmo2",
        quirks="q/k norms after projection, post-norms, BOS = EOS (every templated prompt starts with EOS)"),
    "qwen2_moe": Family(
        "qwen2_moe", dict(HIDDEN, num_key_value_heads=2, moe_intermediate_size=32, shared_expert_intermediate_size=64,
                          num_experts=4, num_experts_per_tok=2, tie_word_embeddings=False),
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], eos="<|im_end|>", pad="<|endoftext|>", template="chatml",
        stop=["<|endoftext|>"], quirks="4 routed experts (top 2, fused expert weights) and a shared expert, ChatML"),
}


def cache_root() -> Path:
    from aligntool.toy.tiny import cache_dir

    return cache_dir() / f"families-v{BUILD_VERSION}"


def family_model_path(name: str) -> Path:
    """The folder of family ``name``'s test model, building it first if the cache does not hold it yet."""
    if name not in FAMILIES:
        raise KeyError(f"unknown family {name!r}; known: {', '.join(FAMILIES)}")
    from aligntool.toy.tiny import build_lock

    target = cache_root() / name
    if (target / "model.safetensors").is_file():
        return target
    with build_lock(target):
        if (target / "model.safetensors").is_file():
            return target
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}-build-", dir=target.parent))
        try:
            build_family(name, tmp)
            os.rename(tmp, target)  # atomic: a reader never sees half a model
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def family_tokenizer(fam: Family):
    """A byte-level BPE on the toy corpus with ``fam``'s special tokens, BOS behaviour and chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from aligntool.toy import world

    texts = [p + c for p, c in world.corpus(2000, seed=0)] + world.all_prompts()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE + len(fam.specials), special_tokens=fam.specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    if fam.add_bos:  # as the real tokenizer.json files do: a post-processor puts BOS in front
        bos_id = tok.token_to_id(fam.bos)
        tok.post_processor = processors.TemplateProcessing(
            single=f"{fam.bos}:0 $A:0", pair=f"{fam.bos}:0 $A:0 {fam.bos}:1 $B:1", special_tokens=[(fam.bos, bos_id)])
    kwargs = {k: v for k, v in dict(eos_token=fam.eos, bos_token=fam.bos, pad_token=fam.pad, unk_token=fam.unk).items()
              if v is not None}
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=HIDDEN["max_position_embeddings"],
                                   **kwargs)
    if fam.template:
        fast.chat_template = TEMPLATES[fam.template]
    return fast


def build_family(name: str, out: Path) -> None:
    """Random-init model of family ``name`` (seed 0) and its tokenizer, saved as a transformers model folder."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    fam = FAMILIES[name]
    tokenizer = family_tokenizer(fam)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in fam.specials}
    eos = ids[fam.eos]
    config = AutoConfig.for_model(
        fam.model_type, vocab_size=len(tokenizer), eos_token_id=eos, bos_token_id=ids.get(fam.bos),
        pad_token_id=ids.get(fam.pad), **fam.config)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    stops = [eos] + [ids[t] for t in fam.stop]
    model.generation_config = GenerationConfig(
        bos_token_id=ids.get(fam.bos), eos_token_id=stops if len(stops) > 1 else eos, pad_token_id=ids.get(fam.pad))
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
