"""KTO: Kahneman-Tversky Optimization on unpaired desirable / undesirable completions, through TRL's KTOTrainer
(Ethayarajh, Xu, Muennighoff, Jurafsky and Kiela 2024, "KTO: Model Alignment as Prospect Theoretic Optimization",
arXiv 2402.01306, Sec. 4.1; authors' code: github.com/ContextualAI/HALOs):

    r(x, y) = log pi(y|x) - log pi_ref(y|x)
    z0      = max(0, mean over the batch of r(x_i, y_j)),  y_j another row's completion (a mismatched pair), no gradient
    L       = E[ lambda_D (1 - sigmoid(beta (r - z0))) ]  for desirable y  (label true)
            + E[ lambda_U (1 - sigmoid(beta (z0 - r))) ]  for undesirable y (label false)

lambda_D / lambda_U are ``desirable_weight`` / ``undesirable_weight``; the paper recommends
lambda_D n_D / (lambda_U n_U) in [1, 4/3] when the counts n_D, n_U differ (TRL logs a hint when they are outside it).
``loss_type: apo_zero_unpaired`` is TRL's other unpaired loss (D'Oosterlinck et al. 2024, APO-zero): no z0,
1 - sigmoid(beta r) for desirable and sigmoid(beta r) for undesirable rows. The list of loss types is read from the
installed TRL's KTOConfig, so a loss TRL adds is accepted without a change here.

The math and the batching are TRL's (``from trl import KTOTrainer``: TRL 1.16 promoted it from trl.experimental, whose
import path is now a deprecated alias): z0 comes from each batch's completions rotated by one row, which needs the
rows in a fixed order (TRL's ``train_sampling_strategy: sequential``, its default for KTO) and more than one row per
batch. Data: TRL's unpaired format, ``prompt`` + ``completion`` + ``label`` (see aligntool.data); paired data runs with
``dataset.unpaired_from_pairs: true``.
"""

from __future__ import annotations

from pydantic import Field, field_validator

from aligntool.recipe.base import Strict
from aligntool.trainers.base import trl_lists


class AlgoConfig(Strict):
    beta: float = Field(0.1, gt=0, description="KL strength: scales the implied reward r = log pi/pi_ref inside the "
                        "sigmoid; higher keeps the policy nearer the reference.")
    desirable_weight: float = Field(1.0, gt=0, description="lambda_D: weight of the desirable (label true) rows' "
                                    "loss. With unequal counts keep lambda_D n_D / (lambda_U n_U) in [1, 4/3].")
    undesirable_weight: float = Field(1.0, gt=0, description="lambda_U: weight of the undesirable (label false) "
                                      "rows' loss.")
    loss_type: str = Field("kto", description="A loss type of TRL's KTOTrainer: kto (the paper's), apo_zero_unpaired "
                           "(no KL term z0), ...")
    precompute_ref_log_probs: bool = Field(False, description="Score the data with the reference once, before "
                                           "training (the reference is then not kept in memory).")

    @field_validator("loss_type")
    @classmethod
    def _known(cls, value: str) -> str:
        return trl_lists.check(value, trl_lists.kto_loss_types, " KTO loss types")

    trl_fields = ("beta", "desirable_weight", "undesirable_weight", "loss_type", "precompute_ref_log_probs")


def build(run):
    from trl import KTOTrainer

    from aligntool.errors import UserError

    args = run.trl_config()
    if args.loss_type != "apo_zero_unpaired":  # TRL's own checks, worded for the recipe before TRL tokenises the data
        if args.per_device_train_batch_size < 2:
            raise UserError(f"{run.loaded.source}: train.per_device_train_batch_size: KTO estimates its KL term z0 "
                            "from the other rows of a batch; it needs at least 2 rows per batch (got "
                            f"{args.per_device_train_batch_size})")
        if args.train_sampling_strategy != "sequential":
            raise UserError(f"{run.loaded.source}: train.train_sampling_strategy: KTO's KL rows are fixed per batch "
                            f"when the data is prepared: it needs 'sequential' (got {args.train_sampling_strategy!r}); "
                            "the rows are shuffled when unpaired data is made from pairs")
    return KTOTrainer(model=run.policy(), ref_model=run.reference(), args=args, train_dataset=run.train_dataset,
                      eval_dataset=run.eval_dataset, processing_class=run.tokenizer, peft_config=run.peft_config())
