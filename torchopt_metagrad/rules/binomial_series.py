r"""The stages of the binomial expansion, its regime check and its automatic order.

Helpers of :class:`~torchopt_metagrad.rules.binomial.Binomial` (no rule here). Notation
of ``DESIGN.md``: :math:`s_m^{(j)}` is the sum of the terms of degree :math:`\le m` of
:math:`(I + A_j) \cdots (I + A_{K-1})\, g`, and stage ``m`` computes
:math:`s_m^{(j)} = s_{m-1}^{(K-m+1)} + \sum_{i=j}^{K-m} w_i` with the independent
products :math:`w_i = A_i s_{m-1}^{(i+1)}`, one batched call.

**Regime check** (fixed order ``L``), from the products the stages compute anyway:
:math:`\hat\rho_k = \max_m \|w_k\| / \|s_{m-1}^{(k+1)}\|` is a Rayleigh-like lower
estimate of :math:`\|A_k\|` (:math:`\mathrm{lr}\,\|H_k\|` for gradient descent) along
the vectors the expansion actually multiplies. The terms of degree ``n`` are bounded by
:math:`e_n(\|A_0\|, \dots, \|A_{K-1}\|)\,\|g\|` (:math:`e_n`: the elementary symmetric
polynomial), so everything ``Binomial(L)`` drops is bounded by
:math:`\sum_{n > L} e_n = \prod_k (1 + \|A_k\|) - \sum_{n \le L} e_n` times
:math:`\|g\|`, and

.. math:: \eta_L = \Bigl(\prod_k (1 + \hat\rho_k) - \sum_{n \le L}
    e_n(\hat\rho)\Bigr)\, \|g\| / \|s_L^{(0)}\|

estimates the dropped part relative to the estimate (on the sine grid the actual error is
a median 1.0x / 1.7x of it for ``L`` = 1 / 2). The expansion is flagged unreliable when
:math:`\eta_L >` :data:`REGIME_THRESHOLD`. Cost: two norms per product row and an
O(K L) recursion on K numbers, no extra product.

**Automatic order**: run the stages over the full range :math:`j \in [0, K-m]`
(``K-m+1`` products at stage ``m`` instead of ``K-L+1``), so every stage ends with
:math:`s_m^{(0)}` whatever the final order; stop at the first ``m`` where the stage's
contribution :math:`\|s_m^{(0)} - s_{m-1}^{(0)}\| \le \mathrm{tol}\,\|s_m^{(0)}\|`.
It gives up at ``max_order``, or earlier when the series diverges for now: a stage whose
contribution is at least the estimate's norm and larger than the previous stage's (the
terms of degree ``m`` still grow, so reaching ``tol`` would take many more stages).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor

from torchopt_metagrad._core.budget import Memory, measure_peak, rows_per_call
from torchopt_metagrad.rules.base import RecordProtocol, ensure_finite

__all__ = [
    "REGIME_THRESHOLD",
    "BinomialInfo",
    "Products",
    "auto_stages",
    "dropped_term",
    "elementary_symmetric",
    "fixed_stages",
    "regime",
]

#: ``Binomial(L)`` warns when the estimated dropped part exceeds this fraction of its
#: estimate. Measured on the sine MLP (float64, 16 tasks: ``python
#: benchmarks/bench_regime.py --sections threshold --tasks 16``): on the grid lr in
#: {0.001, 0.003, 0.01, 0.03} x K in {5, 10, 20}, the estimate stays at most 0.061 for
#: ``Binomial(2)`` on every task wherever its mean error is below a tenth of
#: ``Truncated(2)``'s, and reaches 3.8 or more on some task wherever ``Binomial(1)``'s
#: mean error exceeds ``Truncated(1)``'s. Within that range, 0.15 is where it never
#: warned for an actual error below 10% and always warned above 30% (``L`` = 1, 2; 192
#: cases each).
REGIME_THRESHOLD = 0.15


@dataclass(frozen=True)
class BinomialInfo:
    r"""What one backward of ``Binomial`` computed (read it with ``tmg.diagnostics.collect``).

    Attributes:
        order: the order of the returned estimate (``order="auto"``: the one chosen;
            ``steps`` when it fell back to the exact product).
        auto: whether the order was chosen automatically.
        dropped: fixed order with ``check``: :math:`\eta_L`, the estimated norm of all the
            terms it drops relative to the estimate (0 when ``order == steps``); else
            ``None``.
        contribution: ``order="auto"``: the last stage's contribution relative to the
            estimate, :math:`\|s_L^{(0)} - s_{L-1}^{(0)}\| / \|s_L^{(0)}\|`; else ``None``.
        reliable: ``False`` when the check flagged the expansion (``dropped`` above
            ``REGIME_THRESHOLD``) or the automatic order fell back; ``None`` unchecked.
        fell_back: ``order="auto"`` did not reach ``tol`` by ``max_order`` and returned
            the exact product.
        step_norms: fixed order with ``check``: :math:`\hat\rho_k`, the per-step lower
            estimates of :math:`\|A_k\|` (``lr ||H_k||``), ``k = 0..K-1``.
        tried: ``order="auto"``: the highest order whose stage ran.
    """

    order: int
    auto: bool = False
    dropped: float | None = None
    contribution: float | None = None
    reliable: bool | None = None
    fell_back: bool = False
    step_norms: tuple[float, ...] | None = None
    tried: int | None = None


def elementary_symmetric(values: list[float], n: int) -> float:
    """:math:`e_n(x_1, \\dots, x_K)`, the sum of the products of ``n`` distinct values."""
    e = [1.0] + [0.0] * n
    for x in values:
        for j in range(n, 0, -1):
            e[j] += e[j - 1] * x
    return e[n]


def _ratios(w: Tensor, v: Tensor) -> Tensor:
    """``||w|| / ||v||`` over the last dimension (0 where ``v`` is 0): per row (and task)."""
    wn, vn = w.norm(dim=-1), v.norm(dim=-1)
    return torch.where(vn > 0, wn / vn.clamp_min(torch.finfo(vn.dtype).tiny), 0.0)


def norms(x: Tensor) -> list[float]:
    """The norm of ``x`` per task (vectors of tasks under ``vmap`` carry a task dimension)."""
    return x.reshape(-1, x.shape[-1]).norm(dim=-1).tolist()


@dataclass
class Products:
    """How a backward's stages evaluate their products: ``w_i = scale * A_i v_i``.

    ``chunk_size`` (rows per batched call) is given, or chosen from ``memory`` at the
    first call with more than one row (``tmg._core.budget``): its first product runs
    alone under a live-memory probe, the others in calls of as many rows as the budget
    allows (one row: a plain loop, no ``vmap``). ``scale``: ``1`` for the paper's
    expansion, ``L / K`` for ``hessian_scale="code"``.
    """

    chunk_size: int | None
    memory: Memory
    vectorize: bool
    scale: float = 1.0

    def __call__(self, record: RecordProtocol, start: int, vectors: Tensor) -> Tensor:
        n = vectors.shape[0]
        if self.chunk_size is None and self.memory is not None and self.vectorize and n > 1:
            first, peak = measure_peak(lambda: record.apply(start, vectors[0]))
            self.chunk_size = rows_per_call(self.memory, peak, record.num_steps)
            rest = self._many(record, start + 1, vectors[1:])
            w = torch.cat([first[None], rest])
        else:
            w = self._many(record, start, vectors)
        return w if self.scale == 1 else w * self.scale

    def _many(self, record: RecordProtocol, start: int, vectors: Tensor) -> Tensor:
        looped = not self.vectorize or self.chunk_size == 1
        return record.apply_many(start, vectors, chunk_size=self.chunk_size, vectorize=not looped)


def fixed_stages(
    record: RecordProtocol,
    g: Tensor,
    order: int,
    products: Products,
    *,
    check: bool,
) -> tuple[Tensor, list[Tensor], Tensor | None]:
    """The stage algorithm of ``Binomial(order)``, ``1 <= order <= K``.

    Returns ``(s, exact, rho)``: ``s[j] = s_L^{(j)}`` for ``j in [0, K-L]``; ``exact``
    the vectors ``s_m^{(K-m)} = v_{K-m}`` (exact adjoints) for ``m = 0 .. L-1``; ``rho``
    the per-step ratio estimates, ``(K, *tasks)`` (``None`` without ``check``).
    """
    K, L = record.num_steps, order
    # prev[r] = s_{m-1}^{(j)} for j = L - m + 1 + r; at m = 1 that is j in [L, K].
    prev = g.expand(K - L + 1, *g.shape)
    exact = [g]  # s_m^{(K-m)} = v_{K-m} exactly (all m steps' terms), m = 0..L-1
    rho = g.new_zeros(K, *g.shape[:-1]) if check else None
    for m in range(1, L + 1):
        lo = L - m  # this stage's products are w_i, i in [L - m, K - m]
        w = products(record, lo, prev)
        ensure_finite(w, partial(where, w, m, lo))
        if rho is not None:
            rows = slice(lo, lo + w.shape[0])
            rho[rows] = torch.maximum(rho[rows], _ratios(w, prev))
        # s_m^{(j)} = s_{m-1}^{(K-m+1)} + sum_{i=j}^{K-m} w_i  for j in [L - m, K - m]
        prev = prev[-1] + w.flip(0).cumsum(0).flip(0)
        if m < L:
            exact.append(prev[-1])
    return prev, exact, rho


def dropped_term(rho: list[float], order: int, g_norm: float, estimate_norm: float) -> float:
    r""":math:`\eta_L = \sum_{n > L} e_n(\hat\rho)\,\|g\| / \|\hat g_L\|` (module docstring).

    The tail is ``prod(1 + rho) - sum_{n <= L} e_n``, at least ``e_{L+1}`` (which guards
    the subtraction's round-off when the tail is tiny); an overflow gives ``inf``.
    """
    if order >= len(rho):
        return 0.0  # the whole product: nothing dropped
    e = [1.0] + [0.0] * (order + 1)
    for x in rho:
        for j in range(order + 1, 0, -1):
            e[j] += e[j - 1] * x
    tail = max(math.prod(1.0 + x for x in rho) - math.fsum(e[: order + 1]), e[order + 1])
    bound = tail * g_norm
    if bound == 0.0:
        return 0.0
    return bound / estimate_norm if estimate_norm > 0 else math.inf


def regime(rho: Tensor, order: int, g: Tensor, estimate: Tensor) -> tuple[float, list[float]]:
    r"""``(eta, per-step rho)``: the worst task's :math:`\eta_L`, and each step's largest
    ratio over tasks (a single task without ``vmap``)."""
    K = rho.shape[0]
    per_task = rho.reshape(K, -1)
    eta = max(
        dropped_term(r, order, gn, en)
        for r, gn, en in zip(per_task.T.tolist(), norms(g), norms(estimate), strict=True)
    )
    return eta, per_task.amax(1).tolist()


@dataclass
class AutoResult:
    """The outcome of :func:`auto_stages`."""

    order: int
    converged: bool
    contribution: float
    growing: bool  # gave up early: the terms still grow
    s: Tensor  # s_L^{(j)}, j in [0, K-L]
    exact: list[Tensor]  # s_m^{(K-m)} = v_{K-m}, m = 0..L (the last only when not converged)


def auto_stages(
    record: RecordProtocol,
    g: Tensor,
    products: Products,
    *,
    tol: float,
    max_order: int,
) -> AutoResult:
    """Stages over the full ranges until the last one's contribution is ``<= tol``.

    Stops at order ``K`` (the exact product), ``min(max_order, K)``, or at a stage whose
    contribution is ``>= 1`` and larger than the previous one (not converged).
    """
    K = record.num_steps
    top = min(max_order, K)
    prev = g.expand(K + 1, *g.shape)  # s_0^{(j)} = g, j in [0, K]
    exact = [g]
    contribution = math.inf
    for m in range(1, top + 1):
        w = products(record, 0, prev[1:])
        ensure_finite(w, partial(where, w, m, 0))
        cur = prev[-1] + w.flip(0).cumsum(0).flip(0)  # s_m^{(j)}, j in [0, K - m]
        last, contribution = (
            contribution,
            max(
                c / n if n > 0 else (0.0 if c == 0 else math.inf)
                for c, n in zip(norms(cur[0] - prev[0]), norms(cur[0]), strict=True)
            ),
        )
        if m == K or contribution <= tol:
            return AutoResult(m, True, contribution, False, cur, exact)
        exact.append(cur[-1])
        prev = cur
        if m >= 2 and contribution >= 1 and contribution > last:
            return AutoResult(m, False, contribution, True, prev, exact)
    return AutoResult(top, False, contribution, False, prev, exact)


def where(w: Tensor, m: int, lo: int) -> str:
    bad = (~w.isfinite()).flatten(1).any(1).nonzero().flatten().tolist()
    steps = ", ".join(str(lo + r) for r in bad)
    return f"in stage {m} at the Hessian-vector product(s) of inner step(s) {steps}"
