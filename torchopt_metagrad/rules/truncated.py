"""Truncated backpropagation and the exact product, one HVP graph alive at a time."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import partial

from torch import Tensor

from torchopt_metagrad._core.checks import check_int
from torchopt_metagrad._core.needs import Needs
from torchopt_metagrad.rules.base import (
    Estimate,
    RecordProtocol,
    StepProductRule,
    check_order,
    ensure_finite,
    register,
)

__all__ = ["Exact", "Truncated"]


def backward_product(
    record: RecordProtocol,
    v: Tensor,
    first: int,
    last: int | None = None,
    *,
    tail: Tensor | None = None,
    chunk_size: int | None = None,
    vectorize: bool = True,
) -> Tensor | Estimate:
    """``(I + A_first) ... (I + A_{last-1}) v``, last factor first, one product at a time.

    ``v`` is the adjoint at state ``last`` (default ``K``: ``v = g``). With
    meta-parameters, the same VJPs give ``B_k^T v_{k+1}`` for ``first <= k < last``;
    ``tail`` (rows: the adjoints ``v_{k+1}`` of steps ``k = last..K-1``, already known)
    adds ``B_k^T v_{k+1}`` for those steps in one batched call; the steps before
    ``first`` (whose factors are taken as the identity) add ``B_k^T v_first``, one VJP
    graph alive at a time.
    """
    last = record.num_steps if last is None else last
    meta = None
    for k in reversed(range(first, last)):
        if record.meta_dim:
            a, b = record.pullback(k, v)
            meta = b if meta is None else meta + b
            v = v + a  # type: ignore[operator]
        else:
            v = v + record.apply(k, v)
        ensure_finite(v, partial(_where, k, first, record.num_steps))
    if not record.meta_dim:
        return v
    if tail is not None and tail.shape[0] > 0:
        late = record.meta_pullback_many(last, tail, chunk_size=chunk_size, vectorize=vectorize)
        meta = late if meta is None else meta + late
    if first > 0:
        early = record.meta_pullback_many(0, v.expand(first, *v.shape), vectorize=False)
        meta = early if meta is None else meta + early
    return Estimate(v, meta=meta)


def _where(k: int, first: int, steps: int) -> str:
    return f"at inner step {k} (backward through inner steps {first}..{steps - 1})"


@register("truncated")
@dataclass(frozen=True)
class Truncated(StepProductRule):
    r"""Truncated backpropagation: keep only the last ``order`` steps.

    .. math:: \widehat{\nabla}_\theta L = (I - \alpha H_{K-L}) \cdots (I - \alpha H_{K-1})\, g

    Meta-parameters ``w`` (a learned lr, a frozen body, ...; :math:`B_k = \partial S_k /
    \partial w`) get :math:`\sum_k B_k^\top \hat v_{k+1}` with the exact adjoints for the
    last ``L`` steps and, before them, the dropped factors taken as the identity
    (:math:`\hat v_j = v_{K-L}` for :math:`j < K-L`), as for :math:`\theta`.

    Bias: exact when ``order == steps``. Cost: ``order`` serial HVPs, snapshots of
    the last ``order`` steps (O(L d)), one HVP graph alive at a time; with
    meta-parameters, a snapshot per step (O(K d)) and ``K - L`` VJPs more.

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

    def meta_gradient(self, record: RecordProtocol, g: Tensor) -> Tensor | Estimate:
        return backward_product(record, g, record.num_steps - self.order)


@register("exact")
@dataclass(frozen=True)
class Exact(StepProductRule):
    r"""The exact meta-gradient, recomputing one step's graph at a time.

    .. math:: \nabla_\theta L = (I - \alpha H_0) \cdots (I - \alpha H_{K-1})\, g

    Meta-parameters ``w`` get the exact :math:`\sum_k B_k^\top v_{k+1}` from the same
    VJPs (:math:`B_k = \partial S_k / \partial w`).

    Bias: none (equals ``Unrolled`` to round-off). Cost: K serial HVPs, each
    rebuilt from the stored snapshot, so memory is K flat snapshots (O(K d)) plus
    one step's graph, instead of the K graphs that unrolled backprop keeps alive;
    time is about one extra inner-loss gradient per step.

    ``snapshots=n`` stores only ``n`` states (checkpoints every ``s = ceil(K/n)`` steps)
    and recomputes the others in the backward, one segment at a time (each step's loss
    replayed: the same states bit for bit): one extra forward pass (``K - n`` steps),
    memory ``n + s`` snapshots; ``n ~ sqrt(K)`` minimizes it (``tmg.adapt`` only: the
    number of steps must be known). Same result as storing every state.

    ``keep_graphs=m`` goes the other way: the last ``m`` steps keep their inner
    gradient's graph from the forward (``create_graph=True``), so the backward rebuilds
    ``K - m`` step graphs instead of ``K``: less time, ``m`` step graphs (each with its
    gradient vector) more memory (``m = K`` holds about what unrolled backprop holds;
    ``tmg.adapt`` only). The tasks of a
    meta-batch then run one after another (their graphs cannot be kept under vmap).
    Same result.

    Args:
        snapshots: the most states to store (``None``: every state).
        keep_graphs: how many of the last steps keep their graph (0: none).
    """

    snapshots: int | None = None
    keep_graphs: int = 0

    def __post_init__(self) -> None:
        # stored as plain ints (a numpy integer would turn comparisons into numpy bools)
        if self.snapshots is not None:
            object.__setattr__(self, "snapshots", check_int(self.snapshots, "snapshots", minimum=1))
        object.__setattr__(
            self, "keep_graphs", check_int(self.keep_graphs, "keep_graphs", minimum=0)
        )
        if self.snapshots is not None and self.keep_graphs:
            raise ValueError(
                "Exact: snapshots= (less memory, more time) and keep_graphs= (more memory, "
                "less time) go opposite ways; give one of them"
            )

    def needs(self, steps: int, *, meta: bool = False) -> Needs:
        needs = super().needs(steps, meta=meta)
        if self.keep_graphs:
            return dataclasses.replace(needs, kept_graphs=min(self.keep_graphs, steps))
        if self.snapshots is None:
            return needs
        return dataclasses.replace(needs, checkpoints=self.snapshots)

    def meta_gradient(self, record: RecordProtocol, g: Tensor) -> Tensor | Estimate:
        return backward_product(record, g, 0)
