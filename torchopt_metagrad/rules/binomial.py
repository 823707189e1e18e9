"""BinomMAML: the truncated binomial expansion of the meta-gradient product."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor

from torchopt_metagrad.rules.base import (
    Estimate,
    RecordProtocol,
    StepProductRule,
    check_order,
    ensure_finite,
    register,
)

__all__ = ["Binomial"]


@register("binomial")
@dataclass(frozen=True)
class Binomial(StepProductRule):
    r"""Truncated binomial expansion of the meta-gradient (BinomMAML).

    With :math:`A_k = -\alpha H_k` (or :math:`J_k^\top - I` for a general step
    map), expand :math:`(I + A_0) \cdots (I + A_{K-1})\, g` and keep every term of
    degree at most :math:`L`:

    .. math::
        \widehat{\nabla}_\theta L = \sum_{l=0}^{L}
        \sum_{0 \le k_1 < \dots < k_l \le K-1} A_{k_1} \cdots A_{k_l}\, g .

    Computed by the stage algorithm: with :math:`s_m^{(j)}` the sum of the terms
    of degree :math:`\le m` that use only steps :math:`j..K-1`,
    :math:`s_m^{(j)} = g + \sum_{i \ge j} A_i s_{m-1}^{(i+1)}`; stage ``m`` needs
    the ``K-L+1`` products :math:`w_i = A_i s_{m-1}^{(i+1)}`,
    :math:`i \in [L-m, K-m]`, at different snapshots, all independent, so they
    are one batched (``vmap``) call; the estimate is :math:`s_L^{(0)}`.

    Meta-parameters ``w`` (a learned lr, a frozen body, ...; :math:`B_k = \partial S_k /
    \partial w`) get :math:`\sum_k B_k^\top \hat v_{k+1}` with :math:`\hat v_j =
    s_L^{(j)}`, the degree-:math:`\le L` partial sum of the product from step ``j`` (exact
    for the last ``L`` steps): one more batched call of K VJPs.

    Bias: exact when ``order == steps``; ``order == 0`` is first-order MAML; the
    dropped terms are :math:`O(\alpha^{L+1})`. Cost: ``order * (K-order+1)``
    HVPs in ``order`` serial batched calls; memory: K snapshots, O((K-L+1) d)
    for the stage vectors, and the stage's batched HVP graph, which holds up to
    ``K-L+1`` single-HVP graphs at once (``chunk_size`` bounds it to that many;
    without it, at large K this can exceed the unrolled graph's memory).
    ``vectorize=False`` keeps one HVP graph at a time. On a GPU the batched call
    runs the stage's HVPs in parallel; on a CPU it mainly saves Python overhead
    (faster for small models, not for convolutional ones).

    This project implements the expansion exactly as written in the paper (factor
    ``lr`` per Hessian); the public BinomMAML code scales the Hessian terms by
    ``lr * L / K`` instead, which is a different estimator.

    Reference: "Binomial Gradient-Based Meta-Learning for Enhanced Meta-Gradient
    Estimation", ICLR 2026.

    Args:
        order: the truncation degree ``L`` (0..steps).
        chunk_size: evaluate at most this many of a stage's HVPs at once (bounds
            memory); ``None`` evaluates the whole stage in one call.
        vectorize: ``False`` evaluates a stage's HVPs one by one in a Python loop
            (same result; for comparisons and for models ``vmap`` cannot handle).
    """

    order: int
    chunk_size: int | None = None
    vectorize: bool = True

    def __post_init__(self) -> None:
        check_order(self, self.order)
        if self.chunk_size is not None and (
            isinstance(self.chunk_size, bool)
            or not isinstance(self.chunk_size, int)
            or self.chunk_size < 1
        ):
            raise ValueError(f"chunk_size must be None or an int >= 1, got {self.chunk_size!r}")
        if not isinstance(self.vectorize, bool):
            raise TypeError(f"vectorize must be a bool, got {self.vectorize!r}")

    def validate(self, steps: int) -> None:
        check_order(self, self.order, steps)

    def first_step(self, steps: int) -> int:
        return 0 if self.order > 0 else steps

    def meta_gradient(self, record: RecordProtocol, g: Tensor) -> Tensor | Estimate:
        K, L = record.num_steps, self.order
        if L == 0:
            if not record.meta_dim:
                return g
            return Estimate(g, meta=self._meta(record, g.expand(K, *g.shape)))
        # prev[r] = s_{m-1}^{(j)} for j = L - m + 1 + r; at m = 1 that is j in [L, K].
        prev = g.expand(K - L + 1, *g.shape)
        exact = [g]  # s_m^{(K-m)} = v_{K-m} exactly (all m steps' terms), m = 0..L-1
        for m in range(1, L + 1):
            lo = L - m  # this stage's products are w_i, i in [L - m, K - m]
            w = record.apply_many(lo, prev, chunk_size=self.chunk_size, vectorize=self.vectorize)
            ensure_finite(w, partial(_where, w, m, lo))
            # s_m^{(j)} = s_{m-1}^{(K-m+1)} + sum_{i=j}^{K-m} w_i  for j in [L - m, K - m]
            prev = prev[-1] + w.flip(0).cumsum(0).flip(0)
            if m < L:
                exact.append(prev[-1])
        if not record.meta_dim:
            return prev[0]
        # v_hat_j = s_L^{(j)}: prev[j] for j in [1, K - L], then v_{K-L+1..K} exactly.
        adjoints = torch.cat([prev[1:], torch.stack(exact[::-1])])
        return Estimate(prev[0], meta=self._meta(record, adjoints))

    def _meta(self, record: RecordProtocol, adjoints: Tensor) -> Tensor:
        """``sum_k B_k^T adjoints[k]`` (``adjoints[k]`` estimates ``v_{k+1}``)."""
        return record.meta_pullback_many(
            0, adjoints, chunk_size=self.chunk_size, vectorize=self.vectorize
        )


def _where(w: Tensor, m: int, lo: int) -> str:
    bad = (~w.isfinite()).flatten(1).any(1).nonzero().flatten().tolist()
    steps = ", ".join(str(lo + r) for r in bad)
    return f"in stage {m} at the Hessian-vector product(s) of inner step(s) {steps}"
