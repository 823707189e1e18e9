"""The outer loop's optimizer and its learning-rate schedule, from the config.

``--outer-optimizer adam|sgd`` (``--outer-momentum`` for SGD) over the network and the
learned inner rates; ``--outer-schedule``:

* ``constant``: ``--outer-lr`` throughout;
* ``cosine``: :math:`\\eta_t = \\eta_0 (1 + \\cos(\\pi \\min(t, T) / T)) / 2`, from
  ``--outer-lr`` to 0 at ``T = --outer-decay-steps`` (then 0);
* ``step``: :math:`\\eta_t = \\eta_0 \\gamma^{\\lfloor t / T \\rfloor}` (``--outer-gamma``).

The rate is a pure function of the meta-step, set on every parameter group before each
outer step, so a resumed run needs no scheduler state to continue exactly.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import Tensor

from recipes.common.config import TrainConfig

__all__ = ["make_optimizer", "outer_lr_at", "set_outer_lr"]


def make_optimizer(config: TrainConfig, params: Iterable[Tensor]) -> torch.optim.Optimizer:
    """The outer optimizer of ``config`` over ``params``."""
    params = list(params)
    if config.outer_optimizer == "adam":
        return torch.optim.Adam(params, lr=config.outer_lr)
    if config.outer_optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.outer_lr, momentum=config.outer_momentum)
    raise ValueError(f"--outer-optimizer must be adam or sgd, got {config.outer_optimizer!r}")


def outer_lr_at(config: TrainConfig, step: int) -> float:
    """The outer learning rate for the meta-step that follows ``step`` finished ones."""
    base, horizon = config.outer_lr, config.outer_decay_steps
    if config.outer_schedule == "constant":
        return base
    if config.outer_schedule == "cosine":
        return base * 0.5 * (1.0 + math.cos(math.pi * min(step, horizon) / horizon))
    if config.outer_schedule == "step":
        return base * config.outer_gamma ** (step // horizon)
    raise ValueError(f"--outer-schedule: unknown schedule {config.outer_schedule!r}")


def set_outer_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set ``lr`` on every parameter group."""
    for group in optimizer.param_groups:
        group["lr"] = lr
