"""The rollout engine's checkpoints (``Checkpoints``): ``checkpoints/checkpoint-N`` is the policy as a loadable model
folder, the critic (``value_head.safetensors``), the optimizer, scheduler and RNG states and the engine state, marked
COMPLETE last (aligntool.outputs.mark_complete). Under DeepSpeed / FSDP every process writes its shard of the
training state into ``training_state/`` (accelerate's ``save_state``)."""

from __future__ import annotations

import json
import pickle
import random
import shutil
from pathlib import Path

import torch

from aligntool.errors import UserError, first_line


class Checkpoints:
    """Save and load (a part of aligntool.online.engine.Engine). They read what the set-up made
    (aligntool.online.setup.EngineSetup): ``accelerator``, ``model``, ``optimizer``, ``scheduler``, ``tokenizer``,
    ``zero3`` / ``fsdp``, ``args.save_total_limit``, ``out``, and the loop's ``state``."""

    def _checkpoint_dir(self) -> Path:
        return self.out / "checkpoints"

    def _sharded_state(self) -> bool:
        """Whether the training state is saved by accelerate, one shard per process (DeepSpeed, any stage, or FSDP)."""
        return self.zero3 or self.fsdp or self.accelerator.state.deepspeed_plugin is not None

    def _whole_state(self) -> tuple[dict | None, dict | None]:
        """(policy LM state dict, critic state) as whole tensors on the main process (None elsewhere): gathered
        from the shards under ZeRO-3 / FSDP (a collective: every process calls it), the module's own otherwise."""
        if not (self.zero3 or self.fsdp):
            model = self.accelerator.unwrap_model(self.model)
            return None, (model.value_state() if model.value_head is not None else None)
        full = self.accelerator.get_state_dict(self.model)
        if not self.accelerator.is_main_process:
            return None, None
        lm = {k[len("lm."):]: v for k, v in full.items() if k.startswith("lm.")}
        rest = {k: v.detach().contiguous().clone() for k, v in full.items() if not k.startswith("lm.")}
        return lm, rest or None

    def _save_model(self, folder: Path, lm_state: dict | None) -> None:
        """The policy as a loadable model folder (weights, config, tokenizer): main process only."""
        self.policy_lm.save_pretrained(folder, safe_serialization=True, state_dict=lm_state)
        self.tokenizer.save_pretrained(folder)

    def save_checkpoint(self) -> Path:
        """checkpoints/checkpoint-N: the policy as a loadable model folder, the critic, optimizer, scheduler and RNG
        states, the engine state; written under a temporary name and renamed once complete (then COMPLETE).
        Under ZeRO-3 / FSDP every process writes its shard of the training state (accelerate's ``save_state``:
        DeepSpeed's or FSDP's own sharded checkpoint) into ``training_state/``."""
        final = self._checkpoint_dir() / f"checkpoint-{self.state['iteration']}"
        sharded = self._sharded_state()
        if not sharded and not all(bool(torch.isfinite(p).all()) for p in self.model.parameters()):
            from aligntool.outputs import latest_checkpoint  # replicas agree: every process raises alike

            last = latest_checkpoint(self._checkpoint_dir(), log=lambda m: None)
            raise UserError(f"training diverged (non-finite weights) at iteration {self.state['iteration']}; last "
                            f"checkpoint kept: {last or 'none'}")
        lm_state, critic = self._whole_state()
        tmp = final.with_name(f".{final.name}.partial")
        if sharded:  # every process writes into one agreed temporary folder, then the main process renames it
            if self.accelerator.is_main_process:
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)
            self.accelerator.wait_for_everyone()
            self.accelerator.save_state(str(tmp / "training_state"))
            self.accelerator.wait_for_everyone()  # every process's files (its RNG state last) are written
        if self.accelerator.is_main_process:
            self._write_checkpoint(final, tmp if sharded else None, lm_state, critic)
        self.accelerator.wait_for_everyone()
        return final

    def _write_checkpoint(self, final: Path, shards: Path | None, lm_state: dict | None,
                          critic: dict | None) -> None:
        """Main process: the checkpoint folder (around ``shards``, the processes' training state, if sharded) under
        a temporary name, renamed to ``final`` once COMPLETE; then the oldest beyond ``save_total_limit`` removed."""
        from aligntool.outputs import atomic_path, complete_checkpoints, mark_complete

        final.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(final) as target:
            if shards is not None:
                shards.rename(target)
            else:
                target.mkdir()
            self._save_model(target, lm_state)  # a checkpoint is a loadable model folder (aligntool eval)
            if critic is not None:
                from safetensors.torch import save_file

                save_file(critic, str(target / "value_head.safetensors"))
            if shards is None:
                torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                            "rng": torch.get_rng_state(), "py_rng": random.getstate()}, target / "optimizer.pt")
            (target / "state.json").write_text(json.dumps(self.state))
            mark_complete(target, self.state["iteration"])
        limit = self.args.save_total_limit
        if limit:
            for old in complete_checkpoints(self._checkpoint_dir())[limit:]:
                shutil.rmtree(old, ignore_errors=True)

    def load_checkpoint(self, path: Path) -> None:
        """Restore a checkpoint of the same backend: the sharded training state through accelerate, or the policy
        (or its adapter), the critic, optimizer, scheduler and RNG states; then the engine state."""
        if (path / "training_state").is_dir():  # a ZeRO / FSDP checkpoint: model, critic, optimizer, scheduler, RNG
            if not self._sharded_state():
                raise UserError(f"{path}: written by a DeepSpeed / FSDP run; resume it with the same "
                                f"distributed.backend")
            self.accelerator.load_state(str(path / "training_state"))
        elif self._sharded_state():
            raise UserError(f"{path}: written by a ddp run; resume it with distributed.backend: ddp")
        else:
            self._load_whole(path)
        self.state = json.loads((path / "state.json").read_text())

    def _load_whole(self, path: Path) -> None:
        """A ddp checkpoint: the policy (or only its LoRA adapter), the critic, then the optimizer, scheduler and RNG
        states of optimizer.pt (tensors and containers only)."""
        from safetensors.torch import load_file

        model = self.accelerator.unwrap_model(self.model)
        if (path / "adapter_model.safetensors").is_file():  # a LoRA policy: only the adapter was saved
            from peft import set_peft_model_state_dict

            set_peft_model_state_dict(model.lm, load_file(str(path / "adapter_model.safetensors")))
        else:
            model.lm.load_state_dict(load_file(str(path / "model.safetensors")), strict=False)
        if model.value_head is not None and (path / "value_head.safetensors").is_file():
            result = model.load_state_dict(load_file(str(path / "value_head.safetensors")), strict=False)
            if result.unexpected_keys or any(not k.startswith("lm.") for k in result.missing_keys):
                raise UserError(f"{path / 'value_head.safetensors'}: does not match the critic of this recipe "
                                f"(algo.critic); unexpected {result.unexpected_keys[:3]}, missing "
                                f"{[k for k in result.missing_keys if not k.startswith('lm.')][:3]}")
        try:  # tensors, numbers, lists and dicts only: a checkpoint from elsewhere cannot run code when loaded
            state = torch.load(path / "optimizer.pt", weights_only=True)
        except pickle.UnpicklingError as exc:
            raise UserError(f"{path / 'optimizer.pt'}: refused: it holds objects other than tensors, numbers and "
                            f"containers ({first_line(exc)[:120]}); it is not an aligntool checkpoint") from None
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        random.setstate(state["py_rng"])
