"""SRPO: Self-Improving Robust Preference Optimization (Choi et al. 2024, arXiv 2406.01660).

One model, two roles: a generator pi(y | x) and a self-reviser pi(y' | x, y) that sees a prior completion y through
``revision_template``. With h(a|b) = log pi(a | rev(x, b)) - log pi_ref(a | rev(x, b)) and h(a) = log-ratio on x alone:

    L_self = (1/2 - beta [h(yw|yl) - h(yl|yl)])^2 + (1/2 - beta [h(yw|yw) - h(yl|yw)])^2
    L_gen  = (beta [h(yw|yl) + h(yw) - h(yl|yw) - h(yl)] - 1)^2
    L      = (1 - alpha) L_gen + alpha L_self                 (aligntool.losses.preference.srpo_loss)

Each pair (x, yw, yl) becomes three preference rows in one batch: (x; yw, yl), (rev(x, yl); yw, yl) and
(rev(x, yw); yw, yl); their six sequence log-ratios feed the loss. Defaults follow the public reimplementation
(TRL PR #1772: alpha 0.8, beta 0.01); the toy recipe uses beta 0.1. Standard (string) data only: the revision prompt
is plain text. ``aligntool eval --revise K`` scores a model after K self-revision steps y_{k+1} ~ pi(. | rev(x, y_k))
(aligntool/eval/toy.py).
"""

from __future__ import annotations

from pydantic import Field, field_validator

from aligntool.recipe.base import Strict

DEFAULT_TEMPLATE = "{prompt}{previous} Revised:"


def revision_prompt(template: str, prompt: str, previous: str) -> str:
    return template.format(prompt=prompt, previous=previous)


class AlgoConfig(Strict):
    beta: float = Field(0.1, gt=0, description="beta of the log-ratios (PR #1772 default 0.01).")
    alpha: float = Field(0.8, ge=0, le=1, description="Weight of the self-revision loss: "
                         "(1-alpha) L_gen + alpha L_self.")
    revision_template: str = Field(
        DEFAULT_TEMPLATE, description="Prompt of the self-reviser; must contain {prompt} and {previous}."
    )

    @field_validator("revision_template")
    @classmethod
    def _placeholders(cls, v: str) -> str:
        for key in ("{prompt}", "{previous}"):
            if key not in v:
                raise ValueError(f"must contain {key}")
        return v


def build(run):
    from aligntool.errors import UserError
    from aligntool.trainers.srpo_trainer import SRPOTrainer

    cfg: AlgoConfig = run.algo
    tok = run.tokenizer
    if "prompt" not in run.train_dataset.column_names or not isinstance(run.train_dataset[0]["prompt"], str):
        raise UserError("dataset.path: srpo needs standard (string) prompt/chosen/rejected columns with an "
                        "explicit prompt")

    def add_revision_prompts(ex):
        ids = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
        return {"rev_l_ids": ids(revision_prompt(cfg.revision_template, ex["prompt"], ex["rejected"])),
                "rev_w_ids": ids(revision_prompt(cfg.revision_template, ex["prompt"], ex["chosen"]))}

    train_data = run.train_dataset.map(add_revision_prompts, desc="Revision prompts")
    eval_data = run.eval_dataset.map(add_revision_prompts) if run.eval_dataset is not None else None
    return SRPOTrainer(model=run.policy(), ref_model=run.reference(), args=run.trl_config(), train_dataset=train_data,
                       eval_dataset=eval_data, processing_class=tok, peft_config=run.peft_config(), algo=cfg)
