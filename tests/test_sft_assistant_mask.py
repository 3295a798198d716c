"""Conversational SFT (`messages` rows, system message, several turns) trains on the assistant's turns only: each
reply and its end-of-turn token, on every supported family and the tiny model (aligntool/trainers/sft.py,
aligntool/tokens.training_chat_template, aligntool/chat_templates/).

The expected mask is computed here without the code under test: the conversation is rendered with the model's own
(original) template, each message's text is located in it by character offsets, in order, and the tokens that
overlap an assistant reply, plus the end-of-turn token right after it, are the ones the loss must cover.
"""

from __future__ import annotations

import json

import pytest
from conftest import REPO, user_error

from aligntool import models, tokens
from aligntool.toy.families import FAMILIES, family_model_path

SYSTEMS = ["You are a helpful assistant for a hotel review site.", "Answer in one sentence.", "Be brief.",
           "You write short reviews."]
CONVERSATIONS = [
    [("user", "Was the old hotel clean?"), ("assistant", "Yes, the rooms were clean and quiet."),
     ("user", "And the food?"), ("assistant", "The food was good, but the coffee was cold.")],
    [("user", "Rate the film."), ("assistant", "The film was slow but the music was great."),
     ("user", "Would you watch it again?"), ("assistant", "Only with friends."), ("user", "Why?"),
     ("assistant", "It is more fun to laugh together.")],
    [("user", "Hi!"), ("assistant", "Hello, how can I help?")],
    [("user", "Review the cafe by the station."), ("assistant", "A small cafe with strong coffee and kind staff."),
     ("user", "Now in three words."), ("assistant", "Strong, kind, small.")],
]
ROWS = [{"messages": [{"role": "system", "content": s}] + [{"role": r, "content": c} for r, c in turns]}
        for s, turns in zip(SYSTEMS, CONVERSATIONS)]
# the token each family's template writes right after an assistant reply (its end of turn)
END_OF_TURN = {"chatml": "<|im_end|>", "llama3": "<|eot_id|>", "gemma": "<end_of_turn>", "mistral": "</s>",
               "phi3": "<|end|>", "olmo2": "<|endoftext|>", "tiny": "<|end|>"}
# what the model writes before the reply's text: Mistral's [INST] format has no assistant header, the reply is the
# space after [/INST] and the text
REPLY_PREFIX = {"mistral": " "}
CHAT = [name for name, f in FAMILIES.items() if f.template] + ["tiny"]


def model_path(name):
    if name == "tiny":
        from aligntool.toy.tiny import tiny_model_path

        return tiny_model_path(log=lambda m: None)
    return family_model_path(name)


def template_name(name):
    return "tiny" if name == "tiny" else FAMILIES[name].template


def expected(tok, messages, eot: str, prefix: str = ""):
    """(input ids, loss mask) from the ORIGINAL template: the tokens overlapping each assistant reply's characters
    (``prefix`` + its text), and the end-of-turn token that follows it."""
    text = tok.apply_chat_template(messages, tokenize=False)
    spans, cursor = [], 0
    for m in messages:
        if m["role"] == "system":  # some templates move it (Mistral: before the last user turn); never in the loss
            continue
        reply = (prefix if m["role"] == "assistant" else "") + m["content"]
        start = text.index(reply, cursor)
        cursor = start + len(reply)
        if m["role"] == "assistant":
            spans.append((start, cursor))
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    mask = [0] * len(ids)
    for s, e in spans:
        inside = [i for i, (a, b) in enumerate(offsets) if a < e and b > s]
        after = inside[-1] + 1
        assert ids[after] == tok.convert_tokens_to_ids(eot), tok.convert_ids_to_tokens(ids[inside[-1]:after + 2])
        for i in [*inside, after]:
            mask[i] = 1
    assert sum(mask) > 0
    return ids, mask


@pytest.fixture(scope="module")
def messages_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("conv") / "messages.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return path


def build(name, data, tmp_path, *extra):
    """aligntool's SFT trainer for family ``name`` on ``data`` (nothing is trained)."""
    from aligntool.recipe.loader import load_recipe
    from aligntool.train import prepare

    loaded = load_recipe("sft", [f"model.name_or_path={model_path(name)}", f"dataset.path={data}",
                                 "train.eval_strategy=no", "train.max_length=512", f"output_dir={tmp_path}", *extra])
    run = prepare(loaded, tmp_path)
    return loaded.spec.load().build(run), run


# ---------------------------------------------------------------- the training templates (tokenizers only)


EDGE_CASES = [
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}],
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}],
    [{"role": "system", "content": "S"}, {"role": "assistant", "content": "A first"}],
    [{"role": "system", "content": "S"}, {"role": "user", "content": " padded "},
     {"role": "assistant", "content": "  spaced\n"}, {"role": "user", "content": "next"}],
    [{"role": "user", "content": "x"}, {"role": "assistant", "content": ""}],
]


@pytest.mark.parametrize("name", CHAT)
def test_training_template_renders_like_the_models_own(name):
    """The marked copy writes exactly the original's text, with and without the generation prompt; it ships inside
    the package (aligntool/chat_templates/)."""
    tok = models.load_tokenizer(str(model_path(name)))
    training = tokens.training_chat_template(tok)
    assert training is not None and tokens.has_generation_markers(training)
    assert not tokens.has_generation_markers(tok.chat_template)
    assert (tokens.TRAINING_TEMPLATES_DIR / f"{template_name(name)}_training.jinja").read_text() == training
    for messages in [r["messages"] for r in ROWS] + EDGE_CASES:
        for prompt in (False, True):
            assert tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt) == \
                tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt, chat_template=training)


@pytest.mark.parametrize("name", CHAT)
def test_training_template_marks_exactly_the_assistant_turns(name):
    from trl.chat_template_utils import is_chat_template_stop_token_trained

    tok = models.load_tokenizer(str(model_path(name)))
    training = tokens.training_chat_template(tok)
    assert is_chat_template_stop_token_trained(tok, chat_template=training)  # TRL's own check agrees
    for row in ROWS:
        ids, mask = expected(tok, row["messages"], END_OF_TURN[template_name(name)],
                            REPLY_PREFIX.get(template_name(name), ""))
        out = tok.apply_chat_template(row["messages"], tokenize=True, return_dict=True, chat_template=training,
                                      return_assistant_tokens_mask=True)
        assert out["input_ids"] == ids
        assert out["assistant_masks"] == mask, (tok.convert_ids_to_tokens([i for i, m in zip(ids, mask) if m]),
                                                tok.convert_ids_to_tokens(
                                                    [i for i, m in zip(ids, out["assistant_masks"]) if m]))


# ---------------------------------------------------------------- through aligntool's SFT trainer


@pytest.mark.parametrize("name", CHAT)
def test_sft_loss_covers_exactly_the_assistant_turns(name, messages_file, tmp_path):
    """The labels TRL trains on: the assistant replies and their end-of-turn tokens, no system or user token; the
    tokenizer keeps its own template (what is saved with the model)."""
    trainer, run = build(name, messages_file, tmp_path)
    assert trainer.args.assistant_only_loss
    assert run.tokenizer.chat_template == tokens.TEMPLATES.get(template_name(name), run.tokenizer.chat_template)
    assert not tokens.has_generation_markers(run.tokenizer.chat_template)
    assert len(trainer.train_dataset) == len(ROWS)
    by_ids = {tuple(r["input_ids"]): r["labels"] for r in trainer.train_dataset}
    for row in ROWS:
        ids, mask = expected(run.tokenizer, row["messages"], END_OF_TURN[template_name(name)],
                            REPLY_PREFIX.get(template_name(name), ""))
        labels = by_ids[tuple(ids)]
        assert [int(lab != -100) for lab in labels] == mask
        assert all(lab == i for lab, i, m in zip(labels, ids, mask) if m)


def test_a_template_with_generation_markers_is_used_as_it_is(messages_file, tmp_path):
    """A user's own template with {% generation %} markers (here: set through model.chat_template) masks by them."""
    marked = tmp_path / "marked.jinja"
    marked.write_text(
        "{% for m in messages %}<|{{ m['role'] }}|>{% if m['role'] == 'assistant' %}{% generation %}"
        "{{ m['content'] }}<|end|>{% endgeneration %}{% else %}{{ m['content'] }}<|end|>{% endif %}{% endfor %}")
    trainer, run = build("tiny", messages_file, tmp_path / "out", f"model.chat_template={marked}")
    assert trainer.args.assistant_only_loss
    for row in trainer.train_dataset:
        kept = run.tokenizer.decode([lab for lab in row["labels"] if lab != -100])
        assert "Be brief" not in kept and "Hi!" not in kept and "<|end|>" in kept


UNMARKED = "{% for m in messages %}### {{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"


def test_unknown_template_default_is_the_whole_conversation_with_a_note(messages_file, tmp_path, capsys):
    plain = tmp_path / "plain.jinja"
    plain.write_text(UNMARKED)
    trainer, _ = build("tiny", messages_file, tmp_path / "out", f"model.chat_template={plain}")
    err = capsys.readouterr().err
    notes = [line for line in err.splitlines() if "{% generation %}" in line]
    assert len(notes) == 1 and notes[0].startswith("note:") and "model.chat_template" in notes[0]
    assert "whole conversations" in notes[0]
    assert not trainer.args.assistant_only_loss
    assert all(lab != -100 for row in trainer.train_dataset for lab in row["labels"])


def test_assistant_only_asked_for_on_an_unknown_template_is_one_line(messages_file, tmp_path):
    plain = tmp_path / "plain.jinja"
    plain.write_text(UNMARKED)
    message = user_error(build, "tiny", messages_file, tmp_path / "out", f"model.chat_template={plain}",
                         "algo.assistant_only_loss=true")
    assert "algo.assistant_only_loss" in message and "model.chat_template" in message
    assert "{% generation %}" in message


def test_assistant_only_on_plain_text_rows_is_one_line(tmp_path):
    data = tmp_path / "text.jsonl"
    data.write_text(json.dumps({"text": "The hotel was clean."}) + "\n")
    message = user_error(build, "tiny", data, tmp_path / "out", "algo.assistant_only_loss=true")
    assert "algo.assistant_only_loss" in message and "conversational" in message


def test_assistant_only_false_trains_on_the_whole_conversation(messages_file, tmp_path):
    trainer, _ = build("tiny", messages_file, tmp_path, "algo.assistant_only_loss=false")
    assert all(lab != -100 for row in trainer.train_dataset for lab in row["labels"])


def test_rows_without_an_assistant_turn_are_dropped_and_counted(tmp_path, capsys):
    data = tmp_path / "rows.jsonl"
    rows = ROWS + [{"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "Only a question"}]}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    trainer, _ = build("tiny", data, tmp_path / "out")
    assert len(trainer.train_dataset) == len(ROWS)
    assert "note: 1 of 5 training rows were dropped (no assistant message" in capsys.readouterr().err
    data.write_text(json.dumps(rows[-1]) + "\n")
    message = user_error(build, "tiny", data, tmp_path / "out2")
    assert "assistant message" in message


def test_packed_rows_are_not_counted_as_dropped(messages_file, tmp_path, capsys):
    """Packing makes fewer rows than it is given, none dropped: the same assistant tokens are in the loss, no note."""
    trainer, run = build("tiny", messages_file, tmp_path, "algo.packing=true", "train.max_length=128")
    assert len(trainer.train_dataset) < len(ROWS)
    in_loss = sum(lab != -100 for row in trainer.train_dataset for lab in row["labels"])
    assert in_loss == sum(sum(expected(run.tokenizer, r["messages"], "<|end|>")[1]) for r in ROWS)
    run._check_rows_left(trainer)
    assert "dropped" not in capsys.readouterr().err


def test_training_templates_ship_with_the_package():
    """Every template file matches the package data of pyproject.toml (a wheel would lack it otherwise)."""
    import fnmatch

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    patterns = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["aligntool"]
    files = [p.relative_to(REPO / "aligntool").as_posix() for p in tokens.TRAINING_TEMPLATES_DIR.iterdir()]
    assert sorted(f.split("/")[-1] for f in files) == sorted(
        f"{name}_training.jinja" for name in [*tokens.TEMPLATES, "tiny"])
    assert all(any(fnmatch.fnmatch(f, pattern) for pattern in patterns) for f in files)


# ---------------------------------------------------------------- end to end


@pytest.mark.slow
def test_sft_run_on_messages_trains_on_the_assistant_turns_only(tmp_path, monkeypatch, capsys):
    """Two steps of SFT on the tiny model: every batch's labels are the assistant turns (computed from the original
    template), a row that truncation leaves without an assistant token is dropped and counted in a note, and the
    saved model keeps its own chat template."""
    import trl
    from transformers import AutoTokenizer

    from aligntool.recipe.loader import load_recipe
    from aligntool.toy.tiny import CHAT_TEMPLATE
    from aligntool.train import train

    tok = models.load_tokenizer(str(model_path("tiny")))
    long_user = "Tell me about the hotel, the rooms, the food, the staff and the view from the top floor. " * 3
    rows = ROWS + [{"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": long_user},
                                 {"role": "assistant", "content": "Too long to reach."}]}]
    max_length = max(len(expected(tok, r["messages"], "<|end|>")[0]) for r in ROWS)
    assert expected(tok, rows[-1]["messages"], "<|end|>")[1].index(1) >= max_length  # its reply is cut off entirely
    data = tmp_path / "messages.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))

    seen = []
    original = trl.SFTTrainer.compute_loss

    def recording(self, model, inputs, *args, **kwargs):
        seen.extend(zip(inputs["input_ids"].tolist(), inputs["labels"].tolist(), inputs["attention_mask"].tolist()))
        return original(self, model, inputs, *args, **kwargs)

    monkeypatch.setattr(trl.SFTTrainer, "compute_loss", recording)
    out = tmp_path / "run"
    summary = train(load_recipe("sft", [f"dataset.path={data}", f"output_dir={out}", "train.max_steps=2",
                                        "train.per_device_train_batch_size=2", "train.eval_strategy=no",
                                        f"train.max_length={max_length}", "train.save_steps=100"]))
    assert summary["global_step"] == 2
    err = capsys.readouterr().err
    assert (f"note: 1 of 5 training rows were dropped (no assistant token left within train.max_length={max_length})"
            in err)
    wanted = {tuple(ids): mask for ids, mask in (expected(tok, r["messages"], "<|end|>") for r in ROWS)}
    assert len(seen) == 4
    for ids, labels, attention in seen:
        n = sum(attention)  # right padding
        ids, labels = tuple(ids[:n]), labels[:n]
        assert [int(lab != -100) for lab in labels] == wanted[ids]
    assert AutoTokenizer.from_pretrained(out).chat_template == CHAT_TEMPLATE
