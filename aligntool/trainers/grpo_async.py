"""GRPO with ``generation.asynchronous: true``: TRL's experimental AsyncGRPOTrainer (trl.experimental.async_grpo).

TRL's asynchronous GRPO decouples generation from training: a rollout worker keeps a separate vLLM server
(``vllm serve <model> --weight-transfer-config '{"backend": "nccl"}'``) generating while the trainer trains, samples
up to ``max_staleness`` weight versions old are used (older ones dropped), and the trainer streams its new weights to
the server over NCCL every ``weight_sync_steps`` steps. It needs CUDA (NCCL, the tree-attention kernels) and that
server: aligntool refuses it in one line otherwise, before any model loads.

The recipe maps as for GRPO (aligntool.trainers.grpo): ``train.*`` and the ``algo.*`` keys TRL's AsyncGRPOConfig
has; ``generation.server_base_url`` -> ``vllm_server_base_url``. GRPO keys the asynchronous trainer does not have
(beta, loss_type, num_iterations, ...) are refused where the recipe sets them to other than their defaults; its own
keys (max_staleness, weight_sync_steps, max_inflight_tasks, ...) keep TRL's defaults (``train.*`` takes GRPOConfig's
fields). Its rewards take no weights: one reward term, or several of weight 1. No eval set (TRL's trainer takes none).
"""

from __future__ import annotations

from aligntool.errors import UserError

SERVER = "`vllm serve <model> --weight-transfer-config '{\"backend\": \"nccl\"}'`"


def check(run) -> None:
    """One line where TRL's AsyncGRPOTrainer cannot run: GRPO settings it lacks, no server URL, no CUDA, no vLLM."""
    at, g = run.loaded.source, run.recipe.generation
    fields = config_class().__dataclass_fields__
    defaults = type(run.algo).model_fields
    for key in run.algo.trl_fields:
        if key not in fields and getattr(run.algo, key) != defaults[key].default:
            raise UserError(f"{at}: algo.{key}: TRL's AsyncGRPOTrainer (generation.asynchronous: true) has no {key}; "
                            "remove it, or set generation.asynchronous: false")
    if g.backend != "vllm" or g.vllm_mode != "server" or not g.server_base_url:
        raise UserError(f"{at}: generation.asynchronous: grpo generates asynchronously through TRL's AsyncGRPOTrainer, "
                        f"which needs a vLLM server: set generation.backend: vllm, vllm_mode: server and "
                        f"server_base_url (the URL of {SERVER})")
    if not cuda():
        raise UserError(f"{at}: generation.asynchronous: TRL's AsyncGRPOTrainer needs CUDA GPUs (NCCL weight transfer "
                        "to the vLLM server, tree-attention kernels); none here: use generation.asynchronous: false")
    from aligntool.online.vllm_backend import check_installed

    check_installed()


def cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def config_class():
    from trl.experimental.async_grpo import AsyncGRPOConfig

    return AsyncGRPOConfig


def config_kwargs(run, terms) -> dict:
    """AsyncGRPOConfig's keyword arguments: ``train.*`` + the ``algo.*`` keys it has + the server's URL."""
    fields = config_class().__dataclass_fields__
    if any(w != 1 for _, _, w in terms):
        raise UserError(f"{run.loaded.source}: reward: TRL's AsyncGRPOTrainer takes no reward weights; give each term "
                        "weight 1 (or set generation.asynchronous: false)")
    kwargs = {k: v for k, v in run.recipe.trl_kwargs(run.algo).items() if k in fields}
    m = run.recipe.model
    kwargs.update(output_dir=str(run.output_dir / "checkpoints"), vllm_server_base_url=run.recipe.generation.
                  server_base_url, trust_remote_code=m.trust_remote_code, logging_nan_inf_filter=False)
    if m.revision is not None:
        kwargs["model_init_kwargs"] = {"revision": m.revision}
    return kwargs


def build(run, reward_terms):
    """TRL's AsyncGRPOTrainer on the run's model folder (it loads the model itself), rewards (``reward_terms(run)``:
    aligntool.trainers.grpo's), data and LoRA config."""
    from trl.experimental.async_grpo import AsyncGRPOTrainer

    from aligntool.errors import first_line

    check(run)
    terms = reward_terms(run)
    try:
        config = config_class()(**config_kwargs(run, terms))
        return AsyncGRPOTrainer(model=str(run.model_path), reward_funcs=[fn for _, fn, _ in terms], args=config,
                                train_dataset=run.train_dataset, processing_class=run.tokenizer,
                                peft_config=run.peft_config())
    except ValueError as exc:  # TRL's checks of combined settings
        raise UserError(f"{run.loaded.source}: train/algo: {first_line(exc)}") from None
