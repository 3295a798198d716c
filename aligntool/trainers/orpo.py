"""ORPO: Odds Ratio Preference Optimization, SFT and preference in one loss without a reference model, through TRL's
``trl.experimental.orpo.ORPOTrainer`` (Hong, Lee and Thorne 2024, "ORPO: Monolithic Preference Optimization without
Reference Model", arXiv 2403.07691, Eqs. 3-7; authors' code: github.com/xfactlab/orpo):

    P(y|x)   = exp( (1/|y|) sum_t log pi(y_t | x, y_<t) )          (length-normalised likelihood, Eq. 3)
    odds(y|x) = P(y|x) / (1 - P(y|x))
    L_OR     = -log sigmoid( log odds(y_w|x) - log odds(y_l|x) )    (Eq. 7)
    L        = L_SFT + lambda * L_OR                                 (Eq. 6)

``beta`` is the paper's lambda (TRL's name; the authors' code calls it alpha). TRL computes log(1 - P) with a stable
log1mexp. L_SFT is the token-mean negative log-likelihood of the chosen sequence; as in the
authors' code, TRL takes it over the prompt and the response tokens (the paper writes it over the response).
"""

from __future__ import annotations

from pydantic import Field

from aligntool.recipe.base import Strict


class AlgoConfig(Strict):
    beta: float = Field(0.1, gt=0, description="lambda: weight of the odds-ratio term L_OR against the NLL of the "
                        "chosen responses (the paper uses 0.1 to 0.25).")

    trl_fields = ("beta",)


def build(run):
    import warnings

    with warnings.catch_warnings():  # trl.experimental warns that it is experimental on import
        warnings.simplefilter("ignore")
        from trl.experimental.orpo import ORPOTrainer

    return ORPOTrainer(model=run.policy(), args=run.trl_config(), train_dataset=run.train_dataset,
                       eval_dataset=run.eval_dataset, processing_class=run.tokenizer, peft_config=run.peft_config())
