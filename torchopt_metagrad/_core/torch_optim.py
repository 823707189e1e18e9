"""``torch.optim`` optimizers as torchopt's functional ones (what ``higher`` users pass).

A ``torch.optim`` optimizer updates in place and cannot be differentiated; its
hyperparameters are translated to the torchopt functional optimizer with the same update
(checked step for step against ``torch.optim`` in ``tests/test_torch_optim.py``).
Optimizers or options without a differentiable equivalent here are refused by name.
Several param groups are merged when their hyperparameters are equal.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torchopt
from torch import Tensor

__all__ = ["SUPPORTED", "check_dampening", "translate"]


def _sgd(g: dict[str, Any]) -> Any:
    return torchopt.sgd(
        g["lr"],
        momentum=g.get("momentum", 0.0),
        dampening=g.get("dampening", 0.0),
        weight_decay=g.get("weight_decay", 0.0),
        nesterov=bool(g.get("nesterov")),
        maximize=bool(g.get("maximize")),
    )


def _adam(g: dict[str, Any]) -> Any:
    return torchopt.adam(
        g["lr"],
        betas=tuple(g["betas"]),
        eps=g["eps"],
        weight_decay=g["weight_decay"],
        maximize=bool(g.get("maximize")),
    )


def _adamw(g: dict[str, Any]) -> Any:
    return torchopt.adamw(
        g["lr"],
        betas=tuple(g["betas"]),
        eps=g["eps"],
        weight_decay=g["weight_decay"],
        maximize=bool(g.get("maximize")),
    )


def _adagrad(g: dict[str, Any]) -> Any:
    return torchopt.adagrad(
        g["lr"],
        lr_decay=g["lr_decay"],
        weight_decay=g["weight_decay"],
        initial_accumulator_value=g["initial_accumulator_value"],
        eps=g["eps"],
        maximize=bool(g.get("maximize")),
    )


def _rmsprop(g: dict[str, Any]) -> Any:
    return torchopt.rmsprop(
        g["lr"],
        alpha=g["alpha"],
        eps=g["eps"],
        weight_decay=g["weight_decay"],
        momentum=g["momentum"],
        centered=g["centered"],
        maximize=bool(g.get("maximize")),
    )


_DAMPENING = (
    "optimizer: SGD with momentum and dampening is not supported: torchopt.sgd keeps its "
    "first-step rule in a closure flag, outside the optimizer state, so a replayed step "
    "would not be the forward's; use dampening=0"
)

#: optimizer class -> (translator, options that must be off)
SUPPORTED: dict[type, tuple[Callable[[dict[str, Any]], Any], tuple[str, ...]]] = {
    torch.optim.SGD: (_sgd, ()),
    torch.optim.Adam: (_adam, ("amsgrad",)),
    torch.optim.AdamW: (_adamw, ("amsgrad",)),
    torch.optim.Adagrad: (_adagrad, ()),
    torch.optim.RMSprop: (_rmsprop, ()),
}


def translate(opt: torch.optim.Optimizer) -> tuple[Any, dict[str, Any], list[Tensor]]:
    """``(torchopt optimizer, merged hyperparameters, adapted tensors)`` of ``opt``.

    Raises:
        TypeError: an optimizer class with no differentiable equivalent here.
        ValueError: an unsupported option, or param groups with different settings.
    """
    entry = SUPPORTED.get(type(opt))
    if entry is None:
        names = ", ".join(f"torch.optim.{c.__name__}" for c in SUPPORTED)
        raise TypeError(
            f"optimizer: torch.optim.{type(opt).__name__} has no differentiable equivalent "
            f"here (supported: {names}, or any torchopt functional optimizer)"
        )
    make, must_be_off = entry
    groups = opt.param_groups
    settings = [{k: v for k, v in g.items() if k != "params"} for g in groups]
    if any(s != settings[0] for s in settings[1:]):
        raise ValueError(
            f"optimizer has {len(groups)} param groups with different settings; only groups "
            "with equal hyperparameters can be merged into one inner optimizer"
        )
    group = settings[0]
    for option in must_be_off:
        if group.get(option):
            raise ValueError(f"optimizer: {type(opt).__name__} with {option}=True is not supported")
    if isinstance(opt, torch.optim.SGD) and group.get("momentum") and group.get("dampening"):
        raise ValueError(_DAMPENING)
    params = [p for g in groups for p in g["params"]]
    return make(group), group, params


def check_dampening(momentum: float, dampening: float) -> None:
    """Refuse momentum with dampening (see :data:`_DAMPENING`)."""
    if momentum and dampening:
        raise ValueError(_DAMPENING.replace("optimizer: SGD", "momentum"))
