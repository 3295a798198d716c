"""Reference log-probs once: TRL's ``precompute_ref_log_probs`` scores the data with the reference in one pass before
training; this mixin also keeps the result in ``<output_dir>/ref_logps/<split>-<fingerprint>.parquet`` so a rerun,
a resume or another method on the same data and reference skips the pass. The fingerprint is TRL's own: the
tokenised dataset's content hash and a hash of the reference weights, so a changed reference or dataset never
reuses stale values."""

from __future__ import annotations

from pathlib import Path


class RefLogpsCache:
    """Mixin for DPOTrainer subclasses; the cache folder is beside the run's checkpoints folder."""

    def _precompute_ref_logps(self, dataset, name, batch_size):
        from datasets import Dataset, concatenate_datasets
        from datasets.fingerprint import Hasher

        fingerprint = Hasher.hash((dataset._fingerprint, self._precompute_model_hash))
        path = Path(self.args.output_dir).parent / "ref_logps" / f"{name}-{fingerprint}.parquet"
        if path.is_file():
            cached = Dataset.from_parquet(str(path))
            if len(cached) == len(dataset):
                return concatenate_datasets([dataset, cached], axis=1)
        if self.accelerator.num_processes > 1:
            # TRL's pass shares a datasets cache file between ranks, which an in-memory dataset (toy data, pipeline
            # stages) does not have on the other ranks: each rank scores every row itself instead.
            chosen, rejected = self.logps_pass(dataset, self.ref_model or self.model, batch_size)
            out = dataset.add_column("ref_chosen_logps", chosen).add_column("ref_rejected_logps", rejected)
        else:
            out = super()._precompute_ref_logps(dataset, name, batch_size)
        if self.accelerator.is_main_process:
            from aligntool.outputs import atomic_path

            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(path) as tmp:
                out.select_columns(["ref_chosen_logps", "ref_rejected_logps"]).to_parquet(str(tmp))
        return out

    def logps_pass(self, dataset, model, batch_size: int) -> tuple[list[float], list[float]]:
        """Sequence log-probs of every row's chosen and rejected completion under ``model``, through TRL's own
        collator and ``compute_ref_log_probs`` (the same tokens and masking as training), on this process alone."""
        import torch
        from torch.utils.data import DataLoader

        collator = getattr(self.data_collator, "inner", self.data_collator)
        chosen, rejected = [], []
        for batch in DataLoader(dataset, batch_size=batch_size, collate_fn=collator, shuffle=False):
            batch = {k: v.to(self.accelerator.device) if torch.is_tensor(v) else v for k, v in batch.items()}
            c, r = self.compute_ref_log_probs(model, batch)
            chosen += c.float().tolist()
            rejected += r.float().tolist()
        return chosen, rejected

