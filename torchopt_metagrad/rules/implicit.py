"""Implicit differentiation of the proximal inner solution (iMAML), by a Krylov solve."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from torch import Tensor

from torchopt_metagrad._core.checks import check_int, check_positive
from torchopt_metagrad.errors import NonFiniteError, SolverWarning
from torchopt_metagrad.rules.base import (
    Estimate,
    FixedPointRule,
    RecordProtocol,
    ensure_finite,
    register,
)
from torchopt_metagrad.rules.linear_solvers import SOLVERS, STARTS, solve

__all__ = ["GAIN_LIMIT", "CGInfo", "ImplicitCG", "TorchoptSolve"]

#: ``||x|| / ||g||`` above which the solve is reported as (nearly) singular. With
#: ``H`` positive semidefinite (a proximal minimum of a convex-near-the-solution loss)
#: the eigenvalues of ``I + H/reg`` are >= 1 and the gain is <= 1; a gain of 100 needs an
#: eigenvalue of size <= 0.01, i.e. ``H`` has an eigenvalue within ``reg/100`` of ``-reg``.
GAIN_LIMIT = 100.0


@dataclass(frozen=True)
class CGInfo:
    """How the linear solve of an implicit rule ended (``tmg.diagnostics.collect()``).

    Attributes:
        iterations: solver iterations taken.
        residual: final relative residual ``||g - M x|| / ||g||`` with ``M = I + H/reg``,
            recomputed exactly (one extra product).
        converged: ``residual <= tol``.
        solver: the linear solver (``"cg"``, ``"normal_cg"``, ``"minres"``, or the
            name of a torchopt solve function).
        products: Hessian-vector products of the solve (``normal_cg``: two per iteration).
        min_curvature: smallest ``v^T M v / v^T v`` over the vectors the solver multiplied;
            ``<= 0`` proves ``M`` is indefinite (``nan`` if not tracked).
        gain: ``||x|| / ||g||``, the meta-gradient's size relative to the outer gradient
            (``<= 1`` when ``H`` is positive semidefinite).
        stationarity: ``||grad F(phi)|| / ||grad F(phi_0)||`` for the proximal inner
            objective ``F = l + reg/2 ||phi - theta||^2`` at the returned params ``phi``
            and the inner loop's start ``phi_0`` (``tmg.custom_root``: the optimality
            function at the solution and at the solver's first argument); ``None`` when
            the front end cannot recompute the inner loss.
    """

    iterations: int
    residual: float
    converged: bool
    solver: str = "minres"
    products: int = 0
    min_curvature: float = math.nan
    gain: float = math.nan
    stationarity: float | None = None

    @property
    def negative_curvature(self) -> bool:
        """True when the solver met a direction with ``v^T M v <= 0``."""
        return self.min_curvature <= 0


@register("implicit_cg")
@dataclass(frozen=True)
class ImplicitCG(FixedPointRule):
    r"""Implicit MAML: differentiate the solution of the proximal inner problem.

    The inner loss gets the proximal term :math:`\frac{r}{2}\|\phi - \theta\|^2`
    (the front end adds it). At its minimizer :math:`\phi^\star` the implicit
    function theorem gives

    .. math:: \frac{d L(\phi^\star)}{d\theta} = \Big(I + \frac{1}{r} H\Big)^{-1} g,
        \qquad H = \nabla^2 \ell(\phi^\star),

    solved with Hessian-vector products at the final inner parameters by a Krylov
    method (the name is iMAML's; ``solver`` picks the method):

    * ``"minres"`` (default): MINRES, one HVP per iteration; the residual never
      increases, also when :math:`I + H/r` is indefinite (an inner loop stopped short of
      the minimum, a saddle). From ``x0="zero"`` it is never worse than returning zero.
    * ``"cg"``: conjugate gradient (``torchopt.linalg.cg``), the iMAML paper's solver, one
      HVP per iteration; best on a positive definite system, unreliable on an indefinite
      one (a :class:`~torchopt_metagrad.SolverWarning` says so when CG meets
      :math:`v^\top (I + H/r) v \le 0`).
    * ``"normal_cg"``: CG on :math:`(I + H/r)^2 x = (I + H/r) g`, what torchopt's
      ``custom_root`` uses by default; two HVPs per iteration, residual monotone.

    ``x0`` is the start: ``"zero"`` (default) or ``"rhs"`` (``x0 = g``, exact when
    :math:`H = 0`; can be far worse than zero on an indefinite system).

    Meta-parameters of the inner loss ``w`` (fixed params, a loss hyperparameter) get
    the implicit-function-theorem hypergradient :math:`-\frac1r
    (\partial^2 \ell / \partial w\, \partial\phi)^\top x` with ``x`` the solution
    (what ``torchopt.diff.implicit.custom_root(argnums=...)`` computes); a learned lr is
    refused (the solution does not depend on it).

    Bias: exact only when the inner loop reaches a stationary point of the proximal
    objective and the solve converges; independent of the inner optimizer and of the
    number of steps. Cost: ``maxiter`` HVPs at most (``normal_cg``: twice that) plus one
    for the true residual, and two inner-loss gradients for the stationarity check;
    memory O(d), no snapshots. Each backward reports a :class:`CGInfo`
    through ``tmg.diagnostics.collect()`` and warns (:class:`~torchopt_metagrad.SolverWarning`)
    when the solve stops above ``tol``, when CG meets negative curvature, when the
    meta-gradient is more than :data:`GAIN_LIMIT` times the outer gradient (a nearly
    singular system), and when the inner loop is far from stationary
    (``stationarity > inner_tol``).

    Reference: Rajeswaran et al., "Meta-Learning with Implicit Gradients",
    NeurIPS 2019; Paige & Saunders, "Solution of sparse indefinite systems of linear
    equations", SIAM J. Numer. Anal. 1975 (MINRES).

    Args:
        reg: proximal strength ``r > 0`` (iMAML's lambda).
        maxiter: solver iteration cap (>= 1).
        tol: relative residual at which the solver stops (> 0).
        solver: ``"minres"``, ``"cg"`` or ``"normal_cg"``.
        x0: ``"zero"`` or ``"rhs"``.
        inner_tol: warn when the inner objective's gradient norm at the returned params is
            above this fraction of its norm at the start (``None``: no check, and no
            gradient evaluations for it).
    """

    maxiter: int = field(default=20, kw_only=True)
    tol: float = field(default=1e-6, kw_only=True)
    solver: Literal["minres", "cg", "normal_cg"] = field(default="minres", kw_only=True)
    x0: Literal["zero", "rhs"] = field(default="zero", kw_only=True)
    inner_tol: float | None = field(default=0.1, kw_only=True)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int(self.maxiter, "maxiter", minimum=1)
        check_positive(self.tol, "tol")
        if self.solver not in SOLVERS:
            raise ValueError(f"solver must be one of {', '.join(SOLVERS)}, got {self.solver!r}")
        if self.x0 not in STARTS:
            raise ValueError(f"x0 must be one of {', '.join(STARTS)}, got {self.x0!r}")
        if self.inner_tol is not None:
            check_positive(self.inner_tol, "inner_tol")

    def meta_gradient(self, record: RecordProtocol, g: Tensor) -> Estimate:
        b = g[: record.param_dim]
        operator = self.operator(record)
        out = solve(operator, b, solver=self.solver, x0=self.x0, maxiter=self.maxiter, tol=self.tol)
        where = f"in the {self.solver} solve at the final inner step"
        ensure_finite(out.x, lambda: where)
        info = _finish(self, record, operator, b, out.x, self.solver, out.iterations,
                       out.products, out.min_curvature)  # fmt: skip
        return Estimate(out.x, info, self.meta_part(record, out.x))


#: ``TorchoptSolve``'s default residual tolerance (see its ``tol``).
TORCHOPT_TOL = 1e-4


@dataclass(frozen=True)
class TorchoptSolve(FixedPointRule):
    """A torchopt linear solve function as an implicit rule (``tmg.custom_root``'s ``solve=``).

    ``solve(matvec, b) -> x`` (e.g. ``torchopt.linear_solve.solve_normal_cg(maxiter=5)``)
    solves the custom-root system ``J^T x = g`` (the sign is applied in ``meta_part``);
    ``matvec`` is a ``torch.func.vjp`` of the optimality function, so solves that
    transpose it (normal CG) work. Only records that give the whole system
    (``tmg.custom_root``) fit: the rule raises elsewhere.
    Reports a :class:`CGInfo` (iterations = products, as torchopt does not count) and
    the same warnings as :class:`ImplicitCG` except negative curvature.

    Args:
        solve: the torchopt solve function.
        reg: the system's scale (``1``: the optimality function's Jacobian as it is).
        inner_tol: as :class:`ImplicitCG`'s.
        tol: warn when the true relative residual exceeds it; ``None`` (default):
            :data:`TORCHOPT_TOL` (1e-4: torchopt's solves stop at 1e-5 on their own
            residual, e.g. normal CG's, so the true one is judged with 10x slack).
            ``iterations``/``products`` count the forward products only (normal CG also
            takes a VJP through each).
    """

    solve: Callable[..., Any] = field(kw_only=True)
    tol: float | None = field(default=None, kw_only=True)
    inner_tol: float | None = field(default=0.1, kw_only=True)

    def meta_gradient(self, record: RecordProtocol, g: Tensor) -> Estimate:
        if getattr(record, "proximal_system", None) is None:
            raise TypeError(
                "a torchopt solve function works as a rule only in tmg.custom_root; "
                "elsewhere use tmg.ImplicitCG(reg, solver=...)"
            )
        b = g[: record.param_dim]
        operator = self.operator(record)
        count = [0]

        def matvec(v: Tensor) -> Tensor:
            count[0] += 1
            return operator(v)

        x = self.solve(matvec, b)
        name = getattr(self.solve, "func", self.solve)
        name = getattr(name, "__name__", type(self.solve).__name__).lstrip("_")
        ensure_finite(x, lambda: f"in the torchopt solve {name}")
        info = _finish(self, record, operator, b, x, name, count[0], count[0], math.nan)
        return Estimate(x, info, self.meta_part(record, x))


def _finish(
    rule: Any,
    record: RecordProtocol,
    operator: Callable[[Tensor], Tensor],
    b: Tensor,
    x: Tensor,
    solver: str,
    iterations: int,
    products: int,
    min_curvature: float,
) -> CGInfo:
    """The solve's :class:`CGInfo` (true residual, gain, stationarity) and its warnings."""
    # a torchopt solve with tol=None stops at its own tolerance (1e-5 by default, on its
    # own residual): judged with 10x slack on the true one
    tol = TORCHOPT_TOL if rule.tol is None else rule.tol
    b_norm = float(b.norm())
    residual = float((b - operator(x)).norm()) / b_norm if b_norm > 0 else 0.0
    if not math.isfinite(residual):
        # e.g. a NaN in the system: torchopt's CG stops at it and returns its zero start,
        # which is finite, so the answer's own check would not catch it
        raise NonFiniteError(
            f"{type(rule).__name__}: the linear system (I + H/reg) x = g gives a non-finite "
            f"residual after {solver} ({residual}): the Hessian-vector products of the inner "
            "objective (or the outer gradient) are not finite at the inner solution"
        )
    gain = float(x.norm()) / b_norm if b_norm > 0 else 0.0
    stationarity = None if rule.inner_tol is None else rule.stationarity(record)
    info = CGInfo(
        iterations=iterations,
        residual=residual,
        converged=residual <= tol,
        solver=solver,
        products=products,
        min_curvature=min_curvature,
        gain=gain,
        stationarity=stationarity,
    )
    name, reg = type(rule).__name__, float(rule.reg)
    if not info.converged:
        fix = "raise the torchopt solve's maxiter" if rule.tol is None else "raise maxiter or reg"
        _warn(
            f"{name}: {solver} stopped after {iterations} iterations at relative residual "
            f"{residual:.3g} > tol={tol:g}; {fix}"
        )
    if solver == "cg" and info.negative_curvature:
        _warn(
            f"{name}: conjugate gradient met negative curvature (v^T (I + H/reg) v / v^T v = "
            f"{min_curvature:.3g} <= 0): I + H/reg is indefinite, so H has an eigenvalue "
            f"below -reg={-reg:g} and the inner params are not a minimum of the proximal "
            "objective. CG's answer is unreliable: use solver='minres' (or 'normal_cg'), "
            "raise reg, or run the inner loop to its minimum"
        )
    if gain > GAIN_LIMIT:
        _warn(
            f"{name}: the meta-gradient is {gain:.3g}x the outer gradient: I + H/reg is "
            f"(nearly) singular, i.e. H has an eigenvalue near -reg={-reg:g}, and more "
            "iterations will not make it reliable. Raise reg, or run the inner loop to a "
            "minimum of the proximal objective (where H + reg I is positive semidefinite)"
        )
    if stationarity is not None and stationarity > rule.inner_tol:
        _warn(
            f"{name}: the inner loop is far from a stationary point of the proximal "
            f"objective: ||grad(l + reg/2 ||phi - theta||^2)|| at the returned params is "
            f"{stationarity:.3g} of its value at the start (inner_tol={rule.inner_tol:g}). "
            "The implicit gradient assumes a stationary point: run more inner steps or a "
            "larger inner lr, or use a rule of the steps taken (tmg.Exact, tmg.Binomial)"
        )
    return info


def _warn(message: str) -> None:
    warnings.warn(message, SolverWarning, stacklevel=4)
