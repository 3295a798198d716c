"""aligntool's own optimizers, selected by ``train.optim`` for every trainer (TRL's and the online engine):

- ``lion_kappa``: Lion-kappa (Chen, Liu, Liang, Liu, ICLR 2024), ``LionKappa``;
- ``cosmos``: COSMOS (Liu et al. 2025), ``Cosmos``.

Their settings are the recipe's ``optimizer:`` section (``aligntool.recipe.optimizer.OptimizerConfig``). Torch is
imported only when an optimizer is built."""

from __future__ import annotations

from aligntool.recipe.optimizer import OPTIMIZERS, OptimizerConfig

__all__ = ["LionKappa", "Cosmos", "optimizer_cls_and_kwargs"]


def __getattr__(name):
    if name == "LionKappa":
        from aligntool.optim.lion_kappa import LionKappa

        return LionKappa
    if name == "Cosmos":
        from aligntool.optim.cosmos import Cosmos

        return Cosmos
    raise AttributeError(name)


def _vocab_size(model) -> int | None:
    """The vocabulary size of ``model`` (a transformers model, a PEFT wrapper, or the online engine's policy+value
    module, whose LM is ``model.lm``)."""
    for m in (model, getattr(model, "lm", None)):
        size = getattr(getattr(m, "config", None), "vocab_size", None)
        if size:
            return int(size)
    return None


def optimizer_cls_and_kwargs(recipe, args, model=None, where: str = "recipe") -> tuple[type, dict] | None:
    """(optimizer class, keyword arguments) for the recipe's ``train.optim`` when it names one of ours, else None
    (transformers builds its own). The kwargs hold ``lr`` and the ``optimizer:`` settings but no ``weight_decay``: the
    Trainer passes it per parameter group (decay / no decay), the online engine as a keyword. With ``model`` given,
    COSMOS's ``vocab_size`` defaults to the model's and every trainable matrix is checked against ``optimizer.rank``
    now, so that the error names the parameter. ``where`` (the recipe file) prefixes the error messages."""
    from aligntool.errors import UserError

    name = recipe.train.optim
    if name not in OPTIMIZERS:  # (an optimizer section without one of ours is refused when the recipe loads)
        return None
    if recipe.distributed.backend != "ddp":
        raise UserError(f"{where}: train.optim: {name} runs with distributed.backend ddp only (DeepSpeed and FSDP "
                        f"shard or flatten the weights it needs whole); use ddp or a transformers optimizer")
    o = recipe.optimizer or OptimizerConfig()
    lr = args.learning_rate
    if name == "lion_kappa":
        from aligntool.optim.lion_kappa import LionKappa

        return LionKappa, {"lr": lr, "betas": tuple(o.betas or (0.9, 0.99)), "kappa": o.kappa}
    from aligntool.optim.cosmos import Cosmos, cosmos_role

    vocab = o.vocab_size or (_vocab_size(model) if model is not None else None)
    if model is not None:
        for pname, p in model.named_parameters():
            if not p.requires_grad:
                continue
            try:
                cosmos_role(tuple(p.shape), o.rank, vocab)
            except ValueError:
                raise UserError(f"{where}: optimizer.rank: {o.rank} is larger than the smaller dimension of {pname} "
                                f"{list(p.shape)}; set optimizer.rank <= {min(p.shape)}") from None
    return Cosmos, {"lr": lr, "betas": tuple(o.betas or (0.95, 0.95)), "eps": o.eps, "rank": o.rank,
                    "gamma": o.gamma, "lr_ratio": o.lr_ratio, "nesterov": o.nesterov, "ns_steps": o.ns_steps,
                    "ns_bf16": o.ns_bf16, "vocab_size": vocab}
