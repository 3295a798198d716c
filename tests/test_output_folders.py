"""Every command that writes a folder (soup, merge-lora, unpack, compress, as train) refuses an output that already
holds something unless --overwrite; compress measures the model it compressed (an adapter folder: its merged base);
a soup of LoRA adapters is the average of the merged models; eval of a packed folder points to `aligntool unpack`."""

import json
from pathlib import Path

import pytest
import torch
from conftest import expect_error, ok

SMALL = ["calibration.seq_len=32", "calibration.num_sequences=16", "calibration.heldout_sequences=4",
         "compress.method=uniform", "compress.group_size=64"]


def a_run(folder):
    """A training run's folder (what `aligntool train` leaves), with a stamp to see that it was left alone."""
    (folder / "checkpoints" / "checkpoint-2").mkdir(parents=True)
    (folder / "summary.json").write_text('{"global_step": 2}')
    (folder / "metrics.jsonl").write_text('{"step": 1}\n')
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}


def adapter(tiny_path, folder, seed):
    """A LoRA adapter of the tiny model with non-zero B (as after training), saved as a peft run saves it."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_path),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_path).save_pretrained(folder)
    return folder


def test_soup_merge_lora_and_unpack_leave_an_existing_run_alone_without_overwrite(capsys, tmp_path, tiny_path):
    run = tmp_path / "run"
    stamp = a_run(run)
    expect_error(capsys, ["soup", "tiny", str(tiny_path), "--out", str(run)], "--out", str(run),
                 "already holds a finished run", "--overwrite")
    lora = adapter(tiny_path, tmp_path / "lora", 0)
    capsys.readouterr()
    expect_error(capsys, ["merge-lora", str(lora), "--out", str(run)], "already holds a finished run")
    packed = tmp_path / "packed"  # unpack checks the output before it reads anything
    expect_error(capsys, ["unpack", str(packed), "--out", str(run)], "already holds a finished run")
    assert {p.name: p.stat().st_mtime_ns for p in run.iterdir()} == stamp
    # a model folder written earlier by the same command is refused too; --overwrite replaces it in one rename
    ok(capsys, ["merge-lora", str(lora), "--out", str(tmp_path / "merged")])
    expect_error(capsys, ["merge-lora", str(lora), "--out", str(tmp_path / "merged")], "already holds a model")
    ok(capsys, ["merge-lora", str(lora), "--out", str(tmp_path / "merged"), "--overwrite"])
    ok(capsys, ["soup", "tiny", str(tiny_path), "--out", str(run), "--overwrite"])
    assert not (run / "summary.json").exists() and (run / "soup.json").is_file()
    assert not list(tmp_path.glob(".*tmp-*"))


def test_a_soup_of_lora_adapters_is_the_average_of_the_merged_models(capsys, tmp_path, tiny_path):
    from safetensors.torch import load_file

    from aligntool.models import merged_adapter

    a, b = adapter(tiny_path, tmp_path / "a", 1), adapter(tiny_path, tmp_path / "b", 2)
    ok(capsys, ["soup", str(a), str(b), "--out", str(tmp_path / "soup"), "--weight", "0.25", "--weight", "0.75"])
    got = load_file(tmp_path / "soup" / "model.safetensors")
    ma, mb = merged_adapter(str(a)).state_dict(), merged_adapter(str(b)).state_dict()
    key = "model.layers.0.self_attn.q_proj.weight"
    assert not ma[key].equal(mb[key])
    assert set(ma) - set(got) <= {"lm_head.weight"}, set(ma) - set(got)  # only a tied head may be left out
    for k, v in got.items():
        torch.testing.assert_close(v, 0.25 * ma[k] + 0.75 * mb[k], rtol=1e-5, atol=1e-6)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    AutoModelForCausalLM.from_pretrained(tmp_path / "soup")
    AutoTokenizer.from_pretrained(tmp_path / "soup")


@pytest.mark.slow
def test_compress_of_an_adapter_measures_the_merged_model_and_asks_before_rewriting(capsys, tmp_path, tiny_path):
    lora = adapter(tiny_path, tmp_path / "lora", 0)
    capsys.readouterr()
    out = tmp_path / "c"
    args = ["compress", "--recipe", "compress_quant", f"model.name_or_path={lora}", f"output_dir={out}", *SMALL]
    err = ok(capsys, args)
    report = json.loads((out / "compression_report.json").read_text())
    b = report["bytes"]
    adapter_file = (lora / "adapter_model.safetensors").stat().st_size
    model_file = (tiny_path / "model.safetensors").stat().st_size
    # the dense size is the merged model's tensors (the tiny model's file less its header), not the adapter's file
    assert b["model_dense"] > 5 * adapter_file
    assert 0.98 * model_file < b["model_dense"] <= model_file
    assert b["packed"] < b["model_dense"] and b["ratio"] == round(b["packed"] / b["model_dense"], 4)
    assert f"model {b['model_dense']} -> {b['packed']} bytes packed" in err
    # its own earlier output is not rewritten without asking
    stamp = (out / "compression_report.json").stat().st_mtime_ns
    expect_error(capsys, args, "output_dir", "already holds a compress output", "--overwrite")
    assert (out / "compression_report.json").stat().st_mtime_ns == stamp
    ok(capsys, [*args, "--overwrite"])
    assert (out / "compression_report.json").stat().st_mtime_ns != stamp
    # eval of the packed form points to unpack
    expect_error(capsys, ["eval", "--model", str(out / "packed")], "packed compressed model", "aligntool unpack",
                 f"compress output {out} itself")
    # unpack into an existing folder: refused, then replaced with --overwrite
    ok(capsys, ["unpack", str(out / "packed"), "--out", str(tmp_path / "u")])
    expect_error(capsys, ["unpack", str(out / "packed"), "--out", str(tmp_path / "u")], "already holds a model")
    ok(capsys, ["unpack", str(out / "packed"), "--out", str(tmp_path / "u"), "--overwrite"])


@pytest.mark.slow
def test_train_refuses_a_folder_that_holds_a_model_and_overwrite_replaces_the_whole_model(capsys, tmp_path, tiny_path):
    """A LoRA run into a model folder would put its adapter beside the old weights, and every loader would read the
    old model: refused without --overwrite; with it, the old weights go. The folder a run starts from is never its
    output."""
    import shutil

    from aligntool.models import is_adapter

    out = tmp_path / "model"
    shutil.copytree(tiny_path, out)
    args = ["train", "--recipe", "sft", "peft.r=4", "train.max_steps=1", "dataset.toy.size=8", f"output_dir={out}"]
    expect_error(capsys, args, f"output_dir: {out} already holds a model", "--overwrite")
    assert (out / "model.safetensors").read_bytes() == (tiny_path / "model.safetensors").read_bytes()
    ok(capsys, [*args, "--overwrite"])
    assert is_adapter(str(out)) and not (out / "model.safetensors").exists()
    source = ["train", "--recipe", "sft", "train.max_steps=1", f"model.name_or_path={out}", f"output_dir={out}"]
    expect_error(capsys, [*source, "--overwrite"], "is the model this run starts from")
    assert is_adapter(str(out))


def test_merge_lora_does_not_report_a_model_it_did_not_write(capsys, tmp_path, tiny_path, monkeypatch):
    """The rule of train's "Done" holds for every command that writes a model (merge-lora, unpack, soup, compress
    call the same check): a save that left no loadable weights ends in one line, not in the folder's path printed
    as a result."""
    from transformers import PreTrainedModel

    lora = adapter(tiny_path, tmp_path / "lora", 0)
    capsys.readouterr()
    real = PreTrainedModel.save_pretrained

    def config_only(self, folder, *args, **kwargs):  # a save cut after the config (a full disk, a failed gather)
        real(self, folder, *args, **kwargs)
        for weights in Path(folder).glob("*.safetensors"):
            weights.unlink()

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", config_only)
    from aligntool.cli import main

    assert main(["merge-lora", str(lora), "--out", str(tmp_path / "merged")]) == 2
    captured = capsys.readouterr()
    last = captured.err.strip().splitlines()[-1]  # after transformers' loading bar: the work was done, then checked
    assert last.startswith("aligntool: error: --out: ") and "merged but its model is not loadable" in last, last
    assert "no model.safetensors" in last and str(tmp_path / "merged") not in captured.out  # no path as a result
