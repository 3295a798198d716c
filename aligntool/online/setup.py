"""The rollout engine's set-up, in named steps (``EngineSetup.setup``): the accelerator, the policy (and its value
head or separate critic), the reference, the optimizer and scheduler, the distributed wrapping, the generation
backend, the reward source, the prompts and the logs.

The recipe's ``distributed`` backend decides how the policy is held: ``ddp`` (a replica per process), ``deepspeed``
(ZeRO-2 / ZeRO-3, through accelerate's DeepSpeed integration; under ZeRO-3 the policy, the critic and the reference
are built and kept partitioned, and gathered for generation only, by TRL's ``unwrap_model_for_generation``) or
``fsdp`` (PyTorch FSDP2; the frozen reference by TRL's ``prepare_fsdp``).
"""

from __future__ import annotations

import torch
from torch import nn

from aligntool.errors import UserError


class PolicyWithValue(nn.Module):
    """A causal LM plus an optional scalar value head, as one module so DDP syncs both. The head reads the policy's
    own last hidden state (``critic="shared"``, trlx style) or that of a separate critic LM initialised as a copy of
    the policy (``critic="separate"``, InstructGPT / OpenRLHF style: twice the weights, no policy-value
    interference)."""

    def __init__(self, lm, value_head: bool, critic_lm=None):
        super().__init__()
        self.lm = lm
        self.critic_lm = critic_lm if value_head else None
        # FSDP wraps the decoder blocks of the LM (and of the critic) one by one, as it would the LM alone
        self._no_split_modules = list(getattr(lm, "_no_split_modules", None) or [])
        self.value_head = nn.Linear(lm.config.hidden_size, 1) if value_head else None
        if self.value_head is not None:
            nn.init.zeros_(self.value_head.weight)
            nn.init.zeros_(self.value_head.bias)

    def forward(self, input_ids, attention_mask, position_ids, logits_to_keep: int = 0):
        """(logits of the last ``logits_to_keep`` positions (0: all), values of every position or None)."""
        shared = self.value_head is not None and self.critic_lm is None
        out = self.lm(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                      output_hidden_states=shared, use_cache=False, logits_to_keep=logits_to_keep)
        values = None
        if self.value_head is not None:
            hidden = out.hidden_states[-1] if shared else self.critic_lm(
                input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                output_hidden_states=True, use_cache=False).hidden_states[-1]
            values = self.value_head(hidden.to(self.value_head.weight.dtype)).float().squeeze(-1)
        return out.logits, values

    @property
    def is_gradient_checkpointing(self) -> bool:  # read by TRL's unwrap_model_for_generation
        return bool(getattr(self.lm, "is_gradient_checkpointing", False))

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None):
        self.lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gradient_checkpointing_kwargs)

    def gradient_checkpointing_disable(self):
        self.lm.gradient_checkpointing_disable()

    def value_state(self) -> dict:
        """Everything of the critic that is not the policy (saved beside the policy in checkpoints)."""
        state = {f"value_head.{k}": v for k, v in self.value_head.state_dict().items()}
        if self.critic_lm is not None:
            state.update({f"critic_lm.{k}": v for k, v in self.critic_lm.state_dict().items()})
        return {k: v.detach().contiguous().clone() for k, v in state.items()}


def accelerator_for(args, logging_dir=None):
    """The run's Accelerator, made as transformers' Trainer makes its own from the same TrainingArguments: precision,
    the DeepSpeed plugin of their DeepSpeed config, the FSDP plugin of their FSDP keywords; the trackers of their
    ``report_to`` but TensorBoard (aligntool.online.tracking), their files under ``logging_dir``. On a multi-process
    CPU run with DeepSpeed or FSDP the process state that aligntool.launch.distributed.setup configured is reused."""
    from accelerate import Accelerator

    from aligntool.online.tracking import tracker_names

    kwargs = {"mixed_precision": args.mixed_precision, "deepspeed_plugin": args.deepspeed_plugin}
    if trackers := tracker_names(args.report_to):
        from accelerate.utils import ProjectConfiguration

        kwargs["log_with"] = trackers
        kwargs["project_config"] = ProjectConfiguration(project_dir=str(logging_dir), logging_dir=str(logging_dir))
    if args.fsdp_plugin_args is not None:
        from accelerate.utils import FullyShardedDataParallelPlugin

        kwargs["fsdp_plugin"] = FullyShardedDataParallelPlugin(**args.fsdp_plugin_args)
    elif args.deepspeed_plugin is None and not torch.cuda.is_available():
        kwargs["cpu"] = True
    return Accelerator(**kwargs)


class EngineSetup:
    """The set-up part of aligntool.online.engine.Engine: ``setup()`` runs the steps below in this order (the order
    is part of the numbers: the value head's initialisation draws from the seeded torch stream). It reads ``run``,
    ``method`` (its capabilities: aligntool.online.contract.OnlineMethod) and ``cfg`` (the recipe's ``algo``)."""

    def setup(self) -> None:
        self._setup_accelerator()
        self._setup_model()
        self._setup_reference()
        self._setup_iterations()  # the loop's length (aligntool.online.engine.Engine)
        self._setup_optimizer()
        self._setup_distributed()
        self._setup_generation()
        self._setup_rewards()
        self._setup_data()
        self._setup_logging()
        self._setup_eval()  # aligntool.online.tracking.Tracking

    def _setup_accelerator(self) -> None:
        """The backend (``zero3`` / ``fsdp``), refused for a method that samples from the partitioned reference; the
        TrainingArguments (``args``: lr, max_steps = iterations, batch, seed, ...) and their Accelerator."""
        run, d = self.run, self.run.recipe.distributed
        self.zero3 = d.backend == "deepspeed" and d.zero_stage == 3
        self.fsdp = d.backend == "fsdp"
        if self.method.samples_from_reference and (self.zero3 or self.fsdp):
            raise UserError(f"distributed.backend: {run.loaded.spec.name} samples from the reference model, which "
                            f"ZeRO-3 and FSDP keep partitioned; use distributed.backend ddp, or deepspeed with "
                            f"zero_stage 2")
        self.args = run.trl_config()  # transformers.TrainingArguments: lr, max_steps (= iterations), batch, seed, ...
        self.accelerator = accelerator_for(self.args, run.output_dir)
        if self.fsdp:  # checkpoints: each process writes its own shards (torch.distributed.checkpoint)
            plugin = self.accelerator.state.fsdp_plugin
            plugin.state_dict_config = plugin.optim_state_dict_config = None  # else the full-state config stays
            plugin.set_state_dict_type("SHARDED_STATE_DICT")
        self.rank, self.world = self.accelerator.process_index, self.accelerator.num_processes
        self.tokenizer = run.tokenizer

    def _setup_model(self) -> None:
        """``model``: the policy (LoRA-wrapped when the recipe has ``peft``) with the method's value head, on the
        policy's backbone or on a separate critic copy (built sharded under ZeRO-3 too)."""
        run, value_head = self.run, self.method.value_head
        lm, lora = run.policy(), run.peft_config()
        critic_lm = None
        if value_head and self.method.critic == "separate":
            if lora is not None:
                raise UserError("algo.critic: a separate critic is not supported with LoRA; use critic: shared")
            critic_lm = run.policy()  # a second copy of the initial policy (built sharded under ZeRO-3 too)
        if lora is not None:
            from peft import get_peft_model

            lm = get_peft_model(lm, lora)
        self.lora = lora is not None
        if run.recipe.train.gradient_checkpointing:  # in the update (generation runs in eval mode)
            for model in filter(None, (lm, critic_lm)):
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        torch.manual_seed(self.args.seed + self.rank)
        self.model = PolicyWithValue(lm, value_head, critic_lm)
        if self.zero3 and value_head:  # ZeRO-3 partitions all trainable weights in one dtype: the LM's (bf16 runs)
            self.model.value_head.to(next(lm.parameters()).dtype)

    def _setup_reference(self) -> None:
        """``ref``: the frozen reference (the recipe's, or the initial policy); None with LoRA and no explicit
        reference, where the reference is the policy with its adapter disabled (no second copy). Dropout off in
        both unless ``algo.disable_dropout`` is false."""
        from aligntool import models

        run = self.run
        explicit = run.reference()
        self.ref = None if self.lora and explicit is None else (explicit or models.load_model(
            run.model_path, **models.options(run.recipe.model, revision=True))).eval()
        if self.ref is not None:
            self.ref.requires_grad_(False)
        if self.cfg.disable_dropout:
            models.disable_dropout(self.model)
            if self.ref is not None:
                models.disable_dropout(self.ref)

    def _setup_optimizer(self) -> None:
        """The optimizer ``train.optim`` names (AdamW, bitsandbytes 8-bit, Lion, ...; lion_kappa | cosmos: aligntool's
        own, aligntool/optim), built as the Trainer builds it; the LR ``scheduler`` over ``iterations`` x the
        method's ``updates_per_iteration`` optimizer steps."""
        from transformers import Trainer, get_scheduler

        from aligntool.optim import optimizer_cls_and_kwargs

        run, args = self.run, self.args
        optim_cls, optim_kwargs = optimizer_cls_and_kwargs(run.recipe, args, self.model, str(run.loaded.source)) \
            or Trainer.get_optimizer_cls_and_kwargs(args, self.model.lm)
        optim_kwargs = {**optim_kwargs, "lr": args.learning_rate}
        self.optimizer = optim_cls(self.model.parameters(), weight_decay=args.weight_decay, **optim_kwargs)
        updates = self.iterations * self.method.updates_per_iteration
        self.scheduler = get_scheduler(args.lr_scheduler_type, self.optimizer,
                                       num_warmup_steps=args.get_warmup_steps(updates), num_training_steps=updates)
        if self.accelerator.state.deepspeed_plugin is not None:
            # DeepSpeed's "auto" entries (micro batch, clipping, precision, ZeRO-3 bucket sizes) from the arguments
            # and the model, as the Trainer's deepspeed_init fills them
            args.hf_deepspeed_config.trainer_config_finalize(args, self.model.lm, updates)

    def _setup_distributed(self) -> None:
        """The policy and optimizer wrapped by accelerate (DDP / DeepSpeed / FSDP2), the reference placed (sharded
        under ZeRO-3 and FSDP, whole under ZeRO-2), FSDP2 initialised; ``updates`` = 0."""
        # the scheduler stays ours (stepped once per update; accelerate's wrapper would step it once per process)
        # and acts on the optimizer DeepSpeed / FSDP wrap; sharded checkpoints save it with the rest
        self.model, self.optimizer = self.accelerator.prepare(self.model, self.optimizer)
        self.accelerator.register_for_checkpointing(self.scheduler)
        if self.ref is not None:
            if self.accelerator.state.deepspeed_plugin is not None:
                from trl.models.utils import prepare_deepspeed

                self.ref = prepare_deepspeed(self.ref, self.accelerator)  # sharded under ZeRO-3, whole under ZeRO-2
            elif self.fsdp:
                from trl.models.utils import prepare_fsdp

                self.ref = prepare_fsdp(self.ref, self.accelerator)
            else:
                self.ref.to(self.accelerator.device)
        if self.fsdp:  # FSDP2 initialises at the root's first forward: do it now, before generation runs the LM alone
            with torch.no_grad():
                one = torch.ones(1, 1, dtype=torch.long, device=self.accelerator.device)
                self.model(one, one, one - 1, 1)
        self._log_partitioning()
        self.updates = 0  # optimizer steps taken by this process (the vLLM weights follow it)

    def _log_partitioning(self) -> None:
        """Say how the weights are held: ZeRO-3 partitions (each process's share of the elements) or FSDP shards."""
        from aligntool.outputs import log

        params = list(self.model.parameters())
        if self.zero3:
            local = sum(p.ds_tensor.numel() for p in params if hasattr(p, "ds_tensor"))
            total = sum(p.ds_numel for p in params if hasattr(p, "ds_numel"))
            log(f"ZeRO-3: this process holds {local} of the policy's {total} parameter elements "
                f"({len(params)} tensors partitioned over {self.world} processes)")
        elif self.fsdp:
            placements = {str(getattr(p, "placements", None)) for p in params}
            log(f"FSDP: parameters sharded over {self.world} processes ({', '.join(sorted(placements))})")

    def _setup_generation(self) -> None:
        """``vllm``: the vLLM sampler when ``generation.backend`` is vllm (None: transformers' generate)."""
        self.vllm = None
        if self.run.recipe.generation.backend == "vllm":
            from aligntool.online.vllm_backend import VLLMSampler

            self.vllm = VLLMSampler(self.policy_lm, self.accelerator, self.tokenizer, self.run.recipe.generation,
                                    self.cfg.max_new_tokens)

    def _setup_rewards(self) -> None:
        """``scorer``: the recipe's reward source; None for a method that labels pairs itself (``uses_preferences``)."""
        from aligntool import rewards
        from aligntool.recipe.schema import RewardConfig

        self.scorer = None if self.method.uses_preferences else rewards.load(
            self.run.recipe.reward or RewardConfig(), device=self.accelerator.device)

    def _setup_data(self) -> None:
        """``prompts`` (every process holds the whole list; each iteration draws one global batch and takes its
        slice), ``columns`` (the dataset's other columns by prompt: an answer, test cases, ... for reward functions),
        ``batch_size`` and the engine ``state``."""
        self._setup_agent()
        self.prompts, self.columns = self.prompt_keys(self.run.train_dataset)
        self.batch_size = self.args.per_device_train_batch_size
        self.state = {"iteration": 0, "kl_coef": self.method.initial_kl_coef}
        self._calls = 0  # sampling calls in this iteration (part of each row's seed)

    def _setup_agent(self) -> None:
        """``agent`` (the recipe's agent section, None without one), its ``agent_tools`` and ``environment`` class
        (aligntool.tools: imported and checked), the chat template checked for tool calls (one line before training:
        aligntool.tokens.check_tool_template), ``chat_template_kwargs`` (``train.chat_template_kwargs``, as TRL's
        GRPOConfig has it) and ``conversations`` (each rendered prompt's messages; filled by ``prompt_keys``)."""
        from aligntool import tools

        self.agent = self.run.recipe.agent if self.run.loaded.spec.agent == "engine" else None
        self.chat_template_kwargs = (self.run.recipe.train.model_extra or {}).get("chat_template_kwargs") or {}
        self.conversations = {}
        self.agent_tools, self.environment, self.tool_schemas = [], None, None
        if self.agent is not None:
            from aligntool.tokens import check_tool_template

            self.agent_tools = tools.load_tools(self.agent)
            self.environment = tools.load_environment(self.agent)
            self.chat_template_kwargs = {**self.chat_template_kwargs, **check_tool_template(self.tokenizer)}
            self.tool_schemas = tools.schemas(self.agent_tools + (
                [fn for _, fn in tools._public_functions(self.environment)] if self.environment else [])) or None

    def prompt_keys(self, dataset) -> tuple[list[str], dict]:
        """(the dataset's prompts once each, {prompt: the row's other columns}). A conversational prompt is kept as
        the text the chat template renders (aligntool.tokens.render_prompt: the generation prompt, the agent's tools,
        ``chat_template_kwargs``; without them the text ``data.prompts_as_text`` gives), its messages beside it in
        ``conversations`` (the episodes start from them)."""
        from aligntool.data.formats import cell_kind
        from aligntool.tokens import render_prompt

        cells = dataset["prompt"]
        if self.agent is not None and cells and cell_kind(cells[0]) != "conversation":
            raise UserError("dataset: agent: tool episodes start from conversational prompts (a list of messages per "
                            "row), so that the chat template can render the tools and the replies; this dataset's "
                            "prompts are text")
        keys = []
        for cell in cells:
            if isinstance(cell, list):
                text = render_prompt(self.tokenizer, cell, self.tool_schemas, self.chat_template_kwargs)
                self.conversations.setdefault(text, cell)
                cell = text
            keys.append(cell)
        extra = [c for c in dataset.column_names if c != "prompt"]
        rows = dataset.select_columns(extra).to_list() if extra else []
        columns = {key: {c: row[c] for c in extra} for key, row in reversed(list(zip(keys, rows)))}
        return list(dict.fromkeys(keys)), columns

    def _setup_logging(self) -> None:
        """``out``, ``metrics_file``, the TensorBoard writer ``tb`` (main process only; transformers' tags) and the
        trackers of ``train.report_to`` (accelerate's, started here: aligntool.online.tracking)."""
        self.out = self.run.output_dir
        self.metrics_file = self.out / "metrics.jsonl"
        self.tb = None
        if self.accelerator.is_main_process:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(self.out / "tensorboard"))
        self._completions, self._last_eval = (), None
        self._start_trackers()
