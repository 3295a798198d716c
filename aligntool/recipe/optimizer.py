"""The recipe's ``optimizer:`` section: settings of aligntool's own optimizers (``train.optim: lion_kappa | cosmos``).

``train.learning_rate``, ``train.weight_decay`` and the schedule stay in ``train``, as for every optimizer; this
section holds only what the two families add. Fields left unset take the per-optimizer defaults named in their
descriptions (the papers' / the authors' code's)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, PositiveFloat, PositiveInt, field_validator

from aligntool.recipe.base import Strict

# the train.optim names that select an optimizer of this package (every other name is transformers' / bitsandbytes')
OPTIMIZERS = ("lion_kappa", "cosmos")


class OptimizerConfig(Strict):
    """Settings of ``train.optim: lion_kappa`` (Chen et al., ICLR 2024) and ``train.optim: cosmos`` (Liu et al.,
    2025); see aligntool/optim/lion_kappa.py and aligntool/optim/cosmos.py for the update rules."""

    betas: tuple[float, float] | None = Field(
        None, description="(beta1, beta2). Lion-kappa: beta1 interpolates the update direction, beta2 is the momentum "
        "decay (default 0.9, 0.99). COSMOS: first-moment and second-moment / subspace decays (default 0.95, 0.95, the "
        "authors' recommended setting). Not read from train.adam_beta1/2.")
    kappa: Literal["l1", "l2"] = Field(
        "l1", description="Lion-kappa: the convex kappa whose gradient maps the momentum to the update. l1: sign "
        "(plain Lion; with weight decay lambda it solves min f s.t. max|x| <= 1/lambda); l2: m/||m||_2 per tensor "
        "(normalised momentum; solves min f s.t. ||x||_2 <= 1/lambda per tensor).")
    rank: PositiveInt = Field(
        64, description="COSMOS: rank r of the leading eigensubspace handled by SOAP (the rest by Muon); must not "
        "exceed the smaller dimension of any matrix it trains (authors' default 64).")
    gamma: float = Field(0.2, ge=0, description="COSMOS: weight of the normalised Muon part added to the SOAP part "
                         "(authors' default 0.2).")
    lr_ratio: PositiveFloat = Field(
        0.2, description="COSMOS: learning rate of the hidden matrices as a fraction of train.learning_rate, which "
        "the Adam-trained embeddings, output head and 1-D weights use (authors' recommended 0.2).")
    nesterov: bool = Field(True, description="COSMOS: Nesterov-style first moment (authors' default on).")
    eps: PositiveFloat = Field(1e-8, description="COSMOS: epsilon of the second-moment denominators and norms.")
    ns_steps: PositiveInt = Field(5, description="COSMOS: Newton-Schulz iterations orthogonalising the residual "
                                  "(authors' 5).")
    ns_bf16: bool | None = Field(None, description="COSMOS: run Newton-Schulz in bfloat16 as the authors do "
                                 "(false: in the parameter's dtype; default: bfloat16 on GPUs, the parameter's dtype "
                                 "on CPUs, where bfloat16 products are slow).")
    vocab_size: PositiveInt | None = Field(
        None, description="COSMOS: 2-D weights with a dimension of this size (embeddings, output head) are trained by "
        "Adam. Default: the model's config.vocab_size.")

    @field_validator("betas")
    @classmethod
    def _betas(cls, v):
        if v is not None and not all(0 <= b < 1 for b in v):
            raise ValueError(f"betas {list(v)}: each must be in [0, 1)")
        return v
