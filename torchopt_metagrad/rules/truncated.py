"""Truncated backpropagation and the exact product, one HVP graph alive at a time."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

from torch import Tensor

from torchopt_metagrad.rules.base import (
    RecordProtocol,
    StepProductRule,
    check_order,
    ensure_finite,
    register,
)

__all__ = ["Exact", "Truncated"]


def _backward_product(record: RecordProtocol, g: Tensor, first: int) -> Tensor:
    """``(I + A_first) ... (I + A_{K-1}) g``, last factor first, one product at a time."""
    v = g
    for k in reversed(range(first, record.num_steps)):
        v = v + record.apply(k, v)
        ensure_finite(v, partial(_where, k, first, record.num_steps))
    return v


def _where(k: int, first: int, steps: int) -> str:
    return f"at inner step {k} (backward through inner steps {first}..{steps - 1})"


@register("truncated")
@dataclass(frozen=True)
class Truncated(StepProductRule):
    r"""Truncated backpropagation: keep only the last ``order`` steps.

    .. math:: \widehat{\nabla}_\theta L = (I - \alpha H_{K-L}) \cdots (I - \alpha H_{K-1})\, g

    Bias: exact when ``order == steps``. Cost: ``order`` serial HVPs, snapshots of
    the last ``order`` steps (O(L d)), one HVP graph alive at a time.

    Args:
        order: number of final inner steps ``L`` to differentiate through (0..steps).
    """

    order: int

    def __post_init__(self) -> None:
        check_order(self, self.order)

    def validate(self, steps: int) -> None:
        check_order(self, self.order, steps)

    def first_step(self, steps: int) -> int:
        return max(steps - self.order, 0)

    def meta_gradient(self, record: RecordProtocol, g: Tensor) -> Tensor:
        return _backward_product(record, g, record.num_steps - self.order)


@register("exact")
@dataclass(frozen=True)
class Exact(StepProductRule):
    r"""The exact meta-gradient, recomputing one step's graph at a time.

    .. math:: \nabla_\theta L = (I - \alpha H_0) \cdots (I - \alpha H_{K-1})\, g

    Bias: none (equals ``Unrolled`` to round-off). Cost: K serial HVPs, each
    rebuilt from the stored snapshot, so memory is K flat snapshots (O(K d)) plus
    one step's graph, instead of the K graphs that unrolled backprop keeps alive;
    time is about one extra inner-loss gradient per step.
    """

    def meta_gradient(self, record: RecordProtocol, g: Tensor) -> Tensor:
        return _backward_product(record, g, 0)
