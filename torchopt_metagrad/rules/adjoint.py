"""The adjoint of the inner gradient flow (A-MAML)."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor

from torchopt_metagrad._core.ode import ODE, Clock, named_failure, solve
from torchopt_metagrad.errors import ODESolveError
from torchopt_metagrad.rules.base import (
    Estimate,
    FlowRule,
    RecordProtocol,
    ensure_finite,
    register,
)

__all__ = ["Adjoint", "AdjointInfo"]

#: Largest ``h * rho`` a Heun substep takes (``rho`` ~ ||H||). Heun's factor
#: ``1 - z + z^2/2`` is stable for ``z <= 2`` and damps monotonically up to ``z = 1``;
#: the 2x margin covers power iteration's underestimate of ``rho``.
SAFE_STEP = 1.0
#: Most substeps of one stored interval; past it the backward raises ``ODESolveError``.
MAX_SUBSTEPS = 256
_POWER_ITERS = 8  # power-iteration HVPs at most, at each end of the trajectory
_POWER_RTOL = 0.02  # stop when the estimate changes by less than this
_STRIDE = 8  # between the ends, one stiffness HVP every _STRIDE stored states
_MISS = 2.0  # step lengths by which the backward-run flow may miss a stored state
#: Stability interval ``step * ||H|| <= bound`` of torchdiffeq's fixed-step methods on
#: ``y' = -mu y`` (approximate for the Adams methods); on the stored grid the backward
#: keeps ``step * ||H|| <= bound / 2``, and a given ``step_size`` past ``bound`` raises.
_STABLE = {
    "euler": 2.0,
    "midpoint": 2.0,
    "heun2": 2.0,
    "heun3": 2.51,
    "rk4": 2.78,
    "explicit_adams": 0.3,
    "implicit_adams": 1.2,
    "fixed_adams": 1.2,
}


@dataclass(frozen=True)
class AdjointInfo:
    """How an :class:`Adjoint` backward went.

    Attributes:
        scheme: ``"heun"``, ``"ode:<method>"`` (checkpointed) or ``"reintegrate:<method>"``.
        evaluations: Hessian-vector products for ``"heun"`` (the stiffness estimate
            included); vector-field evaluations for the ODE schemes (each one gradient
            and one HVP; for ``reintegrate`` the forward re-run's gradients too).
        substeps: steps over the stored intervals when the scheme sets them: Heun's, or
            a fixed-step method's on the stored grid (``num_steps`` when no interval
            was refined); 0 when torchdiffeq or ``step_size`` sets them.
    """

    scheme: str
    evaluations: int
    substeps: int


@register("adjoint")
@dataclass(frozen=True)
class Adjoint(FlowRule):
    r"""Adjoint method for the inner gradient flow (A-MAML).

    The inner loop is the gradient flow :math:`\dot u = -\nabla \ell(u)`,
    :math:`u(0) = \theta`, on :math:`[0, T]`, stored as ``u_k = u(k h)``; the
    meta-gradient is :math:`\lambda(0)` of the adjoint ODE

    .. math:: \dot\lambda = H(u(t))\,\lambda, \qquad \lambda(T) = g,

    solved backward in time (:math:`\lambda(0) = e^{-TA} g` when
    :math:`\ell = \tfrac12 (u-a)^\top A (u-a)`). ``solver`` chooses how:

    * ``"heun"`` (the paper's modified Euler) over the stored states:
      :math:`\tilde\lambda = \lambda_{k+1} - h H_{k+1}\lambda_{k+1}`,
      :math:`\lambda_k = \lambda_{k+1} - \tfrac h2 (H_{k+1}\lambda_{k+1} + H_k\tilde\lambda)`;
      2 HVPs per interval, error O(h^2). It is stable only for :math:`h\|H\| \le 2`,
      so the stiffness :math:`\rho \approx \|H\|` is estimated up front (power
      iteration at the last and first states, at most 8 HVPs each, and one HVP every 8
      states in between, carrying the vector along) and by :math:`\|H v\|/\|v\|` of
      the HVPs taken anyway; an interval with :math:`h\rho > 1` is split into
      :math:`\lceil h\rho\rceil` substeps over linearly interpolated states (redone
      finer if its own HVPs show more stiffness; at most 256, else ``ODESolveError``):
      never a finite blow-up;
    * a :class:`~torchopt_metagrad.ODE` (or a torchdiffeq method name): checkpointed
      adjoint. On each interval, torchdiffeq integrates :math:`(u, \lambda)` backward
      from :math:`(u_{k+1}, \lambda_{k+1})` with :math:`\dot u = -\nabla\ell(u)`,
      :math:`\dot\lambda = H(u)\lambda`, and ``u`` restarts from the stored ``u_k``:
      accurate to the solver's tolerance, no interpolation error. A fixed-step method
      without ``step_size`` steps on the stored grid, with substeps where the stiffness
      estimate puts :math:`h\rho` past half its stability interval; a ``step_size``
      past the stability interval raises. States that are not flow samples (gradient
      descent near :math:`\mathrm{lr}\|H\| = 2`, where running the flow backward
      amplifies the iterates' oscillation) raise ``ODESolveError``: use ``"heun"``;
    * ``None`` (default): the ``ODE`` that solved the forward flow (``tmg.flow``), so
      the backward is as accurate as the forward; ``"heun"`` for gradient-descent
      iterates.

    ``reintegrate=True`` uses torchdiffeq's ``odeint_adjoint`` instead: ``u`` is
    re-integrated from ``u(0)`` and then backward from ``u(T)`` over the whole horizon
    (no stored state beyond ``u(0)``; unstable when :math:`T\|H\|` is large, since the
    backward flow amplifies the stiff directions by :math:`e^{T\rho}`).

    With ``tmg.adapt`` and plain gradient descent of step ``lr``, the iterates are
    taken as samples of the flow at :math:`t_k = k\,\mathrm{lr}` (the answer
    approaches ``Exact`` as ``lr`` shrinks).

    Bias: exact for the flow up to the scheme's error (O(h^2) for ``"heun"``, the
    tolerance for an ODE); differs from the gradient of discrete gradient descent by
    O(lr). Cost: ``"heun"``: 2 HVPs per substep (2 per interval on smooth problems)
    plus the stiffness estimate, about 10 + K/8 HVPs; ODE: one gradient and one HVP
    per evaluation (dopri5: 6 per step, >= 8 per interval), plus the stiffness estimate
    for fixed-step methods. Memory O(d) plus the stored states, no graph per step.

    Reference: Li et al., "Meta-Learning with Adjoint Methods", AISTATS 2023.

    Args:
        solver: ``"heun"``, an ``ODE``, a torchdiffeq method name (``ODE(name)``), or
            ``None`` (the forward's ``ODE``, else ``"heun"``).
        reintegrate: re-integrate with ``odeint_adjoint`` (needs an ODE solver).

    Raises:
        ODESolveError: the backward solve failed or ran out of steps (says where).
        NonFiniteError: the adjoint state became non-finite (says at which time).
    """

    solver: ODE | str | None = None
    reintegrate: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.solver, str) and self.solver != "heun":
            try:
                object.__setattr__(self, "solver", ODE(self.solver))
            except ValueError as err:
                raise ValueError(f"solver must be 'heun', a tmg.ODE or {err}") from None
        elif self.solver is not None and not isinstance(self.solver, (str, ODE)):
            raise TypeError(f"solver must be 'heun', a tmg.ODE or None, got {self.solver!r}")
        if not isinstance(self.reintegrate, bool):
            raise TypeError(f"reintegrate must be a bool, got {self.reintegrate!r}")
        if self.reintegrate and self.solver == "heun":
            raise ValueError("reintegrate=True needs an ODE solver (solver=tmg.ODE(...)), not heun")

    def resolve(self, record: RecordProtocol) -> ODE | str:
        """The scheme used for ``record``: ``solver``, else the forward's ``ODE``, else heun."""
        if self.solver is not None:
            return self.solver
        forward = getattr(record, "solver", None)
        return forward if isinstance(forward, ODE) else "heun"

    def meta_gradient(self, record: RecordProtocol, g: Tensor) -> Estimate:
        lam, info = self.meta_gradient_with_info(record, g)
        return Estimate(lam, info)

    def meta_gradient_with_info(
        self, record: RecordProtocol, g: Tensor
    ) -> tuple[Tensor, AdjointInfo]:
        """:math:`\\lambda(0)` (parameter block) and how it was computed."""
        h = record.time_step
        if h is None:
            raise ValueError(
                "Adjoint needs samples of a gradient flow: tmg.adapt with plain gradient descent "
                "(lr=..., no optimizer) or tmg.flow"
            )
        lam = g[: record.param_dim]
        scheme = self.resolve(record)
        if self.reintegrate:
            if not isinstance(scheme, ODE):
                raise ValueError(
                    "Adjoint(reintegrate=True) needs an ODE solver: these states come from "
                    "gradient descent, not tmg.flow; pass solver=tmg.ODE(...)"
                )
            return _reintegrate(record, lam, h, scheme)
        if isinstance(scheme, ODE):
            return _checkpointed(record, lam, h, scheme)
        return _heun(record, lam, h)


# ----------------------------------------------------------------------------- heun
def _ratio(hv: Tensor, v: Tensor) -> Tensor:
    """``||H v|| / ||v||``, a lower bound on ``||H||`` (0 for ``v = 0``; no device sync)."""
    return hv.norm() / v.norm().clamp_min(torch.finfo(v.dtype).tiny)


def _power(hvp: Callable[[Tensor], Tensor], v: Tensor) -> tuple[float, Tensor]:
    """Power iteration: an estimate (from below) of ``||H||`` and the last unit vector."""
    v = v / v.norm()
    rho = 0.0
    for _ in range(_POWER_ITERS):
        w = hvp(v)
        n = float(w.norm())
        if not (n > 0 and math.isfinite(n)):
            return (0.0 if n == 0 else math.inf), v
        done = abs(n - rho) <= _POWER_RTOL * n
        v, rho = w / n, max(rho, n)
        if done:
            break
    return rho, v


def _stiffness(hvp: Callable[[int, Tensor], Tensor], N: int, like: Tensor) -> list[float]:
    """For each stored interval, an estimate (from below) of ``max ||H||`` over its ends.

    Power iteration at the last and the first state; in between one HVP every
    ``_STRIDE`` states, carrying the vector along (it follows the top eigenvector).
    """
    start = torch.cos(torch.arange(like.numel(), dtype=like.dtype, device=like.device) * 2.39996)
    est: dict[int, float] = {}
    est[N], v = _power(lambda x: hvp(N, x), start)
    for j in range(N - _STRIDE, 0, -_STRIDE):
        w = hvp(j, v)
        n = float(w.norm())
        est[j] = n if math.isfinite(n) else math.inf
        if n > 0 and math.isfinite(n):
            v = w / n
    est[0], _ = _power(lambda x: hvp(0, x), v)
    at = sorted(est)
    return [max(est[lo], est[hi]) for lo, hi in itertools.pairwise(at) for _ in range(lo, hi)]


def _substeps(z: float, k: int, h: float, scheme: str, safe: float = SAFE_STEP) -> int:
    """Substeps of interval ``k`` for ``z = h * rho``: ``ceil(z / safe)``, at most 256."""
    if not math.isfinite(z):  # an overflowing adjoint: the finiteness check names it
        return 1
    m = max(1, math.ceil(z / safe - 1e-9))
    if m > MAX_SUBSTEPS:
        raise ODESolveError(
            f"the backward adjoint solve ({scheme}) needs {m} substeps > {MAX_SUBSTEPS} on "
            f"t in [{k * h:.6g}, {(k + 1) * h:.6g}] (h * ||H|| ~ {z:.3g}): the inner loss is "
            f"too stiff for the stored grid; store states more often (smaller save_every "
            f"or lr) or use an adaptive solver=tmg.ODE(...)"
        )
    return m


class _HVP:
    """The record's HVPs, counted: ``H v`` at ``u_k + s (u_{k+1} - u_k)``, ``s`` in [0, 1]."""

    def __init__(self, record: RecordProtocol) -> None:
        self.record, self.count = record, 0

    def __call__(self, k: int, v: Tensor, s: float = 0.0) -> Tensor:
        self.count += 1
        if s in (0.0, 1.0):  # a stored state
            return self.record.hvp(k + int(s), v)
        d = self.record.param_dim
        u0, u1 = self.record.snapshot(k)[:d], self.record.snapshot(k + 1)[:d]
        return self.record.hvp_at(u0 + s * (u1 - u0), v, k=k)


def _heun(record: RecordProtocol, g: Tensor, h: float) -> tuple[Tensor, AdjointInfo]:
    N, hvp = record.num_steps, _HVP(record)
    rho, rho_recent, substeps = _stiffness(hvp, N, g), 0.0, 0
    lam = g
    for k in reversed(range(N)):
        a = hvp(k, lam, 1.0)
        m = _substeps(h * max(rho[k], rho_recent, float(_ratio(a, lam))), k, h, "heun")
        while True:
            new, rho_seen = _heun_interval(hvp, k, lam, a, h, m)
            # the ratios seen inside say the interval was under-resolved: redo it finer
            needed = _substeps(h * rho_seen, k, h, "heun")
            if needed <= 1.5 * m:
                break
            m = needed
        lam, rho_recent, substeps = new, rho_seen, substeps + m
        ensure_finite(lam, partial(_where, k, h))
    return lam, AdjointInfo("heun", hvp.count, substeps)


def _where(k: int, h: float) -> str:
    return f"in the backward adjoint solve at t={k * h:.6g} (stored state {k})"


def _heun_interval(
    hvp: Callable[[int, Tensor, float], Tensor], k: int, lam: Tensor, a: Tensor, h: float, m: int
) -> tuple[Tensor, float]:
    """``m`` Heun substeps from ``t_{k+1}`` to ``t_k``; ``a = H_{k+1} lam``.

    Returns the new ``lam`` and the largest ``||H v|| / ||v||`` seen.
    """
    dt, rho = h / m, _ratio(a, lam)
    for j in range(m):
        if j:
            a = hvp(k, lam, 1.0 - j / m)
            rho = torch.maximum(rho, _ratio(a, lam))
        trial = lam - dt * a
        b = hvp(k, trial, 1.0 - (j + 1) / m)
        lam = lam - (0.5 * dt) * (a + b)
        rho = torch.maximum(rho, _ratio(b, trial))
    return lam, float(rho)


# ------------------------------------------------------------------------ ODE schemes
def _field_and_hvp(record: RecordProtocol, u: Tensor, lam: Tensor) -> tuple[Tensor, Tensor]:
    """``(-grad l(u), H(u) lam)`` from one double backward."""
    with torch.enable_grad():
        leaf = u.detach().requires_grad_(True)
        f = record.vector_field(leaf, create_graph=True)
        hl = None
        if f.requires_grad:  # d(f . -lam)/du = H lam
            (hl,) = torch.autograd.grad(f, leaf, -lam, allow_unused=True)
    return f.detach(), torch.zeros_like(lam) if hl is None else hl


def _checkpointed(
    record: RecordProtocol, g: Tensor, h: float, ode: ODE
) -> tuple[Tensor, AdjointInfo]:
    N, d = record.num_steps, record.param_dim

    def field(t: Tensor, y: Tensor) -> Tensor:
        return torch.cat(_field_and_hvp(record, y[:d], y[d:]))

    grids, hvp = [h] * N, _HVP(record)
    if ode.is_fixed:  # no error control: keep the step inside the stability interval
        rho, bound = _stiffness(hvp, N, g), _STABLE.get(ode.method, 2.0)
        if ode.step_size is not None and ode.step_size * max(rho) > bound:
            raise ODESolveError(
                f"the backward adjoint solve ({ode.describe()}) is unstable: step_size * ||H|| ~ "
                f"{ode.step_size * max(rho):.3g} > {bound:g}; use a smaller step_size, an "
                f"adaptive method, or step_size=None (the stored grid, refined as needed)"
            )
        if ode.step_size is None:
            grids = [h / _substeps(h * r, k, h, ode.method, 0.5 * bound) for k, r in enumerate(rho)]
    per_call = math.ceil(h / min(grids) - 1e-9)
    if ode.step_size is not None:
        per_call = math.ceil(h / ode.step_size - 1e-9)
    # max_steps for the whole backward, plus a start and the grid's steps per interval
    clock = Clock(N * h, limit=ode.budget_for(N, steps_per_call=per_call))
    lam = g
    for k in reversed(range(N)):
        y1 = torch.cat([record.snapshot(k + 1)[:d], lam])
        times = torch.tensor([(k + 1) * h, k * h], dtype=g.dtype, device=g.device)
        y0 = solve("backward adjoint solve", field, y1, times, ode, grid_step=grids[k], clock=clock)
        lam = y0[-1, d:]
        ensure_finite(lam, partial(_where, k, h))
        _check_flow_sample(y0[-1, :d], record, k, h, ode)
    substeps = sum(round(h / s) for s in grids) if ode.is_fixed and ode.step_size is None else 0
    return lam, AdjointInfo(f"ode:{ode.method}", clock.evaluations + hvp.count, substeps)


def _check_flow_sample(u: Tensor, record: RecordProtocol, k: int, h: float, ode: ODE) -> None:
    """Raise if ``u``, the flow run backward from state ``k + 1``, misses state ``k`` by more
    than ``_MISS`` step lengths (and far more than the tolerance allows): the states are not
    samples of the flow, e.g. gradient descent near ``lr ||H|| = 2``, where running the flow
    backward amplifies the iterates' oscillation by ``exp(h ||H||)`` per interval."""
    d, (rtol, atol) = record.param_dim, ode.tolerances
    uk, step = record.snapshot(k)[:d], record.snapshot(k + 1)[:d] - record.snapshot(k)[:d]
    miss, noise = (u - uk).norm(), 1e3 * (rtol * uk.norm() + atol * math.sqrt(d))
    if bool((miss > _MISS * step.norm()) & (miss > noise)):
        raise ODESolveError(
            f"the backward adjoint solve ({ode.describe()}) at t={k * h:.6g}: the flow run "
            f"backward from stored state {k + 1} misses state {k} by {float(miss):.3g} "
            f"({float(miss / step.norm()):.3g} step lengths): the stored states are not "
            f"samples of the gradient flow (gradient descent near lr * ||H|| = 2?); use "
            f"solver='heun' over the stored states, or a smaller lr"
        )


def _reintegrate(
    record: RecordProtocol, g: Tensor, h: float, ode: ODE
) -> tuple[Tensor, AdjointInfo]:
    def field(t: Tensor, u: Tensor) -> Tensor:
        return record.vector_field(u, create_graph=torch.is_grad_enabled())

    T = record.num_steps * h
    times = torch.tensor([0.0, T], dtype=g.dtype, device=g.device)
    clock = Clock(0.0, limit=2 * ode.budget)  # the forward re-run and the backward
    with torch.enable_grad():
        u0 = record.snapshot(0)[: record.param_dim].detach().requires_grad_(True)
        what = "backward adjoint solve (odeint_adjoint's forward re-run)"
        uT = solve(what, field, u0, times, ode, grid_step=h, adjoint=True, clock=clock)[-1]
        what = "backward adjoint solve (odeint_adjoint re-integration)"
        with named_failure(what, ode, clock, h if ode.step_size is None else None):
            (lam,) = torch.autograd.grad(uT, u0, g)
    ensure_finite(lam, lambda: "in the backward adjoint solve (odeint_adjoint)")
    return lam, AdjointInfo(f"reintegrate:{ode.method}", clock.evaluations, 0)
