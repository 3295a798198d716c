"""The rollout engine's pieces on the tiny model: the batch layout, dropout at the sampling policy, reward scorers."""

import pytest
import torch
from conftest import RECIPES

from aligntool.online.engine import Engine
from aligntool.recipe.loader import load_recipe
from aligntool.sampling import completion_logprobs, pack, positions


def test_rollout_layout_gives_each_sequences_own_log_probs(tiny_path):
    """pack + positions + completion_logprobs on a left-padded batch of different prompt and response lengths equal a
    forward of each sequence alone (no padding at all)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_path).eval()
    prompts = [[5, 9, 14, 30], [7], [11, 12, 13, 40, 41, 42]]
    responses = [[21, 22, 2], [33], [17, 18, 19, 20, 25]]
    ids, attn, mask, P = pack(prompts, responses, pad_id=0)
    assert P == 6 and ids.shape == (3, 6 + 5) and mask.sum(-1).tolist() == [3, 1, 5]
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=attn, position_ids=positions(attn)).logits
    logp = completion_logprobs(logits, ids, P)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        with torch.no_grad():
            alone = torch.log_softmax(model(torch.tensor([p + r])).logits[0].float(), -1)
        expected = [alone[len(p) - 1 + j, tok].item() for j, tok in enumerate(r)]
        assert logp[i, : len(r)].tolist() == pytest.approx(expected, abs=1e-5), i
        assert (mask[i, len(r):] == 0).all()


def make_run(tmp_path, recipe, *overrides):
    from aligntool import data, models
    from aligntool.train import Run

    loaded = load_recipe(RECIPES / f"{recipe}.yaml", [f"output_dir={tmp_path}", *overrides])
    run = Run(loaded, tmp_path)
    run.model_path = models.resolve("tiny")
    run.tokenizer = models.load_tokenizer(run.model_path)
    run.train_dataset, run.eval_dataset = data.load_for_recipe(loaded.recipe, loaded.spec.data)
    return run


@pytest.mark.parametrize("keep", [False, True])
def test_ppo_ratio_is_one_at_the_sampling_policy_with_lora_dropout(tmp_path, tiny_path, keep):
    """Rollouts are scored in eval mode and the update runs in train mode: with LoRA dropout (0.3 here) the ratio at
    theta_old is 1 only because dropout is disabled (TRL's default), unless algo.disable_dropout=false keeps it."""
    from aligntool.online.ppo import PPO

    run = make_run(tmp_path, "ppo", "peft.r=4", "peft.lora_dropout=0.3", "dataset.toy.size=8",
                   "algo.max_new_tokens=8", f"algo.disable_dropout={str(not keep).lower()}")
    engine = Engine(run, PPO(run.algo))
    with torch.no_grad():  # a trained-looking adapter: lora_B is zero at init, which would hide the dropout
        for name, p in engine.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    ro = engine.rollout(engine.prompts[:4])
    engine.model.train()
    with torch.no_grad():
        logp, _ = engine.policy_logprobs(ro, grad=True)
    same = torch.allclose(logp, ro.logp, atol=1e-5)
    assert same != keep


def reward_model_folder(tiny_path, out):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_path, num_labels=1)
    tok = AutoTokenizer.from_pretrained(tiny_path)
    model.config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def test_reward_model_scorer_runs_on_the_given_device_and_dtype_in_eval_mode_and_batches(tmp_path, tiny_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from aligntool.rewards import reward_model_scorer

    folder = reward_model_folder(tiny_path, tmp_path / "rm")
    score = reward_model_scorer(str(folder), batch_size=2, device="cpu", dtype="bfloat16")
    assert next(score.model.parameters()).dtype == torch.bfloat16 and not score.model.training
    assert next(score.model.parameters()).device == torch.device("cpu")
    assert not any(p.requires_grad for p in score.model.parameters())
    prompts = ["Review of the old hotel in paris:"] * 5
    completions = [" great", " the room was dirty and the staff rude .", " ok", " lovely lovely", " cold ."]
    got = score(prompts, completions)  # batches of 2 of different lengths: padding must not change a score
    model = AutoModelForSequenceClassification.from_pretrained(folder, dtype=torch.bfloat16).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    with torch.no_grad():
        alone = [model(**tok(p + c, return_tensors="pt")).logits[0, 0].float().item()
                 for p, c in zip(prompts, completions)]
    assert got == pytest.approx(alone, abs=2e-2)  # bf16
    assert len(set(got)) > 1


def test_train_gradient_checkpointing_reaches_the_engines_policy_and_critic(tmp_path, tiny_path):
    """train.gradient_checkpointing: true recomputes activations in the online update (it was silently ignored): the
    policy and a separate critic recompute, and the update's gradients equal those without recomputation."""
    from aligntool.online.ppo import PPO

    grads = {}
    for on in (False, True):
        run = make_run(tmp_path / str(on), "ppo", "dataset.toy.size=8", "algo.max_new_tokens=8", "algo.critic=separate",
                       f"train.gradient_checkpointing={str(on).lower()}")
        engine = Engine(run, PPO(run.algo))
        assert engine.model.lm.is_gradient_checkpointing is on
        assert engine.model.critic_lm.is_gradient_checkpointing is on
        engine.model.train()
        ids = torch.tensor([[5, 9, 14, 30, 21, 22, 2]])
        attn = torch.ones_like(ids)
        logits = engine.model.lm(input_ids=ids, attention_mask=attn).logits
        engine.model.lm.zero_grad()
        logits.float().logsumexp(-1).sum().backward()
        grads[on] = torch.cat([p.grad.flatten() for p in engine.model.lm.parameters() if p.grad is not None])
    torch.testing.assert_close(grads[True], grads[False], rtol=1e-5, atol=1e-6)
