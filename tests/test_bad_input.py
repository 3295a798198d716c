"""Every bad input of the foundation issue ends in one line naming the file/key/line, exit code 2, no traceback."""

import json

import pytest

from aligntool.cli import main

GOOD = """\
algorithm: dpo
model:
  name_or_path: tiny
dataset:
  path: toy
  toy: {size: 16}
train:
  max_steps: 1
"""


def run_cli(capsys, *args) -> tuple[int, str]:
    code = main(list(args))
    err = capsys.readouterr().err.strip()
    return code, err


def expect_error(capsys, args, *needles):
    code, err = run_cli(capsys, *args)
    last = err.splitlines()[-1] if err else ""
    assert code == 2, err
    assert "Traceback" not in err, err
    assert last.startswith("aligntool: error: "), err
    for needle in needles:
        assert needle in last, (needle, last)
    return last


def test_missing_recipe_file(capsys, tmp_path):
    expect_error(capsys, ["train", "--recipe", str(tmp_path / "nope.yaml")], "nope.yaml", "not found")


def test_yaml_syntax_error_names_the_line(capsys, recipe_file):
    path = recipe_file("algorithm: dpo\ntrain:\n  max_steps: [1, 2\n  seed: 3\n")
    expect_error(capsys, ["train", "--recipe", str(path)], f"{path}:", "YAML syntax error")
    msg = expect_error(capsys, ["train", "--recipe", str(path)])
    line = int(msg.split(f"{path}:")[1].split(":")[0])
    assert line in (3, 4)


def test_unknown_algorithm_lists_known_ones(capsys, recipe_file):
    path = recipe_file("algorithm: dpoo\n")
    expect_error(capsys, ["train", "--recipe", str(path)], f"{path}:1", "'dpoo'", "did you mean 'dpo'", "sft", "reward")


@pytest.mark.parametrize(
    "text, key, suggestion",
    [
        (GOOD.replace("max_steps", "max_stesp"), "train.max_stesp", "max_steps"),
        (GOOD.replace("name_or_path", "name_or_pth"), "model.name_or_pth", "name_or_path"),
        (GOOD + "algo:\n  bta: 0.1\n", "algo.bta", "beta"),
        (GOOD.replace("dataset:", "datset:"), "datset", "dataset"),
        (GOOD + "  learnin_rate: 0.1\n", "train.learnin_rate", "learning_rate"),
        (GOOD + "  per_device_train_batchsize: 4\n", "per_device_train_batchsize", "per_device_train_batch_size"),
    ],
)
def test_unknown_key_is_named_with_a_suggestion(capsys, recipe_file, text, key, suggestion):
    path = recipe_file(text)
    expect_error(capsys, ["train", "--recipe", str(path)], "unknown key", key, f"did you mean '{suggestion}'")


def test_wrong_type_names_file_line_and_key(capsys, recipe_file):
    path = recipe_file(GOOD + "  learning_rate: fast\n")
    expect_error(capsys, ["train", "--recipe", str(path)], f"{path}:9", "train.learning_rate", "'fast'")


def test_negative_max_steps(capsys, recipe_file):
    path = recipe_file(GOOD.replace("max_steps: 1", "max_steps: -5"))
    expect_error(capsys, ["train", "--recipe", str(path)], f"{path}:8", "train.max_steps", "greater than 0", "-5")


def test_out_of_range_algo_value_and_bad_loss_type(capsys, recipe_file):
    path = recipe_file(GOOD + "algo:\n  beta: -1\n")
    expect_error(capsys, ["train", "--recipe", str(path)], "algo.beta", "greater than 0")
    path = recipe_file(GOOD + "algo:\n  loss_type: [sigmoid, sft]\n  loss_weights: [1.0]\n")
    expect_error(capsys, ["train", "--recipe", str(path)], "loss_weights has 1 entries for 2 loss types")
    path = recipe_file(GOOD + "algo:\n  loss_type: bogus\n")
    expect_error(capsys, ["train", "--recipe", str(path)], "'bogus'", "ipo", "hinge")


def test_override_without_equals_and_override_type(capsys):
    expect_error(capsys, ["train", "--recipe", "dpo", "train.max_steps"], "train.max_steps", "KEY=VALUE")
    expect_error(capsys, ["train", "--recipe", "dpo", "train.max_steps=-2"], "train.max_steps", "greater than 0")
    expect_error(capsys, ["train", "--recipe", "dpo", "model.bogus=1"], "unknown key 'model.bogus'")


def test_dataset_file_missing(capsys, recipe_file, tmp_path):
    path = recipe_file(GOOD.replace("path: toy", f"path: {tmp_path}/pairs.jsonl") + f"output_dir: {tmp_path}/out\n")
    expect_error(capsys, ["train", "--recipe", str(path)], "dataset.path", "pairs.jsonl", "not found")


def test_missing_column_is_named_and_found_columns_listed(capsys, recipe_file, tmp_path):
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": "a", "chosen": "b", "answer": "c"}) + "\n" for _ in range(3)))
    path = recipe_file(GOOD.replace("path: toy", f"path: {data}") + f"output_dir: {tmp_path}/out\n")
    expect_error(capsys, ["train", "--recipe", str(path)], "chosen+rejected", "found: prompt, chosen, answer")


def test_malformed_jsonl_line_gives_file_and_line(capsys, recipe_file, tmp_path):
    data = tmp_path / "pairs.jsonl"
    good = json.dumps({"prompt": "a", "chosen": "b", "rejected": "c"})
    data.write_text(f"{good}\n{good}\n{{\"prompt\": \"a\", \"chosen\": \n{good}\n")
    path = recipe_file(GOOD.replace("path: toy", f"path: {data}") + f"output_dir: {tmp_path}/out\n")
    expect_error(capsys, ["train", "--recipe", str(path)], f"{data}:3", "malformed JSON")


def test_empty_dataset(capsys, recipe_file, tmp_path):
    data = tmp_path / "pairs.csv"
    data.write_text("prompt,chosen,rejected\n")
    path = recipe_file(GOOD.replace("path: toy", f"path: {data}") + f"output_dir: {tmp_path}/out\n")
    expect_error(capsys, ["train", "--recipe", str(path)], "pairs.csv", "empty")


def test_model_path_that_does_not_exist(capsys, recipe_file, tmp_path):
    path = recipe_file(GOOD.replace("name_or_path: tiny", f"name_or_path: {tmp_path}/no-model")
                       + f"output_dir: {tmp_path}/o\n")
    expect_error(capsys, ["train", "--recipe", str(path)], "model.name_or_path", "no-model", "does not exist")


def test_model_folder_without_config(capsys, recipe_file, tmp_path):
    (tmp_path / "empty-model").mkdir()
    path = recipe_file(GOOD.replace("name_or_path: tiny", f"name_or_path: {tmp_path}/empty-model")
                       + f"output_dir: {tmp_path}/o\n")
    expect_error(capsys, ["train", "--recipe", str(path)], "model.name_or_path", "config.json")


def test_output_dir_that_cannot_be_written(capsys, recipe_file, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    path = recipe_file(GOOD + f"output_dir: {blocker}/run\n")
    expect_error(capsys, ["train", "--recipe", str(path)], "output_dir", "cannot write")


def test_debug_flag_shows_the_traceback(recipe_file):
    from aligntool.errors import UserError

    path = recipe_file("algorithm: nope\n")
    with pytest.raises(UserError):
        main(["train", "--recipe", str(path), "--debug"])


def test_eval_of_missing_model(capsys, tmp_path):
    expect_error(capsys, ["eval", "--model", str(tmp_path / "gone")], "--model", "does not exist")


@pytest.mark.parametrize(
    "recipe, overrides, needles",
    [
        ("dpo", ["reward.source=gold"], ["reward", "does not apply", "'dpo'"]),
        ("fdpo", ["algo.f_alpha=0.5"], ["f_alpha applies only with f_divergence_type: alpha_divergence"]),
        ("fdpo", ["algo.f_divergence_type=alpha_divergence", "algo.f_alpha=1.5"], ["algo.f_alpha", "less than 1"]),
        ("dpo", ["algo.label_smoothing=0.1"], ["label_smoothing applies only to loss_type"]),
        ("dpo", ["algo.gamma=0.1"], ["unknown key 'algo.gamma'"]),
        ("srpo", ["algo.alpha=1.5"], ["algo.alpha", "less than or equal to 1"]),
        ("srpo", ["algo.revision_template=no placeholders"], ["algo.revision_template", "{prompt}"]),
        ("sppo", ["algo.num_samples=1"], ["algo.num_samples", "greater than or equal to 2"]),
        ("rso", ["algo.num_samples=32"], ["num_samples (32) must not exceed num_candidates (16)"]),
        ("hypo", ["algo.kl_samples=1"], ["algo.kl_samples", "greater than or equal to 2"]),
        ("cpl", ["algo.contrastive_bias=0"], ["algo.contrastive_bias", "greater than 0"]),
        ("spo", ["algo.removal_ratios=[0.5, 0.2]"], ["algo.removal_ratios", "increasing"]),
        ("dpo", ["train.optim=AdamW9bit"], ["train.optim", "unknown optimizer 'AdamW9bit'", "AdamW8bit"]),
    ],
)
def test_options_that_do_not_fit_the_algorithm(capsys, recipe, overrides, needles):
    expect_error(capsys, ["train", "--recipe", recipe, *overrides], *needles)


def test_rso_needs_prompts_and_cpl_needs_pairs(capsys, recipe_file, tmp_path):
    data = tmp_path / "text.jsonl"
    data.write_text('{"text": "hello"}\n')
    expect_error(capsys, ["train", "--recipe", "rso", f"dataset.path={data}", f"output_dir={tmp_path}/o"],
                 "prompt", "found: text")
    expect_error(capsys, ["train", "--recipe", "cpl", f"dataset.path={data}", f"output_dir={tmp_path}/o"],
                 "chosen+rejected", "found: text")


def test_online_bad_inputs(capsys, tmp_path, tiny_path):
    expect_error(capsys, ["train", "--recipe", "ppo", f"reward.source={tiny_path}", f"output_dir={tmp_path}/o"],
                 "reward.source", "not a reward model")
    expect_error(capsys, ["train", "--recipe", "ppo", "reward.source=aligntool.nope:fn", f"output_dir={tmp_path}/o"],
                 "reward.source", "cannot import")
    expect_error(capsys, ["train", "--recipe", "ppo", "ref_model.soup=[tiny]"], "ref_model.soup", "at least 2")
    expect_error(capsys, ["train", "--recipe", "ppo", "ref_model.soup=[tiny, tiny]",
                          "ref_model.soup_weights=[0.5, 0.6]"], "sum to 1")
    expect_error(capsys, ["train", "--recipe", "ppo", "reward.aggregate=wco"], "aggregate applies to an ensemble only")
    expect_error(capsys, ["train", "--recipe", "p3o", "algo.variant=both"], "algo.variant")


def bad_reward(prompts, completions):
    return [float("nan")] * len(completions)


def short_reward(prompts, completions):
    return [1.0]


@pytest.mark.parametrize("fn", ["bad_reward", "short_reward"])
def test_reward_function_returning_nan_or_wrong_length(capsys, tmp_path, tiny_path, fn, monkeypatch):
    monkeypatch.syspath_prepend(str(__import__("pathlib").Path(__file__).parent))
    expect_error(capsys, ["train", "--recipe", "remax", f"reward.source=test_bad_input:{fn}", "train.max_steps=1",
                          "train.per_device_train_batch_size=2", "algo.max_new_tokens=4", f"output_dir={tmp_path}/o"],
                 f"reward test_bad_input:{fn}: ", "is not a finite number" if fn == "bad_reward" else
                 "returned 1 values for 2 completions")


def test_soup_of_different_shapes(capsys, tmp_path, tiny_path):
    import json as js
    import shutil

    from safetensors.torch import load_file, save_file

    other = tmp_path / "other"
    shutil.copytree(tiny_path, other)
    state = load_file(str(other / "model.safetensors"))
    key = next(iter(state))
    state[key] = state[key][:1]
    save_file(state, str(other / "model.safetensors"), metadata={"format": "pt"})
    expect_error(capsys, ["soup", str(tiny_path), str(other), "--out", str(tmp_path / "s")], "soup", "shape")
    cfg = js.loads((other / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (other / "config.json").write_text(js.dumps(cfg))
    expect_error(capsys, ["soup", str(tiny_path), str(other), "--out", str(tmp_path / "s")], "one architecture")


def judge_out_of_range(prompts, a, b):
    return [1.5] * len(a)


def judge_wrong_length(prompts, a, b):
    return [0.5]


@pytest.mark.parametrize("recipe,overrides,needles", [
    ("inpo", ["algo.eta=0"], ["algo.eta", "greater than 0"]),
    ("inpo", ["algo.num_samples=1"], ["algo.num_samples", "greater than or equal to 2"]),
    ("inpo", ["algo.iterations=0"], ["algo.iterations", "greater than or equal to 1"]),
    ("xpo", ["algo.alpha=-1"], ["algo.alpha", ">= 0"]),
    ("online_dpo", ["algo.loss_type=sigmoidd"], ["algo.loss_type", "'sigmoidd' is not one of TRL's"]),
    ("online_dpo", ["reward.judge=x:y", "reward.source=runs/rm"], ["judge or a score source"]),
    ("ppo", ["reward.judge=test_bad_input:judge_out_of_range"], ["reward.judge", "gives no score"]),
    ("inpo", ["reward.judge=test_bad_input:judge_out_of_range", "algo.pairing=best_worst"],
     ["algo.pairing", "tournament"]),
])
def test_online_preference_options(capsys, tmp_path, tiny_path, recipe, overrides, needles, monkeypatch):
    monkeypatch.syspath_prepend(str(__import__("pathlib").Path(__file__).parent))
    expect_error(capsys, ["train", "--recipe", recipe, *overrides, f"output_dir={tmp_path}/o"], *needles)


@pytest.mark.parametrize("fn,needle", [("judge_out_of_range", "e.g. 1.5"), ("judge_wrong_length", "returned 1 values")])
def test_judge_returning_values_outside_0_1_or_the_wrong_shape(capsys, tmp_path, tiny_path, fn, needle, monkeypatch):
    monkeypatch.syspath_prepend(str(__import__("pathlib").Path(__file__).parent))
    expect_error(capsys, ["train", "--recipe", "online_dpo", f"reward.judge=test_bad_input:{fn}", "train.max_steps=1",
                          "train.per_device_train_batch_size=2", "algo.max_new_tokens=4", f"output_dir={tmp_path}/o"],
                 "reward.judge", needle, "in [0, 1]")


def test_lora_and_launch_bad_inputs(capsys, tmp_path, tiny_path):
    expect_error(capsys, ["train", "--recipe", "dpo", "peft.target_modules=[qkv_proj]", f"output_dir={tmp_path}/o"],
                 "peft.target_modules", "'qkv_proj' matches no module", "q_proj")
    expect_error(capsys, ["train", "--recipe", "dpo", "peft.load_in_4bit=true", f"output_dir={tmp_path}/o"],
                 "peft.load_in_4bit", "needs a CUDA GPU")
    expect_error(capsys, ["train", "--recipe", "dpo", "--nproc", "64"], "--nproc", "64 processes")
    expect_error(capsys, ["slurm", "--recipe", "dpo", "--time", "4h"], "--time", "HH:MM:SS")
    expect_error(capsys, ["merge-lora", str(tiny_path), "--out", str(tmp_path / "m")], "merge-lora",
                 "adapter_config.json")


def test_distributed_bad_inputs(capsys, tmp_path):
    expect_error(capsys, ["train", "--recipe", "dpo", "distributed.backend=deepspeed", "distributed.zero_stage=4"],
                 "distributed.zero_stage", "2 or 3")
    expect_error(capsys, ["train", "--recipe", "dpo", "distributed.offload_optimizer=true"], "backend: deepspeed")
    expect_error(capsys, ["train", "--recipe", "dpo", "distributed.backend=horovod"], "distributed.backend")
    expect_error(capsys, ["train", "--recipe", "xpo", "distributed.backend=fsdp", "train.max_steps=1",
                          f"output_dir={tmp_path}/o"], "distributed.backend", "samples from the reference model")
    expect_error(capsys, ["train", "--recipe", "ppo", "generation.gpu_memory_utilization=1.5"],
                 "generation.gpu_memory_utilization", "1")
    expect_error(capsys, ["train", "--recipe", "ppo", "generation.backend=vllm", "generation.vllm_mode=server"],
                 "server_base_url")
