"""Implicit differentiation of the proximal inner solution (iMAML), by conjugate gradient."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torchopt
from torch import Tensor

from torchopt_metagrad._core.checks import check_int, check_positive
from torchopt_metagrad.errors import SolverWarning
from torchopt_metagrad.rules.base import (
    Estimate,
    FixedPointRule,
    RecordProtocol,
    ensure_finite,
    register,
)

__all__ = ["CGInfo", "ImplicitCG"]


@dataclass(frozen=True)
class CGInfo:
    """How a conjugate-gradient solve of :class:`ImplicitCG` ended.

    Attributes:
        iterations: CG iterations taken (Hessian-vector products, not counting the
            residual checks).
        residual: final relative residual ``||b - M x|| / ||b||``, recomputed exactly.
        converged: ``residual <= tol``.
    """

    iterations: int
    residual: float
    converged: bool


@register("implicit_cg")
@dataclass(frozen=True)
class ImplicitCG(FixedPointRule):
    r"""Implicit MAML: differentiate the solution of the proximal inner problem.

    The inner loss gets the proximal term :math:`\frac{r}{2}\|\phi - \theta\|^2`
    (the front end adds it). At its minimizer :math:`\phi^\star` the implicit
    function theorem gives

    .. math:: \frac{d L(\phi^\star)}{d\theta} = \Big(I + \frac{1}{r} H\Big)^{-1} g,
        \qquad H = \nabla^2 \ell(\phi^\star),

    solved by conjugate gradient (``torchopt.linalg.cg``) with Hessian-vector
    products at the final inner parameters, warm-started at ``g``.

    Meta-parameters of the inner loss ``w`` (fixed params, a loss hyperparameter) get
    the implicit-function-theorem hypergradient :math:`-\frac1r
    (\partial^2 \ell / \partial w\, \partial\phi)^\top x` with ``x`` the CG solution
    (what ``torchopt.diff.implicit.custom_root(argnums=...)`` computes); a learned lr is
    refused (the solution does not depend on it).

    Bias: exact only when the inner loop reaches the proximal minimizer and CG
    converges; independent of the inner optimizer and of the number of steps.
    Cost: ``maxiter`` HVPs at most plus one to report the true residual; memory
    O(d), no snapshots. Assumes :math:`I + H/r` is positive definite (``r`` larger
    than minus the smallest Hessian eigenvalue). Each backward reports a
    :class:`CGInfo` through ``tmg.diagnostics.collect()``; a
    :class:`~torchopt_metagrad.SolverWarning` is emitted when CG stops above ``tol``.

    Reference: Rajeswaran et al., "Meta-Learning with Implicit Gradients",
    NeurIPS 2019.

    Args:
        reg: proximal strength ``r > 0`` (iMAML's lambda).
        maxiter: CG iteration cap (>= 1).
        tol: relative residual at which CG stops (> 0).
    """

    maxiter: int = field(default=20, kw_only=True)
    tol: float = field(default=1e-6, kw_only=True)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int(self.maxiter, "maxiter", minimum=1)
        check_positive(self.tol, "tol")

    def meta_gradient(self, record: RecordProtocol, g: Tensor) -> Estimate:
        b = g[: record.param_dim]
        operator = self.operator(record)
        iterations = 0

        def matvec(x: Tensor) -> Tensor:
            nonlocal iterations
            iterations += 1
            return operator(x)

        x = torchopt.linalg.cg(matvec, b, x0=b, rtol=self.tol, maxiter=self.maxiter)
        ensure_finite(x, lambda: "in the conjugate-gradient solve at the final inner step")
        solves = iterations - 1  # the first matvec is the initial residual
        b_norm = float(b.norm())
        residual = float((b - operator(x)).norm()) / b_norm if b_norm > 0 else 0.0
        info = CGInfo(iterations=solves, residual=residual, converged=residual <= self.tol)
        if not info.converged:
            warnings.warn(
                f"ImplicitCG: conjugate gradient stopped after {solves} iterations at relative "
                f"residual {residual:.3g} > tol={self.tol:g}; raise maxiter or reg",
                SolverWarning,
                stacklevel=2,
            )
        return Estimate(x, info, self.meta_part(record, x))
