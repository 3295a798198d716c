"""The single table of algorithms: recipe name -> where its trainer lives, what data it needs, its default recipe.

Each algorithm is one of three kinds, and its module (``aligntool/trainers/<name>.py``, beside its ``AlgoConfig``)
provides the entry point of that kind:

    trl       build(run) -> a transformers/TRL Trainer, which train.py fits (sft, reward, the DPO family, ...)
    pipeline  pipeline(run) -> summary: stages (sample, score, select) that end in run.fit, once or per iteration
    online    method(run) -> an object with step(engine, prompts), run on aligntool.online.engine.Engine

Adding an algorithm = one module under ``aligntool/trainers/`` (an ``AlgoConfig`` and the entry point; a trainer class
of its own goes in ``<name>_trainer.py``), one line here, one YAML under ``recipes/``. Modules import TRL only inside
their entry point or in ``*_trainer.py``, so this table, recipe checks and ``aligntool --help`` stay fast.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"


KINDS = ("trl", "pipeline", "online")


@dataclass(frozen=True)
class AlgorithmSpec:
    name: str
    summary: str
    family: str  # for people: supervised, reward, offline-preference, hybrid-preference, pipeline, online-rl, ...
    module: str  # trainer module: AlgoConfig + the entry point of its kind
    trl_config: str  # "module:Class" whose fields `train.*` may set
    data: str  # data kind, see aligntool.data.formats.DATA_KINDS
    recipe: str  # default recipe, relative to the repository root
    algo_defaults: dict = field(default_factory=dict)  # presets of a named variant (ipo = dpo with loss_type ipo)
    samples: bool = False  # samples its own completions, scored by the recipe's `reward` section
    kind: str = "trl"  # one of KINDS: which entry point the module provides

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"{self.name}: kind {self.kind!r} is not one of {KINDS}")

    def load(self) -> ModuleType:
        return importlib.import_module(self.module)

    def trl_config_class(self) -> type:
        module, cls = self.trl_config.split(":")
        return getattr(importlib.import_module(module), cls)


ALGORITHMS: dict[str, AlgorithmSpec] = {
    spec.name: spec
    for spec in [
        AlgorithmSpec("sft", "Supervised fine-tuning on demonstrations (TRL SFTTrainer).", "supervised",
                      "aligntool.trainers.sft", "trl:SFTConfig", "language_modeling", "recipes/sft.yaml"),
        AlgorithmSpec("reward", "Bradley-Terry reward model on preference pairs (TRL RewardTrainer).", "reward",
                      "aligntool.trainers.reward", "trl:RewardConfig", "preference", "recipes/reward.yaml"),
        AlgorithmSpec("dpo", "Direct Preference Optimization and every TRL DPO loss: IPO, hinge/SLiC, robust, "
                      "RPO mixes, f-DPO divergences, ... (TRL DPOTrainer).", "offline-preference",
                      "aligntool.trainers.dpo", "trl:DPOConfig", "preference", "recipes/dpo.yaml"),
        # Named DPO variants: TRL's DPOTrainer with the paper's loss preset (aligntool/trainers/dpo.py).
        AlgorithmSpec("ipo", "IPO: squared loss toward a 1/(2 tau) margin (Azar et al. 2023).", "offline-preference",
                      "aligntool.trainers.dpo", "trl:DPOConfig", "preference", "recipes/ipo.yaml",
                      {"loss_type": "ipo"}),
        AlgorithmSpec("slic", "SLiC-HF hinge loss max(0, 1 - beta * margin) (Zhao et al. 2023).", "offline-preference",
                      "aligntool.trainers.dpo", "trl:DPOConfig", "preference", "recipes/slic.yaml",
                      {"loss_type": "hinge"}),
        AlgorithmSpec("robust_dpo", "Robust DPO for noisy labels with flip rate epsilon (Chowdhury et al. 2024).",
                      "offline-preference", "aligntool.trainers.dpo", "trl:DPOConfig", "preference",
                      "recipes/robust_dpo.yaml", {"loss_type": "robust", "label_smoothing": 0.1}),
        AlgorithmSpec("sppo_hard", "SPPO with hard labels P_w=1, P_l=0 (TRL's sppo_hard; Wu et al. 2024).",
                      "offline-preference", "aligntool.trainers.dpo", "trl:DPOConfig", "preference",
                      "recipes/sppo_hard.yaml", {"loss_type": "sppo_hard"}),
        AlgorithmSpec("fdpo", "f-DPO: DPO with forward-KL, JS or alpha-divergence regularisation (Wang et al. 2023).",
                      "offline-preference", "aligntool.trainers.dpo", "trl:DPOConfig", "preference",
                      "recipes/fdpo.yaml", {"f_divergence_type": "js_divergence"}),
        AlgorithmSpec("rpo", "RPO: DPO + weighted NLL on the chosen response (Liu et al. 2024).", "offline-preference",
                      "aligntool.trainers.dpo", "trl:DPOConfig", "preference", "recipes/rpo.yaml",
                      {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 1.0]}),
        AlgorithmSpec("cpl", "CPL: contrastive loss on alpha * sum log pi with a conservative bias; no reference model "
                      "(Hejna et al. 2023).", "offline-preference", "aligntool.trainers.cpl", "trl:DPOConfig",
                      "preference", "recipes/cpl.yaml"),
        AlgorithmSpec("rso", "RSO: sample from the SFT policy, statistical rejection sampling toward the optimal "
                      "policy, pairs, then sigmoid-/hinge-norm (Liu et al. 2023).", "pipeline",
                      "aligntool.trainers.rso", "trl:DPOConfig", "prompt", "recipes/rso.yaml", samples=True,
                      kind="pipeline"),
        AlgorithmSpec("sppo", "SPPO, soft and iterative: K samples per prompt, win rates vs the current policy, "
                      "squared loss to (P - 1/2)/beta, reference refreshed each iteration (Wu et al. 2024).",
                      "pipeline", "aligntool.trainers.sppo", "trl:DPOConfig", "prompt", "recipes/sppo.yaml",
                      samples=True, kind="pipeline"),
        AlgorithmSpec("hypo", "HyPO: offline DPO + lambda * KL(pi || pi_ref) on fresh on-policy samples, RLOO "
                      "estimator (Song et al. 2024).", "hybrid-preference", "aligntool.trainers.hypo", "trl:DPOConfig",
                      "preference", "recipes/hypo.yaml"),
        AlgorithmSpec("srpo", "SRPO: one model as generator and self-reviser, (1-alpha) L_gen + alpha L_self "
                      "(Choi et al. 2024).", "offline-preference", "aligntool.trainers.srpo", "trl:DPOConfig",
                      "preference", "recipes/srpo.yaml"),
        AlgorithmSpec("spo", "SPO: a DPO-family loss + lambda * self-supervised prediction of how much key content a "
                      "response lost (Li et al. 2024).", "offline-preference", "aligntool.trainers.spo",
                      "trl:DPOConfig", "preference", "recipes/spo.yaml"),
        # Reference-free and unpaired preference losses (TRL's KTOTrainer; trl.experimental's ORPO / CPO trainers)
        AlgorithmSpec("kto", "KTO: prospect-theoretic loss on unpaired desirable / undesirable completions (Ethayarajh "
                      "et al. 2024; TRL KTOTrainer).", "offline-preference", "aligntool.trainers.kto", "trl:KTOConfig",
                      "unpaired", "recipes/kto.yaml"),
        AlgorithmSpec("orpo", "ORPO: NLL on the chosen + lambda * odds-ratio loss; no reference model (Hong et al. "
                      "2024; TRL ORPOTrainer).", "offline-preference", "aligntool.trainers.orpo",
                      "trl.experimental.orpo:ORPOConfig", "preference", "recipes/orpo.yaml"),
        AlgorithmSpec("cpo", "CPO: DPO-style loss without a reference + NLL on the chosen (Xu et al. 2024; TRL "
                      "CPOTrainer).", "offline-preference", "aligntool.trainers.cpo",
                      "trl.experimental.cpo:CPOConfig", "preference", "recipes/cpo.yaml"),
        AlgorithmSpec("simpo", "SimPO: length-normalised log-probability margin with a target gamma; no reference "
                      "(Meng et al. 2024; TRL CPOTrainer, loss_type simpo).", "offline-preference",
                      "aligntool.trainers.cpo", "trl.experimental.cpo:CPOConfig", "preference", "recipes/simpo.yaml",
                      {"loss_type": "simpo", "cpo_alpha": 0.0}),
        # Critic-free RL with verifiable rewards through TRL's trainers (sampling inside the Trainer)
        AlgorithmSpec("grpo", "GRPO and every TRL GRPO loss (dr_grpo, dapo, bnpo, ...): group-normalised advantages "
                      "of G samples per prompt (Shao et al. 2024; TRL GRPOTrainer).", "online-rl",
                      "aligntool.trainers.grpo", "trl:GRPOConfig", "prompt", "recipes/grpo.yaml", samples=True),
        AlgorithmSpec("rloo", "RLOO: REINFORCE with the leave-one-out mean of k samples as baseline (Ahmadian et al. "
                      "2024; TRL RLOOTrainer).", "online-rl", "aligntool.trainers.rloo", "trl:RLOOConfig", "prompt",
                      "recipes/rloo.yaml", samples=True),
        # Online RL on aligntool's rollout engine (aligntool/online/engine.py); train.* = transformers.TrainingArguments
        AlgorithmSpec("ppo", "PPO with a value head, GAE, clipped policy/value losses, adaptive KL (Ouyang et al. "
                      "2022).", "online-rl", "aligntool.online.ppo", "transformers:TrainingArguments", "prompt",
                      "recipes/ppo.yaml", samples=True,
                      kind="online"),
        AlgorithmSpec("p3o", "P3O: pairwise PPO on two samples per prompt, V1/V2 clipping, no critic (Wu et al. 2023).",
                      "online-rl", "aligntool.online.p3o", "transformers:TrainingArguments", "prompt",
                      "recipes/p3o.yaml", samples=True,
                      kind="online"),
        AlgorithmSpec("remax", "ReMax: REINFORCE with the greedy response's reward as baseline, no critic (Li et al. "
                      "2023).", "online-rl", "aligntool.online.remax", "transformers:TrainingArguments", "prompt",
                      "recipes/remax.yaml", samples=True,
                      kind="online"),
        AlgorithmSpec("reinforce_pp", "REINFORCE++: token-level KL in the reward, advantages normalised over the "
                      "global batch, PPO-clipped updates, no critic (Hu 2025; OpenRLHF).", "online-rl",
                      "aligntool.online.reinforce_pp", "transformers:TrainingArguments", "prompt",
                      "recipes/reinforce_pp.yaml", samples=True, kind="online"),
        # Online and iterative preference optimization: pairs labelled by a preference source (aligntool/preferences.py)
        AlgorithmSpec("online_dpo", "Online DPO: two policy samples per prompt, labelled by the preference source, any "
                      "TRL DPO loss (Guo et al. 2024).", "online-preference", "aligntool.online.online_dpo",
                      "transformers:TrainingArguments", "prompt", "recipes/online_dpo.yaml", samples=True,
                      kind="online"),
        AlgorithmSpec("xpo", "XPO: online DPO on a policy vs a reference sample + alpha * log pi(reference sample) "
                      "exploration (Xie et al. 2024).", "online-preference", "aligntool.online.xpo",
                      "transformers:TrainingArguments", "prompt", "recipes/xpo.yaml", samples=True,
                      kind="online"),
        AlgorithmSpec("inpo", "INPO: iterations of K samples, tournament pairs, (h - 1/(2 eta))^2 against the "
                      "reference and the last iterate (Zhang et al. 2024).", "pipeline", "aligntool.trainers.inpo",
                      "trl:DPOConfig", "prompt", "recipes/inpo.yaml", samples=True, kind="pipeline"),
    ]
}


def get(name: str) -> AlgorithmSpec:
    from aligntool.errors import UserError
    from aligntool.recipe.suggest import did_you_mean

    if name not in ALGORITHMS:
        raise UserError(f"unknown algorithm {name!r}{did_you_mean(name, ALGORITHMS)}; known: {', '.join(ALGORITHMS)}")
    return ALGORITHMS[name]
