"""RLOO: REINFORCE with a leave-one-out baseline (Ahmadian et al. 2024, "Back to Basics: Revisiting REINFORCE Style
Optimization for Learning from Human Feedback in LLMs", arXiv 2402.14740, sec. 3.2), through TRL's RLOOTrainer
(github.com/huggingface/trl).

For each prompt x the policy samples k = ``num_generations`` completions y_1..y_k; each whole completion is one
action, its reward the recipe's reward minus the KL penalty summed over its tokens, and its baseline the mean reward
of the other k - 1 samples:

    R_i = r(x, y_i) - beta sum_t (log pi_old(y_it | .) - log pi_ref(y_it | .)),
    A_i = R_i - 1/(k-1) sum_{j != i} R_j,
    L(theta) = -1/B sum_i min(rho_i A_i, clip(rho_i, 1 - epsilon, 1 + epsilon_high) A_i),   rho_i = pi_theta(y_i|x) /
    pi_old(y_i|x) (sequence level),

so the gradient is the paper's (1/k) sum_i [r(y_i) - 1/(k-1) sum_{j!=i} r(y_j)] grad log pi(y_i|x) when
``num_iterations`` = 1 (rho = 1). ``normalize_advantages`` standardises A over the generation batch, and
``reward_clip_range`` clips r first (both off in the paper). The math is TRL's; this module exposes its knobs under
TRL's names and wires aligntool's reward, model and data in.

Batches, rewards and generation are as for GRPO (aligntool/trainers/grpo.py): ``train.per_device_train_batch_size``
counts completions, each generation round (``generation_batch_size``, default per-device batch x processes x
steps_per_generation) must be divisible by k; the reward terms become TRL reward functions with ``reward_weights``,
the dataset's other columns reach them as keyword arguments; ``generation.backend: vllm`` maps onto TRL's vLLM fields.
"""

from __future__ import annotations

from pydantic import Field, model_validator

from aligntool.trainers.grpo import SampledRLConfig, build_trainer
from aligntool.trainers.grpo import args as args  # the run's RLOOConfig, built as for GRPO


class AlgoConfig(SampledRLConfig):
    num_generations: int = Field(2, ge=2, description="Samples per prompt (the paper's k; it finds k = 4 a good "
                                 "trade-off). The generation batch (completions) must be divisible by it.")
    beta: float = Field(0.05, ge=0, description="KL coefficient: beta x the sequence's summed log-ratio to the "
                        "reference is subtracted from its reward; 0 loads no reference.")
    normalize_advantages: bool = Field(False, description="Standardise the advantages over each generation batch "
                                       "(mean 0, std 1).")
    reward_clip_range: tuple[float, float] | None = Field(None, description="Clip rewards to [min, max] before the "
                                                          "baseline (default: no clipping).")

    trl_fields = (*SampledRLConfig.trl_fields, "normalize_advantages", "reward_clip_range")

    @model_validator(mode="after")
    def _clip(self):
        if self.reward_clip_range is not None and self.reward_clip_range[0] >= self.reward_clip_range[1]:
            raise ValueError(f"reward_clip_range {list(self.reward_clip_range)}: min must be below max")
        return self


def build(run):
    from trl import RLOOTrainer

    return build_trainer(run, RLOOTrainer)
