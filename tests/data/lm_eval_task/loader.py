"""The data of the local lm-eval task reviews_mc.yaml: the JSONL file beside this file, read with datasets (no
network), as lm-eval's ``custom_dataset`` hook expects (a DatasetDict with the task's ``test_split``)."""

from pathlib import Path


def load(**kwargs):
    import datasets

    return datasets.load_dataset("json", data_files={"test": str(Path(__file__).with_name("reviews_mc.jsonl"))})
