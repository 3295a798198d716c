"""Rollouts at scale: asynchronous generation (one step off-policy, truncated importance sampling), the engine's vLLM
options (sleep mode, tensor parallelism, max_num_seqs) and TRL's AsyncGRPOTrainer behind generation.asynchronous."""

import contextlib
import math

import pytest
import torch
from conftest import RECIPES, cli_error, user_error

from aligntool.recipe.loader import load_recipe

QUICK = ["dataset.toy.size=16", "algo.max_new_tokens=6", "train.per_device_train_batch_size=4",
         "train.lr_scheduler_type=constant", "train.logging_steps=1", "train.save_steps=1000"]


def make_engine(tmp_path, recipe, *overrides):
    from aligntool import data, models
    from aligntool.online.engine import Engine
    from aligntool.train import Run

    loaded = load_recipe(RECIPES / f"{recipe}.yaml", [f"output_dir={tmp_path}", *QUICK, *overrides])
    run = Run(loaded, tmp_path)
    run.model_path = models.resolve("tiny")
    run.tokenizer = models.load_tokenizer(run.model_path)
    run.train_dataset, run.eval_dataset = data.load_for_recipe(loaded.recipe, loaded.spec.data)
    return Engine(run, loaded.spec.load().method(run))


# ------------------------------------------------------------------------------------------------ the correction
def test_truncated_importance_weights_by_hand():
    """Per token min(exp(log pi_old - log pi_behaviour), C), zero off the response; per pair of rows (P3O) the
    truncated product of all the pair's token ratios. Expected values from math.exp on the numbers themselves."""
    from aligntool.online.asynchronous import tis_weights

    old = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -4.0, -1.0]])
    beh = torch.tensor([[-1.5, -1.0, -0.5], [-2.0, -3.9, -7.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    expected = [math.exp(0.5), math.exp(-1.0), 0.0, 2.0, math.exp(-0.1), 2.0]  # exp(1.7) and exp(6) capped at 2
    assert tis_weights(old, beh, mask, 2.0).flatten().tolist() == pytest.approx(expected, rel=1e-6)
    seq = (0.5 - 1.0) + (1.7 - 0.1 + 6.0)  # the pair's summed log ratios (row 0's third token is padding)
    assert tis_weights(old, beh, mask, 2.0, group=2).tolist() == pytest.approx([min(math.exp(seq), 2.0)])
    assert tis_weights(old, beh, mask, 1e9, group=2).tolist() == pytest.approx([math.exp(seq)], rel=1e-5)


def test_weighting_the_advantage_is_weighting_the_clipped_loss():
    """The engine multiplies the advantage by w; for PPO's clipped loss that is the per-token loss times w (w > 0),
    the form of verl's and OpenRLHF's TIS. Checked against the loss written out per token."""
    from aligntool.losses.online import ppo_policy_loss

    logp = torch.tensor([[-1.0, -0.2, -3.0]])
    old = torch.tensor([[-1.4, -0.1, -2.0]])
    adv = torch.tensor([[1.5, -2.0, 0.7]])
    w = torch.tensor([[0.5, 2.0, 1.3]])
    mask = torch.ones(1, 3)
    loss, _ = ppo_policy_loss(logp, old, adv * w, mask, 0.2)
    terms = []
    for lp, lo, a, wt in zip(logp[0].tolist(), old[0].tolist(), adv[0].tolist(), w[0].tolist()):
        rho = math.exp(lp - lo)
        terms.append(-min(rho * a, min(max(rho, 0.8), 1.2) * a) * wt)
    assert loss.item() == pytest.approx(sum(terms) / 3, rel=1e-6)


# --------------------------------------------------------------------------------------------------- the wiring
def test_asynchronous_rows_are_what_the_previous_policy_samples(tmp_path, tiny_path):
    """With generation.asynchronous, iteration 2's rows are what the policy of iteration 1 (here the untouched tiny
    model, loaded again from disk) samples for iteration 2's prompts with its rows' seeds, not what the updated policy
    samples; their behaviour log-probs are that model's; iteration 2 trains on them (importance weights logged)."""
    from transformers import AutoModelForCausalLM

    from aligntool.sampling import completion_logprobs, generate_from_ids, positions
    from aligntool.tokens import encode_prompts, stop_ids

    engine = make_engine(tmp_path, "reinforce_pp", "generation.asynchronous=true", "train.learning_rate=0.02",
                         "train.max_steps=2", "algo.num_minibatches=1")
    engine._iteration()
    assert engine.state["iteration"] == 1
    ahead = engine.asynchronous.pending[2].result()[0]
    prompts = engine.batch_prompts()  # iteration 2's
    engine._calls = 0
    seeds = engine.row_seeds(len(prompts))  # its first call's seeds (the engine's definition of a row's stream)
    tok, stops = engine.tokenizer, stop_ids(engine.tokenizer)
    ids = encode_prompts(tok, prompts)

    def sample(lm):
        return generate_from_ids(lm.eval(), ids, tok.pad_token_id, stops, 6, temperature=1.0, top_p=1.0, seeds=seeds)

    got = [row[m.bool()].tolist() for row, m in zip(ahead.input_ids[:, ahead.prompt_width:], ahead.mask)]
    first = AutoModelForCausalLM.from_pretrained(tiny_path)
    assert got == sample(first)
    assert got != sample(engine.policy_lm)  # the update changed what the policy samples: the rows are off-policy
    with torch.no_grad():
        logits = first(input_ids=ahead.input_ids, attention_mask=ahead.attention_mask,
                       position_ids=positions(ahead.attention_mask)).logits
    expected = completion_logprobs(logits, ahead.input_ids, ahead.prompt_width) * ahead.mask
    assert torch.allclose(ahead.logp_behaviour, expected, atol=1e-5)
    engine._calls = 0
    stats = engine._iteration()
    assert engine.asynchronous.pending is None  # served
    assert stats["tis/weight_mean"] != pytest.approx(1.0, abs=1e-6) and 0 <= stats["tis/capped_ratio"] <= 1


def test_weights_are_one_and_training_matches_synchronous_at_learning_rate_zero(tmp_path, tiny_path):
    """When the update does not move the policy (learning rate 1e-12: below float32's resolution of the weights)
    the behaviour policy is the current one: every weight is 1 (none capped), and asynchronous ReMax logs what
    synchronous ReMax logs (the same rows: the same prompts, seeds and weights)."""
    runs = {}
    for mode in ("false", "true"):
        engine = make_engine(tmp_path / mode, "remax", f"generation.asynchronous={mode}", "train.learning_rate=1e-12",
                             "train.max_steps=2")
        runs[mode] = [engine._iteration() for _ in range(2)]
    for sync, ahead in zip(runs["false"], runs["true"]):
        assert ahead["reward"] == sync["reward"] and ahead["greedy_reward"] == sync["greedy_reward"]
        assert ahead["loss"] == pytest.approx(sync["loss"], abs=1e-6)
    assert runs["true"][1]["tis/weight_mean"] == pytest.approx(1.0, abs=1e-5)
    assert runs["true"][1]["tis/capped_ratio"] == 0.0 and "tis/weight_mean" not in runs["false"][1]


# ---------------------------------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("argv,needles", [
    (["algorithm=online_dpo"], ["asynchronous applies to reinforce_pp, remax, ppo, p3o, grpo", "'online_dpo'"]),
    (["algorithm=xpo"], ["asynchronous applies to", "'xpo'"]),
    (["algorithm=rloo"], ["asynchronous applies to", "'rloo'"]),
])
def test_asynchronous_is_refused_for_other_methods(capsys, tmp_path, argv, needles):
    cli_error(capsys, ["train", "--recipe", "reinforce_pp", "generation.asynchronous=true", *argv,
                       f"output_dir={tmp_path}", "--dry-run"], *needles)


def test_engine_refuses_asynchronous_with_vllm():
    from aligntool.online import asynchronous

    loaded = load_recipe(RECIPES / "ppo.yaml", ["generation.asynchronous=true", "generation.backend=vllm"])
    run = type("R", (), {"recipe": loaded.recipe, "loaded": loaded})()
    assert "generation.backend: hf" in user_error(asynchronous.check, run)


@pytest.mark.parametrize("key", ["enable_sleep_mode=true", "tensor_parallel_size=2", "max_num_seqs=8"])
def test_vllm_options_need_the_colocated_vllm_backend(key):
    message = user_error(load_recipe, RECIPES / "remax.yaml", [f"generation.{key}"])
    assert f"{key.split('=')[0]} applies to backend vllm in vllm_mode colocate" in message


def test_vllm_options_this_machine_cannot_run_are_one_line(monkeypatch):
    """Sleep mode where the installed vLLM has none (its CPU build), tensor parallelism without GPUs or not dividing
    the processes."""
    from aligntool.online import vllm_backend

    cfg = load_recipe(RECIPES / "remax.yaml", ["generation.backend=vllm", "generation.enable_sleep_mode=true"])
    monkeypatch.setattr(vllm_backend, "sleep_mode_missing", lambda: "cpu")
    assert "enable_sleep_mode: the installed vLLM has no sleep mode on this machine (cpu" in user_error(
        vllm_backend.check_scale_options, cfg.recipe.generation, 1)
    monkeypatch.setattr(vllm_backend, "sleep_mode_missing", lambda: None)
    vllm_backend.check_scale_options(cfg.recipe.generation, 1)
    tp = load_recipe(RECIPES / "remax.yaml", ["generation.backend=vllm", "generation.tensor_parallel_size=2"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "needs GPUs" in user_error(vllm_backend.check_scale_options, tp.recipe.generation, 2)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert "does not divide the 3 training processes" in user_error(
        vllm_backend.check_scale_options, tp.recipe.generation, 3)


# ------------------------------------------------------------------------------------- vLLM's arguments (boundary)
class FakeLLM:
    """vLLM's LLM at the boundary: records its constructor's arguments and the calls the engine makes."""

    made: list = []

    def __init__(self, **kwargs):
        self.kwargs, self.calls = kwargs, []
        FakeLLM.made.append(self)

    def sleep(self, level):
        self.calls.append(f"sleep {level}")

    def wake_up(self, tags=None):
        self.calls.append(f"wake_up {','.join(tags)}")

    def generate(self, prompts, sampling_params, use_tqdm):
        self.calls.append("generate")
        out = type("O", (), {"token_ids": [7, 2]})
        return [type("R", (), {"outputs": [out]}) for _ in prompts]


def test_engine_passes_the_vllm_options_and_sleeps_between_generations(monkeypatch, tiny_path, rendezvous_env):
    """TRL's VLLMGeneration (real) builds vLLM's LLM with the recipe's tensor_parallel_size, max_num_seqs and
    enable_sleep_mode; in sleep mode each engine generation re-pushes the weights vLLM dropped, wakes the KV cache,
    generates and sleeps again (level 2), as TRL's own generate does."""
    import importlib.machinery
    import sys
    import types

    import trl.generation.vllm_generation as tvg
    from accelerate import Accelerator
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from aligntool.online import vllm_backend

    monkeypatch.setattr(tvg, "LLM", FakeLLM, raising=False)
    monkeypatch.setattr(tvg, "is_vllm_available", lambda *a, **k: True)
    monkeypatch.setattr(vllm_backend, "check_installed", lambda: "0.32.0")
    monkeypatch.setattr(vllm_backend, "sleep_mode_missing", lambda: None)
    monkeypatch.setattr(vllm_backend, "engine_options", lambda dtype, eager: contextlib.nullcontext())
    fake_vllm = types.ModuleType("vllm")
    fake_vllm.__spec__ = importlib.machinery.ModuleSpec("vllm", None)
    fake_vllm.SamplingParams = lambda **kw: kw
    monkeypatch.setitem(sys.modules, "vllm", fake_vllm)
    cfg = load_recipe(RECIPES / "remax.yaml", ["generation.backend=vllm", "generation.enable_sleep_mode=true",
                                               "generation.max_num_seqs=3"]).recipe.generation
    lm = AutoModelForCausalLM.from_pretrained(tiny_path)
    FakeLLM.made.clear()
    sampler = vllm_backend.VLLMSampler(lm, Accelerator(cpu=True), AutoTokenizer.from_pretrained(tiny_path), cfg, 6)
    (llm,) = FakeLLM.made
    assert {k: llm.kwargs[k] for k in ("tensor_parallel_size", "max_num_seqs", "enable_sleep_mode")} == \
        {"tensor_parallel_size": 1, "max_num_seqs": 3, "enable_sleep_mode": True}
    assert llm.calls == ["sleep 2"]  # TRL puts it to sleep once built

    def sync_weights():
        llm.calls.append("sync")
        sampler.generation._llm_weights_sleeping = False

    monkeypatch.setattr(sampler.generation, "sync_weights", sync_weights)
    for _ in range(2):  # the same weights version twice: pushed again, as sleep level 2 dropped them
        sampler.sync(0)
        assert sampler.generate([[5, 6]], [1], [False], [2], 6, 1.0, 1.0) == [[7, 2]]
    assert llm.calls == ["sleep 2"] + ["sync", "wake_up kv_cache", "generate", "sleep 2"] * 2


def test_grpo_maps_the_vllm_options_onto_trl_and_refuses_max_num_seqs():
    from aligntool.trainers.grpo import generation_kwargs

    def run(*overrides):
        loaded = load_recipe(RECIPES / "grpo.yaml", ["generation.backend=vllm", *overrides])
        return type("R", (), {"recipe": loaded.recipe, "loaded": loaded})()

    out = generation_kwargs(run("generation.enable_sleep_mode=true", "generation.tensor_parallel_size=2"))
    assert out["vllm_enable_sleep_mode"] is True and out["vllm_tensor_parallel_size"] == 2
    assert "generation.max_num_seqs: grpo (TRL) sets vLLM's max_num_seqs from its batch" in user_error(
        generation_kwargs, run("generation.max_num_seqs=4"))


# ----------------------------------------------------------------------------------- TRL's AsyncGRPOTrainer
SERVER = ["generation.backend=vllm", "generation.vllm_mode=server", "generation.server_base_url=http://10.0.0.5:8000"]


@pytest.mark.parametrize("overrides,needle", [
    ([], "needs a vLLM server: set generation.backend: vllm, vllm_mode: server and server_base_url"),
    (SERVER, "TRL's AsyncGRPOTrainer needs CUDA GPUs"),
    (["algo.beta=0.04", *SERVER], "algo.beta: TRL's AsyncGRPOTrainer (generation.asynchronous: true) has no beta"),
])
def test_async_grpo_is_refused_where_it_cannot_run(capsys, tmp_path, overrides, needle):
    cli_error(capsys, ["train", "--recipe", "grpo", "generation.asynchronous=true", *overrides,
                       f"output_dir={tmp_path}"], needle)


def test_async_grpo_picks_trls_async_trainer_with_the_recipes_fields(monkeypatch, tmp_path):
    """Where it can run (CUDA and vLLM faked present), grpo's build hands TRL's AsyncGRPOTrainer the model folder,
    the reward functions and an AsyncGRPOConfig with the recipe's fields and the server's URL."""
    import trl.experimental.async_grpo as ag
    from trl.experimental.async_grpo import AsyncGRPOConfig

    import aligntool.online.vllm_backend as vb
    from aligntool import data, models
    from aligntool.train import Run
    from aligntool.trainers import grpo, grpo_async

    made = {}
    monkeypatch.setattr(ag, "AsyncGRPOTrainer", lambda **kw: made.update(kw) or "trainer")
    monkeypatch.setattr(grpo_async, "cuda", lambda: True)
    monkeypatch.setattr(vb, "check_installed", lambda: "0.32.0")
    loaded = load_recipe(RECIPES / "grpo.yaml", ["generation.asynchronous=true", *SERVER, "algo.epsilon=0.3",
                                                 "algo.num_generations=4", "train.learning_rate=3e-6",
                                                 "train.bf16=false", f"output_dir={tmp_path}", "dataset.toy.size=16"])
    run = Run(loaded, tmp_path)
    run.model_path = models.resolve("tiny")
    run.tokenizer = models.load_tokenizer(run.model_path)
    run.train_dataset, run.eval_dataset = data.load_for_recipe(loaded.recipe, loaded.spec.data)
    assert grpo.build(run) == "trainer"
    args = made["args"]
    assert isinstance(args, AsyncGRPOConfig) and made["model"] == str(run.model_path)
    assert (args.vllm_server_base_url, args.epsilon, args.num_generations, args.learning_rate) == \
        ("http://10.0.0.5:8000", 0.3, 4, 3e-6)
    assert len(made["reward_funcs"]) == 1 and made["train_dataset"] is run.train_dataset


# ------------------------------------------------------------------------------------------------- the benchmark
@pytest.mark.system
def test_bench_async_rollout_prints_both_curves_and_the_ratio(tiny_path):
    """scripts/bench_async_rollout.py --quick: both sides run; their first iteration is synchronous on both with the
    same seeds, so its reward is the same; the asynchronous side logged importance weights."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "bench_async_rollout.py"
    proc = subprocess.run([sys.executable, str(script), "--quick"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "async / sync median time per iteration:" in proc.stdout
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(result["curve"]["sync"]) == len(result["curve"]["async"]) == 5
    assert result["curve"]["sync"][0] == result["curve"]["async"][0]
    assert "importance weight mean nan" not in proc.stdout and result["ratio"] > 0
