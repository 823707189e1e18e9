r"""Krylov solvers of a symmetric system :math:`M x = b` given only ``v -> M v`` (HVPs).

The implicit rules solve :math:`(I + H/r) x = g`. At a minimizer of the proximal inner
objective :math:`M = I + H/r` is positive (semi)definite and conjugate gradient is the
cheapest solver; when the inner loop stopped elsewhere (few steps, a saddle) :math:`M` can
be indefinite, where CG may diverge. Three solvers, by name (:data:`SOLVERS`):

* ``"cg"`` — conjugate gradient (``torchopt.linalg.cg``): one product per iteration;
  minimizes the :math:`M`-norm error over the Krylov space when :math:`M \succ 0`, no
  guarantee otherwise;
* ``"normal_cg"`` — CG on the normal equations :math:`M^2 x = M b` (``torchopt.linalg.cg``
  on ``v -> M(M v)``, :math:`M` symmetric so :math:`M^\top = M`; what
  ``torchopt.linear_solve.solve_normal_cg`` does, without its ``vjp`` of the product):
  two products per iteration; the residual :math:`\|b - M x\|` never increases from the
  start, for any symmetric :math:`M`;
* ``"minres"`` — MINRES (Paige & Saunders, 1975): one product per iteration; minimizes
  :math:`\|b - M x\|` over the Krylov space, so the residual never increases, for any
  symmetric :math:`M`. Written here because torchopt has no MINRES (its linear solvers are
  CG, normal-equation CG and a dense inverse).

Every solve also records the smallest Rayleigh quotient :math:`v^\top M v / v^\top v` of
the vectors it multiplied (CG's search directions, MINRES's Lanczos vectors): a value
:math:`\le 0` proves :math:`M` is not positive definite.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torchopt
from torch import Tensor

__all__ = ["SOLVERS", "STARTS", "Solve", "solve"]

#: names of the linear solvers (see the module docstring)
SOLVERS = ("cg", "normal_cg", "minres")
#: starts: ``"zero"`` (x0 = 0) or ``"rhs"`` (x0 = b, iMAML's warm start for M near I)
STARTS = ("zero", "rhs")

Matvec = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class Solve:
    """The outcome of :func:`solve`.

    Attributes:
        x: the solution estimate.
        iterations: solver iterations taken.
        products: products ``M v`` computed (``normal_cg`` takes two per iteration; the
            initial residual from a nonzero start takes one).
        min_curvature: the smallest Rayleigh quotient ``v^T M v / v^T v`` seen (``inf``
            if no nonzero vector was multiplied).
    """

    x: Tensor
    iterations: int
    products: int
    min_curvature: float


class _Counted:
    """``v -> M v`` that counts products and keeps the smallest Rayleigh quotient."""

    def __init__(self, matvec: Matvec) -> None:
        self.matvec, self.products, self.min_curvature = matvec, 0, math.inf

    def __call__(self, v: Tensor) -> Tensor:
        self.products += 1
        out = self.matvec(v)
        vv = float(v.dot(v))
        if vv > 0:
            self.min_curvature = min(self.min_curvature, float(v.dot(out)) / vv)
        return out


def solve(matvec: Matvec, b: Tensor, *, solver: str, x0: str, maxiter: int, tol: float) -> Solve:
    """Solve ``M x = b`` (``M`` symmetric, given as ``matvec``) to relative residual ``tol``.

    Args:
        matvec: ``v -> M v`` for flat vectors ``v`` shaped like ``b``.
        b: right-hand side (flat).
        solver: one of :data:`SOLVERS`.
        x0: one of :data:`STARTS`.
        maxiter: iteration cap.
        tol: stop when ``||b - M x|| <= tol ||b||`` (CG tests its recursive residual,
            MINRES its residual-norm estimate; normal CG tests the normal equations'
            residual ``||M (b - M x)|| <= tol ||M b||``, so its true residual may be up to
            ``cond(M)`` times ``tol``).

    Returns:
        The :class:`Solve`; the caller recomputes the true residual if it needs it.
    """
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
    if x0 not in STARTS:
        raise ValueError(f"x0 must be one of {STARTS}, got {x0!r}")
    op = _Counted(matvec)
    start = b.clone() if x0 == "rhs" else torch.zeros_like(b)
    if solver == "cg":
        x = torchopt.linalg.cg(op, b, x0=start, rtol=tol, maxiter=maxiter)
        iterations = op.products - 1  # torchopt.linalg.cg multiplies x0 once first
    elif solver == "normal_cg":
        rhs = op(b)
        x = torchopt.linalg.cg(lambda v: op(op(v)), rhs, x0=start, rtol=tol, maxiter=maxiter)
        iterations = (op.products - 3) // 2  # M b, then M(M x0), then two per iteration
    else:
        x, iterations = _minres(op, b, start, maxiter=maxiter, tol=tol)
    return Solve(x, iterations, op.products, op.min_curvature)


def _minres(op: Matvec, b: Tensor, x: Tensor, *, maxiter: int, tol: float) -> tuple[Tensor, int]:
    """MINRES without preconditioning (Paige & Saunders 1975; the recurrences of Choi,
    Paige & Saunders 2011, Table 2.1). Returns ``(x, iterations)``."""
    r = b - op(x) if bool(x.any()) else b.clone()
    beta1 = float(r.norm())
    target = tol * float(b.norm())
    if beta1 <= target or beta1 == 0.0:
        return x, 0
    v_old = torch.zeros_like(b)
    v = r / beta1
    beta = beta1
    w = torch.zeros_like(b)
    w_old = torch.zeros_like(b)
    cs, sn, dbar, eps_next, phibar = -1.0, 0.0, 0.0, 0.0, beta1
    iterations = 0
    for _ in range(maxiter):
        iterations += 1
        # Lanczos: beta_{k+1} v_{k+1} = M v_k - alpha_k v_k - beta_k v_{k-1}
        p = op(v)
        alpha = float(v.dot(p))
        p = p - alpha * v - beta * v_old
        beta_next = float(p.norm())
        # apply the previous rotation, then make the new one
        eps = eps_next
        delta = cs * dbar + sn * alpha
        gbar = sn * dbar - cs * alpha
        eps_next = sn * beta_next
        dbar = -cs * beta_next
        gamma = max(math.hypot(gbar, beta_next), torch.finfo(b.dtype).tiny)
        cs, sn = gbar / gamma, beta_next / gamma
        phi, phibar = cs * phibar, sn * phibar
        # search direction and update: x_k = x_{k-1} + phi_k w_k
        w_new = (v - eps * w_old - delta * w) / gamma
        x = x + phi * w_new
        w_old, w = w, w_new
        if phibar <= target or beta_next == 0.0:  # residual small, or Krylov space exhausted
            break
        v_old, v, beta = v, p / beta_next, beta_next
    return x, iterations
