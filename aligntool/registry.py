"""The single table of algorithms, and the one list of facts about them: recipe name -> where its code lives, what data
it needs, its default recipe, and what it can do (generation backends, judge, value head, batch unit, sharding).

Every list of methods elsewhere (the recipe checks and their messages, field descriptions, Step Law, the README's
algorithm and capability tables, written by ``scripts/registry_tables.py``) is derived from this table with
``names(...)``, so adding a method here adds it everywhere.

Each algorithm is one of three kinds, and its ``module`` (beside its ``AlgoConfig``) provides the entry point of that
kind:

    trl       build(run) -> a transformers/TRL Trainer, which train.py fits (sft, reward, the DPO family, ...)
    pipeline  pipeline(run) -> summary: stages (sample, score, select) that end in run.fit, once or per iteration
    online    method(run) -> an object with step(engine, prompts), run on aligntool's rollout engine (aligntool/online)

Adding an algorithm = its module (an ``AlgoConfig`` and the entry point; a trainer class of its own goes in
``<name>_trainer.py``), one entry here, one YAML under ``aligntool/recipes/``. Modules import TRL only inside their
entry point or in ``*_trainer.py``, so this table, recipe checks and ``aligntool --help`` stay fast. This file imports
nothing but the standard library (at import time).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Callable

RECIPES_DIR = Path(__file__).resolve().parent / "recipes"


KINDS = ("trl", "pipeline", "online")
# the shapes of training data; the columns of each are aligntool.data's DATA_KINDS (a test keeps the two equal)
DATA_KINDS = ("language_modeling", "preference", "prompt", "unpaired")
# where `generation.backend: vllm` runs: TRL's trainer (its use_vllm / vllm_* fields) or aligntool's rollout engine
VLLM_PATHS = ("trl", "engine")
# what train.per_device_train_batch_size counts: given rows (examples, pairs), prompts per iteration (the engine),
# completions (TRL's GRPO / RLOO), or rows the method generates during the run (pipelines: pairs it samples)
BATCH_UNITS = ("rows", "prompts", "completions", "generated")
# where the recipe's `agent` section (tools, environment: multi-turn episodes) runs: TRL's GRPOTrainer (tools=,
# environment_factory=) or aligntool's rollout engine (aligntool/online/episodes.py)
AGENT_PATHS = ("trl", "engine")


@dataclass(frozen=True, kw_only=True)
class AlgorithmSpec:
    name: str
    summary: str  # one line for `aligntool recipes` and the README: what it is, the paper
    family: str  # for people: supervised, reward, offline-preference, hybrid-preference, pipeline, online-rl, ...
    module: str  # its code: AlgoConfig + the entry point of its kind
    trl_config: str  # "module:Class" whose fields `train.*` may set
    data: str  # one of DATA_KINDS
    recipe: str  # default recipe, relative to the repository root
    kind: str = "trl"  # one of KINDS: which entry point the module provides
    algo_defaults: dict = field(default_factory=dict)  # presets of a named variant (ipo = dpo with loss_type ipo)
    samples: bool = False  # samples its own completions, scored by the recipe's `reward` section
    vllm: str | None = None  # generation.backend vllm through one of VLLM_PATHS; None: transformers only
    preferences: bool = False  # labels pairs with a preference source (aligntool/preferences.py): reward.judge allowed
    value_head: bool = False  # trains a value head (a critic) beside the policy
    batch_unit: str = "rows"  # one of BATCH_UNITS: what train.per_device_train_batch_size counts
    sharded: bool = True  # online: runs under ZeRO-3 / FSDP (False: samples from the reference, which they partition)
    agent: str | None = None  # multi-turn tool episodes (recipe `agent:`) through one of AGENT_PATHS; None: refused

    def __post_init__(self):
        for key, allowed in (("kind", KINDS), ("data", DATA_KINDS), ("batch_unit", BATCH_UNITS),
                             ("vllm", (None, *VLLM_PATHS)), ("agent", (None, *AGENT_PATHS))):
            if getattr(self, key) not in allowed:
                raise ValueError(f"{self.name}: {key} {getattr(self, key)!r} is not one of {allowed}")
        if (self.kind == "online") != (self.vllm == "engine"):
            raise ValueError(f"{self.name}: the online methods, and only they, generate with vLLM on the engine")
        if (self.preferences or self.vllm) and not self.samples:
            raise ValueError(f"{self.name}: preferences and vllm apply to methods that sample")

    @property
    def backends(self) -> tuple[str, ...]:
        """The values `generation.backend` may take for this method."""
        return ("hf", "vllm") if self.vllm else ("hf",)

    def load(self) -> ModuleType:
        return importlib.import_module(self.module)

    def trl_config_class(self) -> type:
        module, cls = self.trl_config.split(":")
        return getattr(importlib.import_module(module), cls)


ALGORITHMS: dict[str, AlgorithmSpec] = {
    spec.name: spec
    for spec in [
        AlgorithmSpec(name="sft", kind="trl", family="supervised", data="language_modeling",
                      module="aligntool.trainers.sft", trl_config="trl:SFTConfig", recipe="aligntool/recipes/sft.yaml",
                      summary="Supervised fine-tuning on demonstrations (TRL SFTTrainer)."),
        AlgorithmSpec(name="reward", kind="trl", family="reward", data="preference", module="aligntool.trainers.reward",
                      trl_config="trl:RewardConfig", recipe="aligntool/recipes/reward.yaml",
                      summary="Bradley-Terry reward model on preference pairs (TRL RewardTrainer)."),
        AlgorithmSpec(name="dpo", kind="trl", family="offline-preference", data="preference",
                      module="aligntool.trainers.dpo", trl_config="trl:DPOConfig", recipe="aligntool/recipes/dpo.yaml",
                      summary="Direct Preference Optimization and every TRL DPO loss: IPO, hinge/SLiC, robust, RPO "
                              "mixes, f-DPO divergences, ... (TRL DPOTrainer)."),
        # Named DPO variants: TRL's DPOTrainer with the paper's loss preset (the dpo module).
        AlgorithmSpec(name="ipo", kind="trl", family="offline-preference", data="preference",
                      module="aligntool.trainers.dpo", trl_config="trl:DPOConfig", recipe="aligntool/recipes/ipo.yaml",
                      algo_defaults={"loss_type": "ipo"},
                      summary="IPO: squared loss toward a 1/(2 tau) margin (Azar et al. 2023)."),
        AlgorithmSpec(name="slic", kind="trl", family="offline-preference", data="preference",
                      module="aligntool.trainers.dpo", trl_config="trl:DPOConfig", recipe="aligntool/recipes/slic.yaml",
                      algo_defaults={"loss_type": "hinge"},
                      summary="SLiC-HF hinge loss max(0, 1 - beta * margin) (Zhao et al. 2023)."),
        AlgorithmSpec(name="robust_dpo", kind="trl", family="offline-preference", data="preference",
                      module="aligntool.trainers.dpo", trl_config="trl:DPOConfig",
                      recipe="aligntool/recipes/robust_dpo.yaml",
                      algo_defaults={"loss_type": "robust", "label_smoothing": 0.1},
                      summary="Robust DPO for noisy labels with flip rate epsilon (Chowdhury et al. 2024)."),
        AlgorithmSpec(name="sppo_hard", kind="trl", family="offline-preference", data="preference",
                      module="aligntool.trainers.dpo", trl_config="trl:DPOConfig",
                      recipe="aligntool/recipes/sppo_hard.yaml",
                      algo_defaults={"loss_type": "sppo_hard"},
                      summary="SPPO with hard labels P_w=1, P_l=0 (TRL's sppo_hard; Wu et al. 2024)."),
        AlgorithmSpec(name="fdpo", kind="trl", family="offline-preference", data="preference",
                      module="aligntool.trainers.dpo", trl_config="trl:DPOConfig", recipe="aligntool/recipes/fdpo.yaml",
                      algo_defaults={"f_divergence_type": "js_divergence"},
                      summary="f-DPO: DPO with forward-KL, JS or alpha-divergence regularisation (Wang et al. 2023)."),
        AlgorithmSpec(name="rpo", kind="trl", family="offline-preference", data="preference",
                      module="aligntool.trainers.dpo", trl_config="trl:DPOConfig", recipe="aligntool/recipes/rpo.yaml",
                      algo_defaults={"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 1.0]},
                      summary="RPO: DPO + weighted NLL on the chosen response (Liu et al. 2024)."),
        AlgorithmSpec(name="cpl", kind="trl", family="offline-preference", data="preference",
                      module="aligntool.trainers.cpl", trl_config="trl:DPOConfig", recipe="aligntool/recipes/cpl.yaml",
                      summary="CPL: contrastive loss on alpha * sum log pi with a conservative bias; no reference "
                              "model (Hejna et al. 2023)."),
        AlgorithmSpec(name="rso", kind="pipeline", family="pipeline", data="prompt", samples=True,
                      batch_unit="generated", module="aligntool.trainers.rso", trl_config="trl:DPOConfig",
                      recipe="aligntool/recipes/rso.yaml",
                      summary="RSO: sample from the SFT policy, statistical rejection sampling toward the optimal "
                              "policy, pairs, then sigmoid-/hinge-norm (Liu et al. 2023)."),
        AlgorithmSpec(name="sppo", kind="pipeline", family="pipeline", data="prompt", samples=True,
                      batch_unit="generated", module="aligntool.trainers.sppo", trl_config="trl:DPOConfig",
                      recipe="aligntool/recipes/sppo.yaml",
                      summary="SPPO, soft and iterative: K samples per prompt, win rates vs the current policy, "
                              "squared loss to (P - 1/2)/beta, reference refreshed each iteration (Wu et al. 2024)."),
        AlgorithmSpec(name="hypo", kind="trl", family="hybrid-preference", data="preference",
                      module="aligntool.trainers.hypo", trl_config="trl:DPOConfig",
                      recipe="aligntool/recipes/hypo.yaml",
                      summary="HyPO: offline DPO + lambda * KL(pi || pi_ref) on fresh on-policy samples, RLOO "
                              "estimator (Song et al. 2024)."),
        AlgorithmSpec(name="srpo", kind="trl", family="offline-preference", data="preference",
                      module="aligntool.trainers.srpo", trl_config="trl:DPOConfig",
                      recipe="aligntool/recipes/srpo.yaml",
                      summary="SRPO: one model as generator and self-reviser, (1-alpha) L_gen + alpha L_self (Choi et "
                              "al. 2024)."),
        AlgorithmSpec(name="spo", kind="trl", family="offline-preference", data="preference",
                      module="aligntool.trainers.spo", trl_config="trl:DPOConfig", recipe="aligntool/recipes/spo.yaml",
                      summary="SPO: a DPO-family loss + lambda * self-supervised prediction of how much key content a "
                              "response lost (Li et al. 2024)."),
        # Reference-free and unpaired preference losses (TRL's KTOTrainer; trl.experimental's ORPO / CPO trainers)
        AlgorithmSpec(name="kto", kind="trl", family="offline-preference", data="unpaired",
                      module="aligntool.trainers.kto", trl_config="trl:KTOConfig", recipe="aligntool/recipes/kto.yaml",
                      summary="KTO: prospect-theoretic loss on unpaired desirable / undesirable completions "
                              "(Ethayarajh et al. 2024; TRL KTOTrainer)."),
        AlgorithmSpec(name="orpo", kind="trl", family="offline-preference", data="preference",
                      module="aligntool.trainers.orpo", trl_config="trl.experimental.orpo:ORPOConfig",
                      recipe="aligntool/recipes/orpo.yaml",
                      summary="ORPO: NLL on the chosen + lambda * odds-ratio loss; no reference model (Hong et al. "
                              "2024; TRL ORPOTrainer)."),
        AlgorithmSpec(name="cpo", kind="trl", family="offline-preference", data="preference",
                      module="aligntool.trainers.cpo", trl_config="trl.experimental.cpo:CPOConfig",
                      recipe="aligntool/recipes/cpo.yaml",
                      summary="CPO: DPO-style loss without a reference + NLL on the chosen (Xu et al. 2024; TRL "
                              "CPOTrainer)."),
        AlgorithmSpec(name="simpo", kind="trl", family="offline-preference", data="preference",
                      module="aligntool.trainers.cpo", trl_config="trl.experimental.cpo:CPOConfig",
                      recipe="aligntool/recipes/simpo.yaml", algo_defaults={"loss_type": "simpo", "cpo_alpha": 0.0},
                      summary="SimPO: length-normalised log-probability margin with a target gamma; no reference "
                              "(Meng et al. 2024; TRL CPOTrainer, loss_type simpo)."),
        # Critic-free RL with verifiable rewards through TRL's trainers (sampling inside the Trainer)
        AlgorithmSpec(name="grpo", kind="trl", family="online-rl", data="prompt", samples=True, vllm="trl", agent="trl",
                      batch_unit="completions", module="aligntool.trainers.grpo", trl_config="trl:GRPOConfig",
                      recipe="aligntool/recipes/grpo.yaml",
                      summary="GRPO and every TRL GRPO loss (dr_grpo, dapo, bnpo, ...): group-normalised advantages "
                              "of G samples per prompt (Shao et al. 2024; TRL GRPOTrainer)."),
        AlgorithmSpec(name="rloo", kind="trl", family="online-rl", data="prompt", samples=True, vllm="trl",
                      batch_unit="completions", module="aligntool.trainers.rloo", trl_config="trl:RLOOConfig",
                      recipe="aligntool/recipes/rloo.yaml",
                      summary="RLOO: REINFORCE with the leave-one-out mean of k samples as baseline (Ahmadian et al. "
                              "2024; TRL RLOOTrainer)."),
        # Online RL on aligntool's rollout engine; train.* = transformers.TrainingArguments
        AlgorithmSpec(name="ppo", kind="online", family="online-rl", data="prompt", samples=True, vllm="engine",
                      agent="engine",
                      batch_unit="prompts", value_head=True, module="aligntool.online.ppo",
                      trl_config="transformers:TrainingArguments", recipe="aligntool/recipes/ppo.yaml",
                      summary="PPO with a value head, GAE, clipped policy/value losses, adaptive KL (Ouyang et al. "
                              "2022)."),
        AlgorithmSpec(name="p3o", kind="online", family="online-rl", data="prompt", samples=True, vllm="engine",
                      agent="engine",
                      batch_unit="prompts", module="aligntool.online.p3o",
                      trl_config="transformers:TrainingArguments", recipe="aligntool/recipes/p3o.yaml",
                      summary="P3O: pairwise PPO on two samples per prompt, V1/V2 clipping, no critic (Wu et al. "
                              "2023)."),
        AlgorithmSpec(name="remax", kind="online", family="online-rl", data="prompt", samples=True, vllm="engine",
                      agent="engine",
                      batch_unit="prompts", module="aligntool.online.remax",
                      trl_config="transformers:TrainingArguments", recipe="aligntool/recipes/remax.yaml",
                      summary="ReMax: REINFORCE with the greedy response's reward as baseline, no critic (Li et al. "
                              "2023)."),
        AlgorithmSpec(name="reinforce_pp", kind="online", family="online-rl", data="prompt", samples=True,
                      vllm="engine", agent="engine", batch_unit="prompts", module="aligntool.online.reinforce_pp",
                      trl_config="transformers:TrainingArguments", recipe="aligntool/recipes/reinforce_pp.yaml",
                      summary="REINFORCE++: token-level KL in the reward, advantages normalised over the global "
                              "batch, PPO-clipped updates, no critic (Hu 2025; OpenRLHF)."),
        # Online and iterative preference optimization: pairs labelled by a preference source (aligntool/preferences.py)
        AlgorithmSpec(name="online_dpo", kind="online", family="online-preference", data="prompt", samples=True,
                      vllm="engine", batch_unit="prompts", preferences=True, module="aligntool.online.online_dpo",
                      trl_config="transformers:TrainingArguments", recipe="aligntool/recipes/online_dpo.yaml",
                      summary="Online DPO: two policy samples per prompt, labelled by the preference source, any TRL "
                              "DPO loss (Guo et al. 2024)."),
        AlgorithmSpec(name="xpo", kind="online", family="online-preference", data="prompt", samples=True, vllm="engine",
                      batch_unit="prompts", preferences=True, sharded=False, module="aligntool.online.xpo",
                      trl_config="transformers:TrainingArguments", recipe="aligntool/recipes/xpo.yaml",
                      summary="XPO: online DPO on a policy vs a reference sample + alpha * log pi(reference sample) "
                              "exploration (Xie et al. 2024)."),
        AlgorithmSpec(name="inpo", kind="pipeline", family="pipeline", data="prompt", samples=True,
                      batch_unit="generated", preferences=True, module="aligntool.trainers.inpo",
                      trl_config="trl:DPOConfig", recipe="aligntool/recipes/inpo.yaml",
                      summary="INPO: iterations of K samples, tournament pairs, (h - 1/(2 eta))^2 against the "
                              "reference and the last iterate (Zhang et al. 2024)."),
    ]
}


def names(where: Callable[[AlgorithmSpec], bool] | None = None, **facts) -> list[str]:
    """The names of the algorithms whose fields equal ``facts`` (``names(kind="online")``, ``names(vllm="trl")``) and
    for which ``where(spec)`` holds, in the table's order: read at call time, so every list derived from it follows the
    table."""
    return [spec.name for spec in ALGORITHMS.values()
            if all(getattr(spec, k) == v for k, v in facts.items()) and (where is None or where(spec))]


def listing(where: Callable[[AlgorithmSpec], bool] | None = None, **facts) -> str:
    """``names(...)`` as text for a message: "ppo, p3o, remax"."""
    return ", ".join(names(where, **facts))


def get(name: str) -> AlgorithmSpec:
    from aligntool.errors import UserError
    from aligntool.recipe.suggest import did_you_mean

    if name not in ALGORITHMS:
        raise UserError(f"unknown algorithm {name!r}{did_you_mean(name, ALGORITHMS)}; known: {', '.join(ALGORITHMS)}")
    return ALGORITHMS[name]


# each method's paper (title, authors, year, arXiv id): the model card cites it (publish.py)
PAPERS: dict[str, tuple[str, str, int, str]] = {
    "reward": ("Training language models to follow instructions with human feedback", "Ouyang et al.", 2022,
               "2203.02155"),
    "dpo": ("Direct Preference Optimization: Your Language Model is Secretly a Reward Model", "Rafailov et al.", 2023,
            "2305.18290"),
    "ipo": ("A General Theoretical Paradigm to Understand Learning from Human Preferences", "Azar et al.", 2023,
            "2310.12036"),
    "slic": ("SLiC-HF: Sequence Likelihood Calibration with Human Feedback", "Zhao et al.", 2023, "2305.10425"),
    "robust_dpo": ("Provably Robust DPO: Aligning Language Models with Noisy Feedback", "Chowdhury et al.", 2024,
                   "2403.00409"),
    "sppo_hard": ("Self-Play Preference Optimization for Language Model Alignment", "Wu et al.", 2024, "2405.00675"),
    "sppo": ("Self-Play Preference Optimization for Language Model Alignment", "Wu et al.", 2024, "2405.00675"),
    "fdpo": ("Beyond Reverse KL: Generalizing Direct Preference Optimization with Diverse Divergence Constraints",
             "Wang et al.", 2023, "2309.16240"),
    "rpo": ("Provably Mitigating Overoptimization in RLHF: Your SFT Loss is Implicitly an Adversarial Regularizer",
            "Liu et al.", 2024, "2405.16436"),
    "cpl": ("Contrastive Preference Learning: Learning from Human Feedback without RL", "Hejna et al.", 2023,
            "2310.13639"),
    "rso": ("Statistical Rejection Sampling Improves Preference Optimization", "Liu et al.", 2023, "2309.06657"),
    "hypo": ("The Importance of Online Data: Understanding Preference Fine-tuning via Coverage", "Song et al.", 2024,
             "2406.01462"),
    "srpo": ("Self-Improving Robust Preference Optimization", "Choi et al.", 2024, "2406.01660"),
    "spo": ("Self-supervised Preference Optimization: Enhance Your Language Model with Preference Degree Awareness",
            "Li et al.", 2024, "2409.17791"),
    "kto": ("KTO: Model Alignment as Prospect Theoretic Optimization", "Ethayarajh et al.", 2024, "2402.01306"),
    "orpo": ("ORPO: Monolithic Preference Optimization without Reference Model", "Hong et al.", 2024, "2403.07691"),
    "cpo": ("Contrastive Preference Optimization: Pushing the Boundaries of LLM Performance in Machine Translation",
            "Xu et al.", 2024, "2401.08417"),
    "simpo": ("SimPO: Simple Preference Optimization with a Reference-Free Reward", "Meng et al.", 2024, "2405.14734"),
    "grpo": ("DeepSeekMath: Pushing the Limits of Mathematical Reasoning in Open Language Models", "Shao et al.", 2024,
             "2402.03300"),
    "rloo": ("Back to Basics: Revisiting REINFORCE Style Optimization for Learning from Human Feedback in LLMs",
             "Ahmadian et al.", 2024, "2402.14740"),
    "ppo": ("Training language models to follow instructions with human feedback", "Ouyang et al.", 2022,
            "2203.02155"),
    "p3o": ("Pairwise Proximal Policy Optimization: Harnessing Relative Feedback for LLM Alignment", "Wu et al.", 2023,
            "2310.00212"),
    "remax": ("ReMax: A Simple, Effective, and Efficient Reinforcement Learning Method for Aligning Large Language "
              "Models", "Li et al.", 2023, "2310.10505"),
    "reinforce_pp": ("REINFORCE++: A Simple and Efficient Approach for Aligning Large Language Models", "Hu", 2025,
                     "2501.03262"),
    "online_dpo": ("Direct Language Model Alignment from Online AI Feedback", "Guo et al.", 2024, "2402.04792"),
    "xpo": ("Exploratory Preference Optimization: Harnessing Implicit Q*-Approximation for Sample-Efficient RLHF",
            "Xie et al.", 2024, "2405.21046"),
    "inpo": ("Iterative Nash Policy Optimization: Aligning LLMs with General Preferences via No-Regret Learning",
             "Zhang et al.", 2024, "2407.00617"),
}
