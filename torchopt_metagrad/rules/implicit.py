"""Implicit differentiation of the proximal inner solution (iMAML), by conjugate gradient."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torchopt
from torch import Tensor

from torchopt_metagrad._ode import check_tolerance
from torchopt_metagrad.errors import SolverWarning
from torchopt_metagrad.rules.base import AbstractRule, StepJacobians, ensure_finite, register

__all__ = ["CGInfo", "ImplicitCG"]


@dataclass(frozen=True)
class CGInfo:
    """How the last conjugate-gradient solve of an :class:`ImplicitCG` rule ended.

    Attributes:
        iterations: CG iterations taken (Hessian-vector products, not counting the
            residual checks).
        residual: final relative residual ``||b - M x|| / ||b||``, recomputed exactly.
        converged: ``residual <= tol``.
    """

    iterations: int
    residual: float
    converged: bool


class _SolveLog:
    """Mutable slot for the last solve's info (rules themselves stay frozen)."""

    def __init__(self) -> None:
        self.last: CGInfo | None = None
        self.solves = 0


@register("implicit_cg")
@dataclass(frozen=True)
class ImplicitCG(AbstractRule):
    r"""Implicit MAML: differentiate the solution of the proximal inner problem.

    The inner loss gets the proximal term :math:`\frac{r}{2}\|\phi - \theta\|^2`
    (``tmg.adapt`` adds it). At its minimizer :math:`\phi^\star` the implicit
    function theorem gives

    .. math:: \frac{d L(\phi^\star)}{d\theta} = \Big(I + \frac{1}{r} H\Big)^{-1} g,
        \qquad H = \nabla^2 \ell(\phi^\star),

    solved by conjugate gradient (``torchopt.linalg.cg``) with Hessian-vector
    products at the final inner parameters, warm-started at ``g``.

    Bias: exact only when the inner loop reaches the proximal minimizer and CG
    converges; independent of the inner optimizer and of the number of steps.
    Cost: ``maxiter`` HVPs at most plus one to report the true residual; memory
    O(d), no snapshots. Assumes :math:`I + H/r` is positive definite (``r`` larger
    than minus the smallest Hessian eigenvalue). After each backward,
    :attr:`info` holds the iteration count and final residual; a
    :class:`~torchopt_metagrad.SolverWarning` is emitted when CG stops above ``tol``.

    Reference: Rajeswaran et al., "Meta-Learning with Implicit Gradients",
    NeurIPS 2019.

    Args:
        reg: proximal strength ``r > 0`` (iMAML's lambda).
        maxiter: CG iteration cap (>= 1).
        tol: relative residual at which CG stops (> 0).
    """

    reg: float
    maxiter: int = field(default=20, kw_only=True)
    tol: float = field(default=1e-6, kw_only=True)
    _log: _SolveLog = field(
        default_factory=_SolveLog, init=False, repr=False, compare=False, hash=False
    )

    supports_per_step_batches = False
    uses_step_jacobians = False
    uses_hessians = True

    def __post_init__(self) -> None:
        check_tolerance(self.reg, "reg")
        if isinstance(self.maxiter, bool) or not isinstance(self.maxiter, int):
            raise TypeError(f"maxiter must be an int >= 1, got {self.maxiter!r}")
        if self.maxiter < 1:
            raise ValueError(f"maxiter must be >= 1, got {self.maxiter}")
        check_tolerance(self.tol, "tol")

    @property
    def proximal_reg(self) -> float:
        return float(self.reg)

    @property
    def info(self) -> CGInfo | None:
        """The last solve's :class:`CGInfo` (``None`` before the first backward)."""
        return self._log.last

    def first_step_needed(self, steps: int) -> int:
        return steps

    def meta_gradient(self, jac: StepJacobians, g: Tensor) -> Tensor:
        K, reg = jac.num_steps, float(self.reg)
        b = g[: jac.param_dim]
        iterations = 0

        def matvec(x: Tensor) -> Tensor:
            nonlocal iterations
            iterations += 1
            return x + jac.hvp(K, x) / reg

        x = torchopt.linalg.cg(matvec, b, x0=b, rtol=self.tol, maxiter=self.maxiter)
        ensure_finite(x, lambda: "in the conjugate-gradient solve at the final inner step")
        solves = iterations - 1  # the first matvec is the initial residual
        b_norm = float(b.norm())
        residual = float((b - matvec(x)).norm()) / b_norm if b_norm > 0 else 0.0
        info = CGInfo(iterations=solves, residual=residual, converged=residual <= self.tol)
        self._log.last = info
        self._log.solves += 1
        if not info.converged:
            warnings.warn(
                f"ImplicitCG: conjugate gradient stopped after {solves} iterations at relative "
                f"residual {residual:.3g} > tol={self.tol:g}; raise maxiter or reg",
                SolverWarning,
                stacklevel=2,
            )
        return x
