"""SPO: Self-supervised Preference Optimization with preference-degree awareness (Li et al. 2024, arXiv 2409.17791).

    L = L_DPO-family(pairs) + lam * L_SSL,    L_SSL = cross-entropy(head(h(x, y_d)), d)

where y_d is the chosen response with a graded amount of its *key content* removed (degree d = 0 .. D-1, d = 0 is
the response itself) and h is the policy's final hidden state at the last response token. Learning to tell how much
key content a response lost makes the policy's representation aware of degrees of preference.

The paper's code is not public (its repository holds only a licence); every open detail is a choice of ours, made
explicit here and exposed as an option:
- key content = the response's content words: words of at least ``min_key_word_length`` letters that are not in a
  small stop-word list (the paper extracts key content with an LLM; the heuristic needs no second model);
- degree d removes the fraction ``removal_ratios[d]`` of those words (default 0, 1/2, 1: D = 3 classes), chosen with
  a per-example seeded RNG so the degraded data is deterministic;
- degraded versions are made of the chosen response (``degrade: chosen``) or of both responses (``both``);
- the head is one linear layer on the last-token hidden state, trained jointly. It is registered on the policy
  (``policy.spo_head``), so DDP averages its gradients, the optimizer and DeepSpeed/FSDP see it like any weight;
  every save (checkpoints and the final folder) writes it to ``spo_head.safetensors`` and keeps it out of the model
  weights (the model folder stays a plain causal LM), and ``--resume`` restores it from there;
- the alignment loss is TRL's DPO loss of ``loss_type`` (any type TRL offers) and ``beta``; lam = ``ssl_weight``.
"""

from __future__ import annotations

import random
import re

from pydantic import Field, field_validator

from aligntool.recipe.base import Strict

STOP_WORDS = frozenset(
    "the a an and or but was were is are be been it its this that with for from into of on in at to by as i you he she "
    "we they them their our my your his her there here then than so very quite really rather also just".split()
)
_WORD = re.compile(r"\S+")


def degrade(text: str, ratio: float, rng: random.Random, min_len: int = 4) -> str:
    """``text`` with the fraction ``ratio`` of its key-content words removed (whitespace kept tidy)."""
    words = _WORD.findall(text)
    key = [i for i, w in enumerate(words) if len(re.sub(r"\W", "", w)) >= min_len and w.lower() not in STOP_WORDS]
    drop = set(rng.sample(key, round(ratio * len(key)))) if key else set()
    kept = " ".join(w for i, w in enumerate(words) if i not in drop)
    return (" " if text.startswith(" ") else "") + kept


class AlgoConfig(Strict):
    beta: float = Field(0.1, gt=0, description="beta of the DPO-family loss.")
    loss_type: str = Field("sigmoid", description="DPO-family loss of TRL the SSL term is added to.")
    ssl_weight: float = Field(0.1, ge=0, description="lambda: weight of the self-supervised degree loss.")
    removal_ratios: list[float] = Field([0.0, 0.5, 1.0], min_length=2, description="Fraction removed at each degree.")
    degrade: str = Field("chosen", pattern="^(chosen|both)$", description="Which responses get degraded versions.")
    min_key_word_length: int = Field(4, ge=1, description="Key-content words have at least this many letters.")
    seed: int = Field(0, description="Seed of which key words each degree removes.")

    @field_validator("removal_ratios")
    @classmethod
    def _ratios(cls, v):
        if any(not 0 <= r <= 1 for r in v) or sorted(v) != v or len(set(v)) != len(v):
            raise ValueError("must be distinct, increasing fractions in [0, 1]")
        return v

    @field_validator("loss_type")
    @classmethod
    def _loss(cls, v):
        from aligntool.trainers.dpo import check_loss_types

        return check_loss_types(v)

    trl_fields = ("beta", "loss_type")  # the DPO-family part is TRL's own loss


def build(run):
    cfg: AlgoConfig = run.algo
    tok = run.tokenizer
    sources = ["chosen"] if cfg.degrade == "chosen" else ["chosen", "rejected"]
    if not isinstance(run.train_dataset[0]["chosen"], str):
        from aligntool.errors import UserError

        raise UserError("dataset.path: spo needs standard (string) chosen/rejected columns")

    def add_degraded(ex, idx):
        rng = random.Random(cfg.seed * 1_000_003 + idx)
        out = {}
        for src in sources:
            for d, ratio in enumerate(cfg.removal_ratios):
                text = degrade(ex[src], ratio, rng, cfg.min_key_word_length)
                out[f"spo_{src}_{d}"] = tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        return out

    columns = [f"spo_{src}_{d}" for src in sources for d in range(len(cfg.removal_ratios))]
    train_data = run.train_dataset.map(add_degraded, with_indices=True, desc="SPO degraded responses")
    eval_data = run.eval_dataset.map(add_degraded, with_indices=True) if run.eval_dataset is not None else None
    from aligntool.trainers.spo_trainer import SPOTrainer

    return SPOTrainer(model=run.policy(), ref_model=run.reference(), args=run.trl_config(),
                      train_dataset=train_data, eval_dataset=eval_data, processing_class=tok,
                      peft_config=run.peft_config(), algo=cfg, spo_columns=columns)
