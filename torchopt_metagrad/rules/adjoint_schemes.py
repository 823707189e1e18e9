"""The numerical schemes of :class:`~torchopt_metagrad.rules.adjoint.Adjoint` (A-MAML).

Each scheme solves the adjoint of the gradient flow :math:`\\dot u = -\\nabla\\ell(u; w)`
backward from :math:`\\lambda(T) = g` and, when the record has meta-parameters ``w``,
integrates :math:`dL/dw = -\\int_0^T \\partial_w \\langle \\nabla_u \\ell(u; w),
\\lambda\\rangle\\,dt` (``record.mixed``) alongside. They return
``(lambda(0), dL/dw or None, AdjointInfo)``.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor

from torchopt_metagrad._core.checks import ensure_finite
from torchopt_metagrad._core.ode import ODE, Clock, named_failure, solve
from torchopt_metagrad._core.protocol import RecordProtocol
from torchopt_metagrad.errors import ODESolveError

__all__ = ["MAX_SUBSTEPS", "SAFE_STEP", "AdjointInfo", "checkpointed", "heun", "reintegrate"]

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

Result = tuple[Tensor, Tensor | None, "AdjointInfo"]


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
        meta_evaluations: mixed products :math:`\\partial_w\\langle\\nabla\\ell, v\\rangle`
            for the meta-parameters (each one gradient with its graph and one backward,
            about an HVP's cost), on top of ``evaluations``; 0 without meta-parameters.
            Heun: one per substep node (``substeps + 1``, more if an interval was
            redone); ODE schemes: one per backward evaluation.
    """

    scheme: str
    evaluations: int
    substeps: int
    meta_evaluations: int = 0


class _Counted:
    """A record's product (``hvp`` or ``mixed``), counted: at state ``k``, at
    ``u_k + s (u_{k+1} - u_k)`` for ``s`` in [0, 1], or at any ``u``."""

    def __init__(
        self,
        record: RecordProtocol,
        at_state: Callable[[int, Tensor], Tensor],
        at_point: Callable[..., Tensor],
    ) -> None:
        self.record, self.at_state, self.at_point, self.count = record, at_state, at_point, 0

    def __call__(self, k: int, v: Tensor, s: float = 0.0) -> Tensor:
        self.count += 1
        if s in (0.0, 1.0):  # a stored state
            return self.at_state(k + int(s), v)
        d = self.record.param_dim
        u0, u1 = self.record.snapshot(k)[:d], self.record.snapshot(k + 1)[:d]
        return self.at_point(u0 + s * (u1 - u0), v, k=k)

    def at(self, u: Tensor, v: Tensor) -> Tensor:
        self.count += 1
        return self.at_point(u, v, k=0)


def _mixeds(record: RecordProtocol) -> _Counted | None:
    # a record without meta_dim (a minimal stand-in) has no meta-parameters
    if not getattr(record, "meta_dim", 0):
        return None
    return _Counted(record, record.mixed, record.mixed_at)


def _where(k: int, h: float) -> str:
    return f"in the backward adjoint solve at t={k * h:.6g} (stored state {k})"


def _check_meta(meta: Tensor | None, scheme: str) -> None:
    if meta is not None:
        ensure_finite(meta, lambda: f"in the meta-parameters' adjoint integral ({scheme})")


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


def heun(record: RecordProtocol, g: Tensor, h: float) -> Result:
    """Heun over the stored states (refined where stiff).

    The meta-parameters' integral is Heun's own step applied to ``a' = M(u, lambda)``
    (``M = d/dw <grad l, .>``, linear in ``lambda``) on the same substeps: the trapezoid
    rule with the scheme's ``lambda`` at each substep's upper node and its predictor
    ``lambda~`` at the lower one. By linearity a node's two terms are one product,
    ``M(u_j, dt/2 (lambda~_j + lambda_j))``: ``substeps + 1`` in all. As a Runge-Kutta
    step of ``(lambda, a)`` it keeps the linear invariant ``a + B^T H^{-1} lambda`` of a
    locally linear problem, so directions with ``h ||H|| ~ 1``, whose contribution to
    the integral is not damped, come out right (the trapezoid rule with the corrected
    ``lambda`` at both nodes is off there by about ``(h ||H||)^2 / 3`` of it).
    """
    N, hvp, mixed = record.num_steps, _Counted(record, record.hvp, record.hvp_at), _mixeds(record)
    rho, rho_recent, substeps = _stiffness(hvp, N, g), 0.0, 0
    lam = g
    # dt/2 times the predictor at the next node, and the integral so far
    carry = None if mixed is None else torch.zeros_like(g)
    total = None if mixed is None else g.new_zeros(record.meta_dim)
    for k in reversed(range(N)):
        a = hvp(k, lam, 1.0)
        m = _substeps(h * max(rho[k], rho_recent, float(_ratio(a, lam))), k, h, "heun")
        while True:
            new, rho_seen, piece = _heun_interval(hvp, mixed, k, lam, a, h, m, carry)
            # the ratios seen inside say the interval was under-resolved: redo it finer
            needed = _substeps(h * rho_seen, k, h, "heun")
            if needed <= 1.5 * m:
                break
            m = needed
        lam, rho_recent, substeps = new, rho_seen, substeps + m
        ensure_finite(lam, partial(_where, k, h))
        if piece is not None and total is not None:
            total, carry = total + piece[0], piece[1]
    meta = None
    if mixed is not None and total is not None and carry is not None:
        meta = -(total + mixed(0, carry))
    _check_meta(meta, "heun")
    count = 0 if mixed is None else mixed.count
    return lam, meta, AdjointInfo("heun", hvp.count, substeps, count)


def _heun_interval(
    hvp: _Counted,
    mixed: _Counted | None,
    k: int,
    lam: Tensor,
    a: Tensor,
    h: float,
    m: int,
    carry: Tensor | None,
) -> tuple[Tensor, float, tuple[Tensor, Tensor] | None]:
    """``m`` Heun substeps from ``t_{k+1}`` to ``t_k``; ``a = H_{k+1} lam``.

    Returns the new ``lam``, the largest ``||H v|| / ||v||`` seen and, with ``mixed``
    (``carry``: dt/2 times the predictor at ``t_{k+1}`` from above), the integral's part
    from the nodes above ``t_k`` and the carry at ``t_k``.
    """
    dt, rho = h / m, _ratio(a, lam)
    integral = None
    for j in range(m):
        if j:
            a = hvp(k, lam, 1.0 - j / m)
            rho = torch.maximum(rho, _ratio(a, lam))
        if mixed is not None and carry is not None:
            node = mixed(k, carry + (0.5 * dt) * lam, 1.0 - j / m)
            integral = node if integral is None else integral + node
        trial = lam - dt * a
        b = hvp(k, trial, 1.0 - (j + 1) / m)
        lam = lam - (0.5 * dt) * (a + b)
        rho = torch.maximum(rho, _ratio(b, trial))
        carry = (0.5 * dt) * trial
    piece = None if integral is None or carry is None else (integral, carry)
    return lam, float(rho), piece


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


def _adjoint_field(record: RecordProtocol, mixed: _Counted | None) -> Callable[..., object]:
    """The backward field of ``(u, lambda)`` (one flat state), or with ``mixed`` of the
    pair ``((u, lambda), a)`` with ``a' = d/dw <grad l(u), lambda>``: integrated from
    ``a(T) = 0`` down to 0, ``a(0) = -int_0^T d/dw <grad l, lambda> dt = dL/dw``."""
    d = record.param_dim

    def field(t: Tensor, y: Tensor) -> Tensor:
        return torch.cat(_field_and_hvp(record, y[:d], y[d:]))

    if mixed is None:
        return field

    def augmented(t: Tensor, y: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        return field(t, y[0]), mixed.at(y[0][:d], y[0][d:])

    return augmented


def _integrate(
    what: str,
    field: Callable[..., object],
    y: Tensor,
    acc: Tensor | None,
    times: Tensor,
    ode: ODE,
    **kw: object,
) -> tuple[Tensor, Tensor | None]:
    """The state (and the accumulator ``acc``, if any) at ``times[-1]``.

    With an accumulator the state is the pair ``(y, acc)``: torchdiffeq's error norm is
    then the larger of the two parts' RMS norms (as for ``odeint_adjoint``'s parameter
    adjoint), so the integral gets the solver's tolerance of its own.
    """
    if acc is None:
        return solve(what, field, y, times, ode, **kw)[-1], None  # type: ignore[arg-type]
    ys, accs = solve(what, field, (y, acc), times, ode, **kw)  # type: ignore[arg-type]
    return ys[-1], accs[-1]


def checkpointed(record: RecordProtocol, g: Tensor, h: float, ode: ODE) -> Result:
    """Per stored interval, ``(u, lambda[, a])`` backward from ``(u_{k+1}, lambda_{k+1})``."""
    N, d, mixed = record.num_steps, record.param_dim, _mixeds(record)
    field = _adjoint_field(record, mixed)
    grids, hvp = [h] * N, _Counted(record, record.hvp, record.hvp_at)
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
    lam, acc = g, None if mixed is None else g.new_zeros(record.meta_dim)
    for k in reversed(range(N)):
        y1 = torch.cat([record.snapshot(k + 1)[:d], lam])
        times = torch.tensor([(k + 1) * h, k * h], dtype=g.dtype, device=g.device)
        what = "backward adjoint solve"
        y0, acc = _integrate(what, field, y1, acc, times, ode, grid_step=grids[k], clock=clock)
        lam = y0[d:]
        ensure_finite(lam, partial(_where, k, h))
        _check_flow_sample(y0[:d], record, k, h, ode)
    substeps = sum(round(h / s) for s in grids) if ode.is_fixed and ode.step_size is None else 0
    scheme = f"ode:{ode.method}"
    _check_meta(acc, scheme)
    count = 0 if mixed is None else mixed.count
    return lam, acc, AdjointInfo(scheme, clock.evaluations + hvp.count, substeps, count)


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


def reintegrate(record: RecordProtocol, g: Tensor, h: float, ode: ODE) -> Result:
    """``u`` re-integrated from ``u(0)``, then backward over the whole horizon.

    Without meta-parameters torchdiffeq's ``odeint_adjoint`` does both. With them, the
    record gives the mixed term only as a product (not a vector field differentiable in
    ``w`` to pass as ``adjoint_params``), so the same two solves run here: ``odeint``
    forward, then ``(u, lambda, a)`` backward from ``(u(T), g, 0)`` in one solve.
    """

    def forward_field(t: Tensor, u: Tensor) -> Tensor:
        return record.vector_field(u, create_graph=torch.is_grad_enabled())

    d, T = record.param_dim, record.num_steps * h
    times = torch.tensor([0.0, T], dtype=g.dtype, device=g.device)
    clock = Clock(0.0, limit=2 * ode.budget)  # the forward re-run and the backward
    scheme, mixed = f"reintegrate:{ode.method}", _mixeds(record)
    u0 = record.snapshot(0)[:d].detach()
    if mixed is None:
        with torch.enable_grad():
            u0 = u0.requires_grad_(True)
            what = "backward adjoint solve (odeint_adjoint's forward re-run)"
            uT = solve(what, forward_field, u0, times, ode, grid_step=h, adjoint=True, clock=clock)
            what = "backward adjoint solve (odeint_adjoint re-integration)"
            with named_failure(what, ode, clock, h if ode.step_size is None else None):
                (lam,) = torch.autograd.grad(uT[-1], u0, g)
        ensure_finite(lam, lambda: "in the backward adjoint solve (odeint_adjoint)")
        return lam, None, AdjointInfo(scheme, clock.evaluations, 0)
    what = "backward adjoint solve (the forward re-run)"
    uT = solve(what, forward_field, u0, times, ode, grid_step=h, clock=clock)[-1]
    what = "backward adjoint solve (re-integration with the meta-parameters' integral)"
    y1, zero, field = (
        torch.cat([uT, g]),
        g.new_zeros(record.meta_dim),
        _adjoint_field(record, mixed),
    )
    y0, meta = _integrate(what, field, y1, zero, times.flip(0), ode, grid_step=h, clock=clock)
    lam = y0[d:]
    ensure_finite(lam, lambda: f"in the backward adjoint solve ({scheme})")
    _check_meta(meta, scheme)
    return lam, meta, AdjointInfo(scheme, clock.evaluations, 0, mixed.count)
