"""The recipe schema: every key a recipe may hold, with its type, range and meaning.

A recipe names its ``algorithm`` and holds the sections that ``Recipe`` (at the end) lists. ``train`` and ``algo``
both end up in the algorithm's TRL config (``DPOConfig``, ``SFTConfig``, ...): ``train`` holds what every trainer
shares (optimizer, schedule, batch, logging), ``algo`` holds what makes the method what it is (``beta``,
``loss_type``, ...) and is validated by the algorithm's own ``AlgoConfig`` (in the module its registry entry names).
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    PrivateAttr,
    field_validator,
    model_validator,
)

from aligntool import registry
from aligntool.recipe.agent import AgentConfig
from aligntool.recipe.base import Strict, in_structural_pass
from aligntool.recipe.dataset import (  # noqa: F401 - the dataset section's classes, re-exported
    DATA_FORMATS,
    STREAMING_CHECK_ROWS,
    DatasetConfig,
    DataSourceFields,
    MixtureSource,
    ToyDataConfig,
)
from aligntool.recipe.optimizer import OPTIMIZERS, OptimizerConfig

# bitsandbytes class names accepted for train.optim, mapped to transformers' optimizer names
OPTIM_ALIASES = {"AdamW": "adamw_torch", "AdamW8bit": "adamw_8bit", "PagedAdamW8bit": "paged_adamw_8bit",
                 "Lion8bit": "lion_8bit", "PagedLion8bit": "paged_lion_8bit", "Lion": "lion_32bit"}


class ModelConfig(Strict):
    name_or_path: str = Field(
        "tiny", description="'tiny' (the built-in toy model), a local folder, or a hub id org/name (or a bare hub "
        "name such as gpt2, when no local folder has that name)."
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weights dtype; 'auto' keeps the checkpoint's own (float32 for the tiny model)."
    )
    trust_remote_code: bool = Field(False, description="Run modelling code shipped with a hub model. Off unless asked.")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) of a hub model.")
    attn_implementation: Literal["eager", "sdpa", "flash_attention_2", "flex_attention"] | None = Field(
        None, description="Attention kernel (transformers' attn_implementation); unset = transformers' choice (sdpa "
        "where the model supports it). flash_attention_2 needs a CUDA GPU and the flash-attn package.")
    chat_template: str | None = Field(
        None, description="Chat template for conversational data: a Jinja file (relative to the recipe's folder or "
        "the working directory) or a name: chatml, llama3, gemma, mistral, phi3, olmo2. Replaces the tokenizer's own; "
        "needed for conversational data on a model that has none. Saved with the trained model.")
    config: str | None = Field(
        None, description="The architecture when the weights are not here: a transformers config.json, or a folder "
        "holding one (relative to the recipe's folder, then the working directory). Read by `aligntool train "
        "--dry-run` instead of model.name_or_path's own config (examples/configs/ ships those of the examples' "
        "models); training reads the checkpoint's own config.")


class RefModelConfig(Strict):
    name_or_path: str | None = Field(
        None, description="Reference model for KL-regularised methods; defaults to a frozen copy of `model`."
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weights dtype of the reference; 'auto' keeps the checkpoint's own.")
    soup: list[str] | None = Field(
        None, min_length=2, description="SALSA: average these models' weights into the reference (Chegini et al. 2024)."
    )
    soup_weights: list[float] | None = Field(None, description="Weights of the soup (default: equal); sum to 1.")
    policy_from_soup: bool = Field(False, description="Also start the policy from the soup (SALSA's initialisation).")

    @model_validator(mode="after")
    def _soup(self):
        if self.soup and self.name_or_path:
            raise ValueError("set either name_or_path or soup, not both")
        if self.soup_weights is not None:
            if not self.soup or len(self.soup_weights) != len(self.soup):
                raise ValueError("soup_weights needs one weight per soup model")
            if abs(sum(self.soup_weights) - 1) > 1e-6 or min(self.soup_weights) < 0:
                raise ValueError(f"soup_weights must be non-negative and sum to 1, got {self.soup_weights}")
        if self.policy_from_soup and not self.soup:
            raise ValueError("policy_from_soup needs a soup")
        return self


class TrainConfig(BaseModel):
    """Shared trainer settings, passed to the algorithm's TRL config.

    The fields below are checked here; any other field of the algorithm's TRL config (``transformers.TrainingArguments``
    and the TRL additions) is also accepted and checked against that class when the run starts.
    """

    model_config = ConfigDict(extra="allow", validate_default=False, allow_inf_nan=False)

    learning_rate: PositiveFloat | Literal["auto"] | None = Field(
        None, description="Peak learning rate of the optimizer; 'auto' = Step Law's eta_opt(N, D) (Li et al. 2025) "
        "for this model's non-embedding parameters N and the run's training tokens D (`aligntool suggest` shows it; "
        "fitted on pretraining, an extrapolation for fine-tuning). The value used is written to recipe.yaml.")
    max_steps: PositiveInt | None = Field(None, description="Optimizer steps (online methods: iterations); wins over "
                                          "num_train_epochs when both are set (as in transformers; the log says so). "
                                          "-1 or null: unset, train by num_train_epochs.")
    num_train_epochs: PositiveFloat | None = Field(None, description="Passes over the training data.")
    per_device_train_batch_size: PositiveInt | Literal["auto"] | None = Field(
        None, description="Rows per step and process (online methods: prompts per iteration and process); 'auto' = "
        "Step Law's B_opt(D) tokens / mean tokens per row, shared over processes and accumulation steps.")
    step_law_constants: Literal["tool", "paper"] = Field(
        "tool", description="Constants of the 'auto' values: tool = the means of the authors' 1000 bootstrap fits "
        "(their fit_tool.py), paper = the rounded ones printed in the paper (1.79, -0.713, 0.307; 0.58, 0.571).")
    per_device_eval_batch_size: PositiveInt | None = Field(None, description="Rows per evaluation step and process.")
    gradient_accumulation_steps: PositiveInt | None = Field(
        None, description="Batches whose gradients are summed before each optimizer step.")
    max_length: PositiveInt | None = Field(None, description="Truncate prompt+completion to this many tokens.")
    seed: NonNegativeInt | None = Field(None, description="Seed of initialisation, data order and sampling.")
    logging_steps: PositiveInt | None = Field(None, description="Write a metrics.jsonl row every N steps.")
    save_steps: PositiveInt | None = Field(None, description="Write a checkpoint every N steps (under checkpoints/).")
    save_total_limit: PositiveInt | None = Field(None, description="Keep only the N newest checkpoints.")
    eval_steps: PositiveInt | None = Field(None, description="Evaluate every N steps (eval_strategy: steps).")
    eval_strategy: Literal["no", "steps", "epoch"] | None = Field(
        None, description="When to evaluate on the eval set; switched off (and said so) when there is none.")
    warmup_ratio: float | None = Field(None, ge=0, lt=1, description="Share of the steps spent warming the learning "
                                       "rate up (transformers 5 reads it as a fractional warmup_steps).")
    warmup_steps: NonNegativeInt | None = Field(None, description="Steps spent warming the learning rate up.")

    @field_validator("max_steps", mode="before")
    @classmethod
    def _unset_steps(cls, v):
        return None if v == -1 and not isinstance(v, bool) else v  # transformers' way to unset max_steps

    @model_validator(mode="after")
    def _one_warmup(self):
        if self.warmup_ratio is not None and self.warmup_steps is not None:
            raise ValueError("set warmup_ratio or warmup_steps, not both")
        return self
    lr_scheduler_type: str | None = Field(None, description="transformers scheduler: linear, cosine, constant, ...")
    weight_decay: NonNegativeFloat | None = Field(None, description="Decoupled weight decay of the optimizer.")
    max_grad_norm: NonNegativeFloat | None = Field(None, description="Clip the gradient norm to this value.")
    optim: str | None = Field(None, description="Optimizer: any transformers name (adamw_torch, adamw_8bit, "
                              "paged_adamw_8bit, lion_8bit, ...), AdamW8bit / PagedAdamW8bit / Lion8bit "
                              "(bitsandbytes), or aligntool's own lion_kappa / cosmos (settings: the optimizer "
                              "section).")
    bf16: bool | None = Field(None, description="bf16 mixed precision (on by default on a GPU that supports it).")
    fp16: bool | None = Field(None, description="fp16 mixed precision (CUDA GPUs only: refused on a CPU, where bf16 "
                              "works).")
    gradient_checkpointing: bool | None = Field(None, description="Recompute activations in backward: less memory, "
                                                "more time. Default: TRL's (on) on GPUs, off on CPUs; the online "
                                                "engine's methods (PPO, ReMax, ...): off unless true.")
    report_to: list[str] | str | None = Field(
        None, description="Loggers, for every method: tensorboard (always on), wandb, mlflow, trackio, comet_ml, "
        "swanlab, ... (a name, a list, 'all' = every installed one, 'none'). The TRL-based methods log through "
        "transformers' integrations, the online methods through accelerate's trackers, with the same metric names "
        "where they mean the same (docs/TRACKING.md). wandb and mlflow: pip install 'aligntool[trackers]'.")
    completions_steps: PositiveInt | None = Field(
        None, description="Every N steps (online methods: iterations), a sample of the completions the run drew "
        "(prompt, completion, reward; for pairs both sides and which won) is appended to completions.jsonl in "
        "output_dir and logged as a table where the tracker has tables (W&B). Default: logging_steps.")
    num_completions_to_log: PositiveInt = Field(
        8, description="Completions per sample of completions.jsonl (the first of the step's global batch).")

    # sharing (docs/SHARING.md): aligntool's own push, after the run; transformers' push_to_hub (which would upload
    # output_dir/checkpoints, the Trainer's folder) is never switched on: these keys stay out of the TRL config
    push_to_hub: bool | None = Field(
        None, description="After the run finishes with a loadable model, upload the final model (never checkpoints/) "
        "with a generated model card to train.hub_model_id, as `aligntool push` does (docs/SHARING.md). The token: "
        "HF_TOKEN or `hf auth login`, checked before training starts.")
    hub_model_id: str | None = Field(None, description="The Hub repository OWNER/NAME train.push_to_hub uploads to "
                                     "(created if missing).")
    hub_private_repo: bool | None = Field(None, description="train.push_to_hub: create the repository private (an "
                                          "existing one keeps its visibility).")
    hub_revision: str | None = Field(None, description="train.push_to_hub: the branch to upload to (created if "
                                     "missing); default main.")

    @model_validator(mode="after")
    def _push(self):
        if "hub_token" in (self.model_extra or {}):  # recipe.yaml records the recipe, and the push uploads it
            raise ValueError("hub_token: a token does not belong in a recipe (recipe.yaml records it, and a push "
                             "uploads it); set HF_TOKEN or run `hf auth login`")
        if self.push_to_hub and not self.hub_model_id:
            raise ValueError("push_to_hub needs hub_model_id: the Hub repository OWNER/NAME to upload to")
        if self.hub_model_id is not None and not re.fullmatch(r"[\w.-]+/[\w.-]+", self.hub_model_id):
            raise ValueError(f"hub_model_id {self.hub_model_id!r}: expected OWNER/NAME, e.g. my-org/qwen2.5-0.5b-dpo")
        return self

    @staticmethod
    def own_keys() -> set[str]:
        """aligntool's own keys, not passed to the TRL config."""
        return {"step_law_constants", "completions_steps", "num_completions_to_log", "push_to_hub", "hub_model_id",
                "hub_private_repo", "hub_revision"}

    @model_validator(mode="after")
    def _finite_extras(self):
        import math

        for name, value in (self.model_extra or {}).items():
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"{name}: {value} is not a finite number")
        return self

    @field_validator("optim")
    @classmethod
    def _optim(cls, v):
        if v is None or in_structural_pass():  # transformers' list of names: in the second, full pass
            return v
        from transformers.training_args import OptimizerNames

        if v in OPTIMIZERS:  # aligntool's own (aligntool/optim), built by it for every trainer
            return v
        v = OPTIM_ALIASES.get(v, v)
        names = [o.value for o in OptimizerNames]
        if v not in names:
            raise ValueError(f"unknown optimizer {v!r}; expected one of {', '.join((*OPTIM_ALIASES, *OPTIMIZERS))} "
                             f"or a transformers optimizer name such as adamw_torch, adamw_8bit, paged_adamw_8bit, sgd")
        if ("8bit" in v or "bnb" in v or v.startswith(("lion", "paged"))) and not _has("bitsandbytes"):
            raise ValueError(f"{v} needs bitsandbytes: bash scripts/install.sh --extras bitsandbytes")
        return v


class RewardTerm(Strict):
    """One weighted term of ``reward.functions``: a Python function or a score source (gold / a reward-model folder)."""

    function: str | None = Field(None, description="'module:function' called fn(prompts, completions, **columns) -> "
                                 "one float per completion (TRL's reward-function convention); through the Python "
                                 "API (aligntool.train) also a Python callable.")
    source: str | None = Field(None, description="'gold' or a reward-model folder, instead of a function.")
    weight: float = Field(1.0, description="Weight of this term in the sum.")

    @model_validator(mode="after")
    def _one(self):
        if (self.function is None) == (self.source is None):
            raise ValueError("each reward.functions entry sets exactly one of function or source")
        if self.function is not None and ":" not in self.function:
            raise ValueError(f"function {self.function!r}: expected 'module:function'")
        return self


class RewardConfig(Strict):
    """What scores sampled completions, for methods that sample their own data (see aligntool/rewards.py).

    ``source`` / ``judge`` may name Python code (``module:function``): a recipe from elsewhere can run code, like a
    script. The module is found in the recipe's own folder first, then the working directory, then the installed
    packages."""

    _base_dir: str | None = PrivateAttr(None)  # the recipe's folder, set by the loader

    @property
    def base_dir(self) -> str | None:
        return self._base_dir

    source: str = Field("gold", description="'gold' (toy gold reward), a reward-model folder, or 'module:function'.")
    ensemble: list[str] | None = Field(None, min_length=2, description="Reward-model folders to combine.")
    aggregate: Literal["mean", "wco", "uwo"] = Field(
        "mean", description="Ensemble objective (Coste et al. 2023): mean, wco = min over members, "
        "uwo = mean - uwo_lambda * variance over members."
    )
    uwo_lambda: float = Field(0.5, ge=0, description="lambda of UWO (authors: 0.5 for best-of-n, 0.1 for PPO).")
    uwo_ddof: Literal[0, 1] = Field(
        0, description="Variance estimator of UWO: 0 = population (authors' best-of-n code), "
        "1 = unbiased (their PPO code)."
    )
    batch_size: int = Field(64, gt=0, description="Completions per reward-model forward.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weights dtype of reward models ('auto' keeps the checkpoint's own); they run on the run's "
        "device (this process's GPU when there is one).")
    function: str | None = Field(
        None, description="A reward as code (verifiable rewards): 'module:function' called fn(prompts, completions, "
        "**columns) -> one float per completion, columns being the dataset's other columns as lists (TRL's reward-"
        "function convention); e.g. aligntool.toy.arith:reward. Through the Python API (aligntool.train) also a "
        "Python callable, recorded in recipe.yaml as module:function, or as '<callable module:qualname>' where no "
        "other process can import it (docs/API.md).")
    functions: list[RewardTerm] | None = Field(
        None, min_length=1, description="Several terms summed with weights: [{function: m:f, weight: 1.0}, "
        "{source: runs/reward, weight: 0.5}, ...] (functions and reward models mixed); through the Python API a "
        "callable alone stands for {function: it, weight: 1.0}.")
    judge: str | None = Field(
        None, description=f"Methods that compare two samples ({registry.listing(preferences=True)}): a pairwise "
        "judge 'module:function' fn(prompts, completions_a, completions_b) -> list of P(a > b) in [0, 1]; instead of a "
        "score.")
    bt_temperature: float = Field(
        0.0, ge=0, description="Pairwise use of a score source: P(a > b) = sigmoid((r_a - r_b)/T), the label drawn "
        "from it (Bradley-Terry noise); 0 = the higher score wins."
    )

    @model_validator(mode="after")
    def _one_source(self):
        chosen = [k for k, on in (("source", self.source != "gold"), ("ensemble", bool(self.ensemble)),
                                   ("function", self.function is not None), ("functions", self.functions is not None))
                  if on]
        if len(chosen) > 1:
            raise ValueError(f"set one of source, ensemble, function or functions, not {' and '.join(chosen)}")
        if self.function is not None and ":" not in self.function:
            raise ValueError(f"function {self.function!r}: expected 'module:function'")
        if self.judge and chosen:
            raise ValueError("set either judge or a score source (source / ensemble / function(s)), not both")
        if not self.ensemble and self.aggregate != "mean":
            raise ValueError("aggregate applies to an ensemble only")
        return self


class PeftConfig(Strict):
    """LoRA (Hu et al. 2021) through peft; with ``load_in_4bit`` the frozen base is loaded in 4 bits (QLoRA, Dettmers et
    al. 2023) through bitsandbytes, which needs a CUDA GPU. The reference of KL-regularised methods is then the base
    with the adapter disabled, not a second copy of the model."""

    r: int = Field(16, gt=0, description="LoRA rank.")
    lora_alpha: float = Field(32.0, gt=0, description="LoRA scaling numerator (scale = lora_alpha / r).")
    lora_dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the adapter's input (off in online methods "
                                "unless algo.disable_dropout is false).")
    target_modules: list[str] | str = Field(
        "all-linear", description="Module names (suffixes) to adapt, e.g. [q_proj, v_proj]; 'all-linear' = every "
        "linear layer but the output head.")
    load_in_4bit: bool = Field(False, description="QLoRA: load the base in 4 bits (CUDA + bitsandbytes).")
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type of the frozen base (QLoRA).")


class DistributedConfig(Strict):
    """How several processes share the work (``--nproc``/``--nnodes`` start them). aligntool writes the DeepSpeed and
    accelerate configs it derives from this section into the output folder (deepspeed.json, accelerate_config.yaml)."""

    backend: Literal["ddp", "deepspeed", "fsdp"] = Field(
        "ddp", description="ddp: a full replica per process; deepspeed: ZeRO sharding; fsdp: PyTorch FSDP sharding.")
    zero_stage: Literal[2, 3] = Field(2, description="DeepSpeed ZeRO stage: 2 shards optimizer state and gradients, "
                                      "3 also the parameters.")
    offload_optimizer: bool = Field(False, description="DeepSpeed: keep optimizer state in CPU memory.")
    offload_params: bool = Field(False, description="DeepSpeed ZeRO-3: keep parameters in CPU memory.")
    fsdp_sharding: Literal["full_shard", "shard_grad_op"] = Field(
        "full_shard", description="FSDP2: full_shard (parameters resharded after forward, like ZeRO-3) or "
        "shard_grad_op (kept gathered between forward and backward, like ZeRO-2).")

    @model_validator(mode="after")
    def _fits(self):
        if self.backend != "deepspeed" and (self.offload_optimizer or self.offload_params):
            raise ValueError("offload_optimizer / offload_params apply to backend: deepspeed")
        if self.offload_params and self.zero_stage != 3:
            raise ValueError("offload_params needs zero_stage: 3")
        return self


class GenerationConfig(Strict):
    """How the methods that sample generate their responses. ``backend: vllm`` applies to the methods whose registry
    entry names a ``vllm`` path (``AlgorithmSpec.vllm``): ``engine`` for the online methods (aligntool's rollout
    engine), ``trl`` for TRL trainers that sample (TRL's ``use_vllm`` fields); the others generate with transformers,
    and the recipe check names the methods of each path. The sampling settings (``algo.temperature``, ``top_p``,
    ``max_new_tokens``; stop at EOS and the chat template's end of turn) mean the same with either backend, and the
    log-probs the losses use are always recomputed by the training model: the backend changes the speed, not the
    math."""

    backend: Literal["hf", "vllm"] = Field(
        "hf", description="hf: transformers' generate on the training model. vllm: a vLLM engine through TRL's "
        "VLLMGeneration (install: scripts/install.sh --vllm), given the new weights after every optimizer step.")
    vllm_mode: Literal["colocate", "server"] = Field(
        "colocate", description="colocate: the vLLM engine lives in each training process (under ZeRO-3 / FSDP "
        "too) and shares its GPU. server: generation on separate GPUs served by `trl vllm-serve` at "
        "`server_base_url`.")
    gpu_memory_utilization: float = Field(
        0.3, gt=0, le=1, description="Colocate: the share of the GPU's memory the vLLM engine reserves (weights + "
        "KV cache); the rest is the trainer's. On a CPU: the share of RAM.")
    max_model_length: PositiveInt | None = Field(
        None, description="Longest prompt + response vLLM holds (default: the model's maximum).")
    server_base_url: str | None = Field(
        None, description="Server mode: the URL of `trl vllm-serve` (e.g. http://10.0.0.5:8000).")
    enforce_eager: bool | None = Field(
        None, description="vLLM without CUDA graphs / torch.compile: starts in seconds instead of minutes, generates "
        "slower. Default: on for CPUs, off for GPUs.")

    @model_validator(mode="after")
    def _server(self):
        if self.vllm_mode == "server" and self.backend == "vllm" and not self.server_base_url:
            raise ValueError("vllm_mode server needs server_base_url (the URL `trl vllm-serve` listens on)")
        return self


_MEMORY = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(GB|GiB|MB|MiB|TB|TiB)\s*$", re.IGNORECASE)
_UNIT = {"mb": 2**20, "mib": 2**20, "gb": 2**30, "gib": 2**30, "tb": 2**40, "tib": 2**40}


def parse_memory(text: str) -> int:
    """Bytes of a GPU memory size such as "80GB", "141GB", "79.6GiB", "24576MiB". GB means GiB (2**30 bytes), as GPU
    makers name their cards' memory (an "80GB" H100 or A100 has 80 GiB); ValueError for anything else."""
    match = _MEMORY.match(str(text))
    if not match or float(match.group(1)) <= 0:
        raise ValueError("expected a size such as 80GB, 141GB or 24576MiB")
    return int(float(match.group(1)) * _UNIT[match.group(2).lower()])


class HardwareConfig(Strict):
    """The machines a recipe is written for. Nothing here changes training: `aligntool train --dry-run` plans memory
    for them (world size = nodes x gpus_per_node, the verdict against gpu_memory), `aligntool slurm` takes its
    --nodes and --gpus-per-node defaults from them, and the reader learns what the recipe needs."""

    gpus_per_node: PositiveInt | None = Field(None, description="GPUs per node (= processes per node: --nproc).")
    nodes: PositiveInt = Field(1, description="Nodes (--nnodes; `aligntool slurm --nodes`).")
    gpu_memory: str | None = Field(
        None, description="Memory of one GPU, such as 80GB (H100, A100 80GB), 141GB (H200), 24GB; GB means GiB as GPU "
        "makers count. The dry run's verdict is against it unless --gpu-memory is given.")
    gpu: str | None = Field(None, description="The GPU's name, a note for the reader (H100 SXM, A100 80GB, ...).")

    @field_validator("gpu_memory")
    @classmethod
    def _memory(cls, v):
        if v is not None:
            parse_memory(v)
        return v


class Recipe(Strict):
    algorithm: str = Field(description="Registry name of the algorithm; `aligntool recipes` lists them.")
    description: str | None = Field(None, description="Free text, for the reader of the recipe.")
    model: ModelConfig = Field(default_factory=ModelConfig, description="The policy: the model trained.")
    ref_model: RefModelConfig | None = Field(None, description="The reference of KL-regularised methods (default: a "
                                             "frozen copy of the policy).")
    dataset: DatasetConfig = Field(default_factory=DatasetConfig, description="Training (and eval) data.")
    reward: RewardConfig | None = Field(None, description="Reward source of methods that sample (default: gold).")
    output_dir: str | None = Field(None, description="Where everything the run makes goes; default runs/<algorithm>.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="Trainer settings, passed to the algorithm's "
                               "TRL config.")
    optimizer: OptimizerConfig | None = Field(None, description="Settings of aligntool's own optimizers, "
                                              "train.optim: lion_kappa | cosmos (aligntool/optim).")
    peft: PeftConfig | None = Field(None, description="LoRA / QLoRA adapters instead of full fine-tuning.")
    distributed: DistributedConfig = Field(default_factory=DistributedConfig, description="How several processes share "
                                           "the work.")
    generation: GenerationConfig = Field(default_factory=GenerationConfig, description="How the methods that "
                                         "sample generate: transformers or vLLM.")
    algo: dict = Field(default_factory=dict, description="Algorithm-specific settings, checked by its AlgoConfig.")
    hardware: HardwareConfig | None = Field(None, description="The machines the recipe is written for (read by the "
                                            "dry run and `aligntool slurm`; training does not change with it).")
    agent: AgentConfig | None = Field(None, description="Multi-turn, tool-using episodes (tools, an environment, "
                                      "turn and token limits) for the methods that support them: "
                                      f"{registry.listing(lambda s: s.agent is not None)} (docs/AGENTS.md).")

    @field_validator("optimizer")
    @classmethod
    def _optimizer_needs_ours(cls, v, info):
        optim = getattr(info.data.get("train"), "optim", None)
        if v is not None and optim not in OPTIMIZERS:
            raise ValueError(f"this section sets aligntool's own optimizers; it needs train.optim: "
                             f"{' or '.join(OPTIMIZERS)} (train.optim is {optim or 'unset: adamw_torch'})")
        return v

    def trl_kwargs(self, algo_config: BaseModel) -> dict:
        """The keyword arguments for the algorithm's TRL config: set ``train.*`` keys plus every ``algo.*`` key (our
        own optimizers' names stay out: aligntool builds them, the TRL config keeps its default ``optim``)."""
        train = self.train.model_dump(exclude_none=True, exclude=TrainConfig.own_keys())  # aligntool's own
        if train.get("optim") in OPTIMIZERS:
            del train["optim"]
        if "warmup_ratio" in train:  # transformers 5 dropped warmup_ratio: a float warmup_steps < 1 is the ratio
            train["warmup_steps"] = float(train.pop("warmup_ratio"))
        return {**train, **algo_config.trl_kwargs()}


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None
