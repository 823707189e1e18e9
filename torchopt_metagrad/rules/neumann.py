"""Implicit differentiation of the proximal inner solution (iMAML), by a Neumann series."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from functools import partial

from torch import Tensor

from torchopt_metagrad._core.checks import check_int
from torchopt_metagrad.errors import SolverWarning
from torchopt_metagrad.rules.base import (
    Estimate,
    FixedPointRule,
    RecordProtocol,
    ensure_finite,
    register,
)

__all__ = ["ImplicitNeumann", "NeumannInfo"]


@dataclass(frozen=True)
class NeumannInfo:
    """How a Neumann-series solve of :class:`ImplicitNeumann` ended.

    Attributes:
        terms: Hessian-vector products taken (terms of the series after the first).
        last_term: norm of the last term relative to the estimate's norm.
        contraction: norm ratio of the last two terms (an estimate of the spectral radius
            of ``H/reg`` along the series; the series converges when it is below 1).
    """

    terms: int
    last_term: float
    contraction: float


@register("implicit_neumann")
@dataclass(frozen=True)
class ImplicitNeumann(FixedPointRule):
    r"""Implicit MAML with the inverse approximated by a truncated Neumann series.

    At the minimizer :math:`\phi^\star` of the proximal inner problem (the front end adds
    :math:`\frac{r}{2}\|\phi - \theta\|^2`),

    .. math:: \Big(I + \frac{H}{r}\Big)^{-1} g \approx \sum_{j=0}^{J}
        \Big(-\frac{H}{r}\Big)^{j} g, \qquad H = \nabla^2 \ell(\phi^\star),

    with ``J = terms``, as torchopt's ``linalg.ns`` and hypertorch do. Written out here
    instead of calling ``torchopt.linalg.ns`` (which forms ``v - (I + H/r) v``, cancelling
    ``v``) so each term is one HVP without cancellation and the last terms' sizes can be
    reported.

    Bias: the truncation error is
    :math:`\sum_{j>J} (-H/r)^j g`, which falls geometrically like
    :math:`\rho^{J+1}` with :math:`\rho` the spectral radius of :math:`H/r`; exact in the
    limit only when :math:`\rho < 1`, i.e. ``reg`` above the largest Hessian eigenvalue
    magnitude (stricter than ``ImplicitCG``'s positive definiteness). Cost: ``terms``
    serial HVPs at the final parameters; memory O(d), no snapshots. Reports a
    :class:`NeumannInfo` through ``tmg.diagnostics.collect()`` and emits a
    :class:`~torchopt_metagrad.SolverWarning` when the terms stop shrinking (the series
    diverges: raise ``reg`` or use ``tmg.ImplicitCG``).

    Reference: Lorraine et al., "Optimizing Millions of Hyperparameters by Implicit
    Differentiation", AISTATS 2020; Rajeswaran et al., NeurIPS 2019 (iMAML).

    Args:
        reg: proximal strength ``r > 0``.
        terms: number of series terms after ``g`` (>= 1).
    """

    terms: int = field(default=20, kw_only=True)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int(self.terms, "terms", minimum=1)

    def meta_gradient(self, record: RecordProtocol, g: Tensor) -> Estimate:
        K, reg = record.num_steps, float(self.reg)
        term = g[: record.param_dim]
        total = term
        previous = float(term.norm())
        contraction = 0.0
        for j in range(1, self.terms + 1):
            term = record.hvp(K, term) * (-1.0 / reg)
            total = total + term
            ensure_finite(total, partial(_where, j))
            size = float(term.norm())
            contraction = size / previous if previous > 0 else 0.0
            previous = size
        total_norm = float(total.norm())
        info = NeumannInfo(
            terms=self.terms,
            last_term=previous / total_norm if total_norm > 0 else 0.0,
            contraction=contraction,
        )
        if contraction >= 1.0:
            warnings.warn(
                f"ImplicitNeumann: the series does not converge (the last terms grow by "
                f"{contraction:.3g}x, so ||H|| >= {contraction * reg:.3g} > reg={reg:g}); raise "
                "reg above the Hessian's largest eigenvalue or use tmg.ImplicitCG",
                SolverWarning,
                stacklevel=2,
            )
        return Estimate(total, info, self.meta_part(record, total))


def _where(j: int) -> str:
    return f"in the Neumann series at term {j}"
