"""Real model families (aligntool/toy/families.py): tokenizer and chat-template conventions, loading options, bad
input, and the matrix of commands x families. `scripts/supported_models.py` turns the matrix's results into the
README's supported-models table.

The models are small random-init models of each family's own transformers class, with tokenizers that keep the
family's special tokens and chat template; one step of each command is enough to exercise its code on the family.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import REPO, user_error

from aligntool import models, tokens
from aligntool.toy.families import FAMILIES, family_model_path

NAMES = list(FAMILIES)
CHAT = [n for n in NAMES if FAMILIES[n].template]


@pytest.fixture(scope="session")
def fam():
    """family name -> its model folder (built once per cache)."""
    return {name: family_model_path(name) for name in NAMES}


def tok_of(path):
    return models.load_tokenizer(str(path))


def conv(role, text):
    return [{"role": role, "content": text.strip()}]


@pytest.fixture(scope="session")
def conversational(tmp_path_factory):
    """Toy rows as conversations: sft (prompt/completion), preference (prompt/chosen/rejected), prompts."""
    from aligntool.toy import world

    d = tmp_path_factory.mktemp("conv")
    sft = [{"prompt": conv("user", r["prompt"]), "completion": conv("assistant", r["completion"])}
           for r in world.sft_rows(8, seed=0, split="train")]
    pref = [{"prompt": conv("user", r["prompt"]), "chosen": conv("assistant", r["chosen"]),
             "rejected": conv("assistant", r["rejected"])}
            for r in world.preference_pairs(8, seed=0, split="train", bt_temperature=0.5)]
    files = {}
    for name, rows in (("sft", sft), ("preference", pref), ("prompt", [{"prompt": r["prompt"]} for r in sft])):
        files[name] = d / f"{name}.jsonl"
        files[name].write_text("\n".join(map(json.dumps, rows)) + "\n")
    return files


# ---------------------------------------------------------------- tokenizer and template conventions


@pytest.mark.parametrize("name", NAMES)
def test_stop_tokens_pad_and_bos(name, fam):
    f = FAMILIES[name]
    tok = tok_of(fam[name])
    vocab = tok.get_vocab()
    stops = tokens.stop_ids(tok)
    # EOS, the generation config's stop tokens and the template's end of turn all end a generation
    assert stops[0] == vocab[f.eos] and {vocab[t] for t in f.stop} <= set(stops)
    eot = tokens.end_of_turn_id(tok)
    if f.template:
        assert eot is not None and eot in stops
    else:
        assert eot is None
    # a pad token always; it is EOS only where the vocabulary offers nothing else (GPT-2) or the family ships it so
    assert tok.pad_token is not None
    if f.pad is None and name != "gpt2":
        assert tok.pad_token_id != tok.eos_token_id, tok.pad_token
    # BOS once: on plain text where the tokenizer puts one, not twice on a chat-templated prompt that starts with it
    plain = tokens.encode_prompts(tok, ["Review of the old hotel:"])[0]
    if tok.bos_token_id is not None:
        assert plain.count(tok.bos_token_id) == (1 if f.add_bos else 0)
    if f.template:
        text = tok.apply_chat_template(conv("user", "Review of the old hotel:"), tokenize=False,
                                       add_generation_prompt=True)
        ids = tokens.encode_prompts(tok, [text])[0]
        if tok.bos_token_id is not None and f.bos != f.eos:
            assert ids.count(tok.bos_token_id) == (1 if text.startswith(tok.bos_token) or f.add_bos else 0)
        assert ids[-1] not in stops  # the prompt ends with the generation prompt, not a stop token


def _built(name, fam, recipe, tmp_path, data=None, extra=()):
    """The TRL trainer aligntool builds for ``recipe`` on family ``name`` (nothing is trained)."""
    from aligntool.recipe.loader import load_recipe
    from aligntool.train import prepare

    overrides = [f"model.name_or_path={fam[name]}", "train.eval_strategy=no", f"output_dir={tmp_path}",
                 "train.max_length=128", "dataset.toy.size=4", "dataset.toy.eval_size=0", *extra]
    if data is not None:
        overrides.append(f"dataset.path={data}")
    loaded = load_recipe(recipe, overrides)
    run = prepare(loaded, tmp_path)
    return loaded.spec.load().build(run), run.tokenizer


@pytest.mark.parametrize("name", CHAT)
def test_loss_masks_cover_the_assistant_turn_and_its_end(name, fam, conversational, tmp_path):
    """Conversational data: SFT's loss covers exactly the assistant's tokens and the end-of-turn token (never the
    prompt), with one BOS; DPO's completions end with the end of turn, its prompt has one BOS."""
    trainer, tok = _built(name, fam, "sft", tmp_path / "sft", conversational["sft"])
    row = trainer.train_dataset[0]
    ids, labels = row["input_ids"], row["labels"]
    eot = tokens.end_of_turn_id(tok)
    start = next(i for i, lab in enumerate(labels) if lab != -100)
    assert all(lab == -100 for lab in labels[:start]) and all(lab != -100 for lab in labels[start:])
    content = row["completion"][0]["content"]
    # the loss covers the assistant's text (and template whitespace), then its end of turn; the prompt is not in it
    assert tok.decode(ids[start:], skip_special_tokens=True).strip() == content
    assert content not in tok.decode(ids[:start]) and row["prompt"][0]["content"] in tok.decode(ids[:start])
    assert eot in labels[start:] and tok.decode(labels[start : labels.index(eot)]).strip() == content
    if tok.bos_token_id is not None and FAMILIES[name].bos != FAMILIES[name].eos:
        assert ids.count(tok.bos_token_id) <= 1
    trainer, tok = _built(name, fam, "dpo", tmp_path / "dpo", conversational["preference"])
    row = trainer.train_dataset[0]
    for key in ("chosen_ids", "rejected_ids"):
        assert eot in row[key][-3:], tok.convert_ids_to_tokens(row[key][-3:])  # then "\n", Phi-3: EOS
    if tok.bos_token_id is not None and FAMILIES[name].bos != FAMILIES[name].eos:
        assert row["prompt_ids"].count(tok.bos_token_id) <= 1


@pytest.mark.parametrize("name", NAMES)
def test_text_rows_keep_eos_in_the_loss_even_when_pad_is_eos(name, fam, tmp_path):
    trainer, tok = _built(name, fam, "sft", tmp_path)
    row = trainer.train_dataset[0]
    assert row["input_ids"][-1] == tok.eos_token_id and row["labels"][-1] == tok.eos_token_id
    if FAMILIES[name].add_bos:
        assert row["input_ids"].count(tok.bos_token_id) == 1 and row["input_ids"][0] == tok.bos_token_id
    # the collator pads a batch without masking the real EOS (pad may be EOS)
    batch = trainer.data_collator([trainer.train_dataset[0], trainer.train_dataset[1]])
    for i in range(2):
        n = len(trainer.train_dataset[i]["input_ids"])
        assert batch["labels"][i, n - 1].item() == tok.eos_token_id


@pytest.mark.parametrize("name", CHAT)
def test_generation_stops_at_the_end_of_turn(name, fam):
    """A model whose most likely token is the end of turn: sampling ends there (one token), not at max_new_tokens,
    (TRL #4481: generation that never stops)."""
    from aligntool.sampling import sample

    tok = tok_of(fam[name])
    model = models.load_model(str(fam[name])).eval()
    eot = tokens.end_of_turn_id(tok)
    head = model.get_output_embeddings()

    def favour_end_of_turn(module, args, out):
        out = out.clone()
        out[..., eot] += 1e4
        return out

    head.register_forward_hook(favour_end_of_turn)
    prompt = tok.apply_chat_template(conv("user", "Review of the old hotel:"), tokenize=False,
                                     add_generation_prompt=True)
    for temperature in (0.0, 1.0):
        _, ids = sample(model, tok, [prompt, prompt], max_new_tokens=8, temperature=temperature)
        assert ids == [[eot], [eot]]


# ---------------------------------------------------------------- loading options and bad input


def test_model_without_template_gets_one_from_the_recipe(fam, conversational, tmp_path):
    from aligntool.recipe.loader import load_recipe
    from aligntool.train import train

    base = ["train.max_steps=1", "train.per_device_train_batch_size=2", "train.eval_strategy=no",
            f"model.name_or_path={fam['gpt2']}", f"dataset.path={conversational['sft']}"]
    message = user_error(train, load_recipe("sft", [*base, f"output_dir={tmp_path / 'a'}"]))
    assert "no chat template" in message and "model.chat_template" in message and "chatml" in message
    template = tmp_path / "turns.jinja"
    template.write_text(tokens.TEMPLATES["phi3"])
    for spec in ("chatml", str(template)):
        out = tmp_path / Path(spec).stem
        summary = train(load_recipe("sft", [*base, f"model.chat_template={spec}", f"output_dir={out}"]))
        assert summary["global_step"] == 1
        from transformers import AutoTokenizer

        assert AutoTokenizer.from_pretrained(out).chat_template == (tokens.TEMPLATES["phi3"] if spec != "chatml"
                                                                    else tokens.TEMPLATES["chatml"])
    message = user_error(train, load_recipe("sft", [*base, "model.chat_template=nope.jinja",
                                                    f"output_dir={tmp_path / 'c'}"]))
    assert "model.chat_template" in message and "neither a template name" in message


@pytest.mark.parametrize("name", ["qwen2", "gemma2", "gpt2"])
def test_dtype_and_attention_options(name, fam):
    import torch

    model = models.load_model(str(fam[name]), dtype="bfloat16", attn_implementation="eager")
    assert next(model.parameters()).dtype == torch.bfloat16 and model.config._attn_implementation == "eager"
    if name == "gemma2":  # transformers has no sdpa path for Gemma 2 (soft-capping): one line naming the key
        message = user_error(models.load_model, str(fam[name]), attn_implementation="sdpa")
        assert message.startswith("model.attn_implementation:") and "eager" in message
    else:
        assert models.load_model(str(fam[name]), attn_implementation="sdpa").config._attn_implementation == "sdpa"
    if not torch.cuda.is_available():
        message = user_error(models.load_model, str(fam[name]), attn_implementation="flash_attention_2")
        assert "model.attn_implementation" in message and "CUDA" in message


def test_hub_id_without_network_is_one_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    message = user_error(models.resolve, "someorg/some-model")
    assert "'someorg/some-model'" in message and "HF_HUB_OFFLINE" in message and "local folder" in message
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there: like a machine offline
    message = user_error(models.resolve, "someorg/some-model")
    assert "cannot reach the hub" in message and "local folder" in message


def _copy(src: Path, dst: Path, drop=()) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(*drop))
    return dst


def test_bad_model_folders(fam, tmp_path):
    unknown = _copy(fam["qwen2"], tmp_path / "unknown")
    cfg = json.loads((unknown / "config.json").read_text())
    (unknown / "config.json").write_text(json.dumps({**cfg, "model_type": "qwen9"}))
    message = user_error(models.load_model, str(unknown))
    assert "qwen9" in message and "not known to transformers" in message
    remote = _copy(fam["qwen2"], tmp_path / "remote")
    (remote / "config.json").write_text(json.dumps({**cfg, "model_type": "my_arch",
                                                    "auto_map": {"AutoModelForCausalLM": "modeling.MyLM"}}))
    message = user_error(models.load_model, str(remote))
    assert "model.trust_remote_code" in message and "auto_map" in message
    no_tok = _copy(fam["qwen2"], tmp_path / "no-tokenizer", drop=("tokenizer*", "special_tokens_map.json",
                                                                    "chat_template.jinja"))
    message = user_error(models.load_tokenizer, str(no_tok))
    assert "no tokenizer here" in message and str(no_tok) in message


@pytest.mark.parametrize("name", ["gpt2", "gpt_neox", "phi3"])
def test_lora_targets_that_match_nothing_list_the_familys_layers(name, fam):
    from aligntool.recipe.schema import PeftConfig

    model = models.load_model(str(fam[name]))
    message = user_error(models.check_target_modules, PeftConfig(target_modules=["q_proj", "v_proj"]), model)
    expected = {"gpt2": "c_attn", "gpt_neox": "query_key_value", "phi3": "qkv_proj"}[name]
    assert "'q_proj'" in message and expected in message


# ---------------------------------------------------------------- the matrix: every command on every family

STEP = ["train.max_steps=1", "train.per_device_train_batch_size=2", "train.logging_steps=1", "train.save_steps=100",
        "dataset.toy.size=4", "dataset.toy.eval_size=0", "train.eval_strategy=no"]
SAMPLED = ["algo.max_new_tokens=6", "reward.source={reward}"]
TRAIN = {  # recipe -> its overrides; `{reward}` is the family's own reward model: random-init models write text the
    # toy gold reward scores 0, the reward model scores it with real numbers (and is itself exercised as a source)
    "sft": ["train.max_length=64", "peft.r=4"],
    "reward": ["train.max_length=64"],
    "dpo": ["train.max_length=64"],
    "hypo": ["train.max_length=64", "algo.max_new_tokens=6", "algo.kl_samples=2"],
    "sppo": ["train.max_length=64", *SAMPLED, "algo.iterations=1", "algo.num_samples=2"],
    "ppo": SAMPLED, "p3o": SAMPLED, "remax": SAMPLED, "online_dpo": SAMPLED, "xpo": SAMPLED,
    "inpo": ["train.max_length=64", *SAMPLED, "algo.iterations=1", "algo.num_samples=2"],
}
COMMANDS = [*TRAIN, "eval", "soup", "bon", "merge-lora"]
CELLS = [pytest.param(name, cmd, marks=pytest.mark.xdist_group(name), id=f"{name}-{cmd}")
         for name in NAMES for cmd in COMMANDS]
_RUNS: dict[tuple[str, str], Path] = {}  # (family, recipe) -> output folder, shared by the cells of a family


def _train(name: str, recipe: str, fam, root: Path) -> Path:
    from aligntool.recipe.loader import load_recipe
    from aligntool.train import train

    if (name, recipe) in _RUNS:
        return _RUNS[(name, recipe)]
    reward = _train(name, "reward", fam, root) if any("{reward}" in o for o in TRAIN[recipe]) else None
    out = root / f"{name}-{recipe}"
    extra = [o.format(reward=reward) for o in TRAIN[recipe]]
    summary = train(load_recipe(recipe, [*STEP, *extra, f"model.name_or_path={fam[name]}", f"output_dir={out}"]),
                    overwrite=True)
    assert summary["global_step"] >= 1 and (out / "summary.json").is_file()
    _RUNS[(name, recipe)] = out
    return out


def _weights(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def _changed(a: dict, b: dict) -> bool:
    return any(k in b and a[k].shape == b[k].shape and not (a[k] == b[k]).all() for k in a)


@pytest.mark.slow
@pytest.mark.parametrize("name,command", CELLS)
def test_matrix(name, command, fam, tmp_path_factory, capsys):
    from aligntool.cli import main

    root = tmp_path_factory.getbasetemp() / "matrix"
    root.mkdir(exist_ok=True)
    if command in TRAIN:
        out = _train(name, command, fam, root)
        if command == "sft":  # a LoRA run: the adapter is what it writes
            assert (out / "adapter_config.json").is_file()
        elif command == "reward":
            from transformers import AutoModelForSequenceClassification

            assert AutoModelForSequenceClassification.from_pretrained(out).config.pad_token_id is not None
        else:
            assert _changed(_weights(fam[name]), _weights(out)), "training changed no weight"
        return
    needs = {"eval": ["dpo", "reward"], "soup": ["dpo"], "bon": ["reward"], "merge-lora": ["sft"]}[command]
    runs = {recipe: _train(name, recipe, fam, root) for recipe in needs}  # a trainer logs to stdout: before capsys
    capsys.readouterr()
    if command == "eval":
        dpo, reward = runs["dpo"], runs["reward"]
        assert main(["eval", "--model", str(dpo), "--reference", str(fam[name]), "--num-prompts", "4",
                     "--max-new-tokens", "6", "--json"]) == 0
        result = json.loads(capsys.readouterr().out)
        assert 0 <= result["win_rate"] <= 1 and result["kl_to_reference"] == result["kl_to_reference"]
        assert main(["eval", "--model", str(reward), "--num-prompts", "4", "--json"]) == 0
        assert 0 <= json.loads(capsys.readouterr().out)["pairwise_accuracy"] <= 1
    elif command == "soup":
        dpo, out = runs["dpo"], root / f"{name}-soup"
        assert main(["soup", str(fam[name]), str(dpo), "--out", str(out)]) == 0
        base, tuned, soup = _weights(fam[name]), _weights(dpo), _weights(out)
        key = next(k for k in soup if not (base[k] == tuned[k]).all())
        assert (soup[key] - (base[key] + tuned[key]) / 2).abs().max() < 1e-6
    elif command == "bon":
        reward = runs["reward"]
        assert main(["bon", "--model", str(fam[name]), "--reward", str(reward), "--n", "2", "--num-prompts", "2",
                     "--json"]) == 0
        assert json.loads(capsys.readouterr().out)
    elif command == "merge-lora":
        lora, out = runs["sft"], root / f"{name}-merged"
        assert main(["merge-lora", str(lora), "--out", str(out)]) == 0
        assert (out / "model.safetensors").is_file() and not (out / "adapter_config.json").exists()
        assert _changed(_weights(fam[name]), _weights(out)), "the merged adapter changed nothing"


def test_readme_table_claims_only_tested_cells():
    """The supported-models table in the README is written by scripts/supported_models.py from this matrix: every
    family and command it lists is a cell here (or in the compress matrix)."""
    text = (REPO / "README.md").read_text()
    start, end = text.find("<!-- supported-models -->"), text.find("<!-- /supported-models -->")
    assert 0 < start < end, "README has no supported-models table"
    from test_compress_families import MODES

    lines = [line for line in text[start:end].splitlines() if line.startswith("| ")]
    header = [c.strip() for c in lines[0].split(" | ")[1:-1]]
    assert header == [*COMMANDS, *(f"compress<br>{m}" for m in MODES)]
    assert [row.split("`")[1] for row in lines[1:]] == NAMES
