"""ODE options (:class:`ODE`, the one value describing a solve) and checked torchdiffeq calls:
never a step nobody chose, never unbounded work, failures name the solve, method and time.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torchdiffeq
from torch import Tensor

from torchopt_metagrad._core.checks import check_positive
from torchopt_metagrad.errors import ODESolveError

__all__ = ["ADAPTIVE_METHODS", "FIXED_METHODS", "ODE", "Clock", "ODEKnobWarning", "solve"]

# Vector-field evaluations per step of torchdiffeq's fixed-grid methods (the Adams
# methods start with rk4 steps; the implicit corrector iterates up to 4 times).
_FIXED_EVALS = dict(euler=1, midpoint=2, heun2=2, heun3=3, rk4=4, explicit_adams=4)
_FIXED_EVALS.update(implicit_adams=5, fixed_adams=5)
# torchdiffeq keeps its registry private (torchdiffeq._impl.odeint.SOLVERS); read it when
# present so new solvers are accepted, and fall back to the 0.2.x names otherwise.
try:
    from torchdiffeq._impl.odeint import SOLVERS as _SOLVERS
except ImportError:  # pragma: no cover - depends on torchdiffeq internals
    _SOLVERS = {}
_ADAPTIVE = ("dopri8", "dopri5", "bosh3", "fehlberg2", "adaptive_heun")
_ALL: tuple[str, ...] = tuple(_SOLVERS) or (*_ADAPTIVE, *_FIXED_EVALS, "scipy_solver")
FIXED_METHODS = frozenset(m for m in _ALL if m in _FIXED_EVALS)
ADAPTIVE_METHODS = frozenset(m for m in _ALL if m not in FIXED_METHODS)
# fixed-step methods that do use rtol/atol (to stop their implicit corrector)
_TOLERANCE_FIXED = frozenset({"implicit_adams", "fixed_adams"})
_STARTUP_EVALS = 2  # an adaptive solve evaluates f(t0) and probes its first step
DEFAULT_RTOL, DEFAULT_ATOL = 1e-7, 1e-9


class ODEKnobWarning(UserWarning):
    """A knob of :class:`ODE` that the chosen method ignores (e.g. ``rtol`` with ``rk4``)."""


@dataclass(frozen=True)
class ODE:
    """How to solve an ODE with torchdiffeq: method, tolerances or step, and a step budget.

    Args:
        method: a torchdiffeq method, adaptive (``dopri5``, ``bosh3``, ...) or fixed-step
            (``euler``, ``rk4``, ...). Non-smooth vector fields (ReLU nets) suit a
            fixed-step method: adaptive ones shrink their steps at every kink.
        rtol: relative tolerance (``None``: 1e-7). A fixed-step method ignores it
            (except the implicit Adams corrector) and warns.
        atol: absolute tolerance (``None``: 1e-9); same rule as ``rtol``.
        step_size: largest step of a fixed-step method (``None``: the stored grid's
            spacing); each output interval takes equal steps, so outputs are never
            interpolated. An adaptive method ignores it and warns.
        max_steps: the most steps one solve may take, counted as vector-field
            evaluations: ``max_steps`` times the method's evaluations per step (6 for
            dopri5, 4 for rk4), plus 2 for an adaptive start; rejected steps count.
            Past it the solve raises ``ODESolveError``.

    Raises:
        TypeError, ValueError: a knob of the wrong type or value (the message names it).
    """

    method: str = "dopri5"
    rtol: float | None = None
    atol: float | None = None
    step_size: float | None = None
    max_steps: int = 10_000

    def __post_init__(self) -> None:
        if not isinstance(self.method, str):
            raise TypeError(f"method must be a torchdiffeq method name, got {self.method!r}")
        if self.method not in _ALL:
            raise ValueError(
                f"method={self.method!r} is not a torchdiffeq method; valid: {', '.join(_ALL)}"
            )
        for name in ("rtol", "atol", "step_size"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, check_positive(getattr(self, name), name))
        if isinstance(self.max_steps, bool) or not isinstance(self.max_steps, numbers.Integral):
            raise TypeError(f"max_steps must be an int >= 1, got {self.max_steps!r}")
        if self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {self.max_steps}")
        if self.is_fixed and self.method not in _TOLERANCE_FIXED:
            ignored = [n for n in ("rtol", "atol") if getattr(self, n) is not None]
            kind = "a fixed-step method; use step_size"
        else:
            ignored = ["step_size"] if not self.is_fixed and self.step_size is not None else []
            kind = "an adaptive method; it chooses its own steps from rtol/atol"
        if ignored:
            warnings.warn(
                f"ODE: {' and '.join(ignored)} ignored: {self.method!r} is {kind}",
                ODEKnobWarning,
                stacklevel=3,
            )

    @property
    def is_fixed(self) -> bool:
        """Whether the method steps on a fixed grid (no error control)."""
        return self.method in FIXED_METHODS

    @property
    def tolerances(self) -> tuple[float, float]:
        """``(rtol, atol)`` with the defaults (1e-7, 1e-9) filled in."""
        rtol = DEFAULT_RTOL if self.rtol is None else self.rtol
        return rtol, DEFAULT_ATOL if self.atol is None else self.atol

    @property
    def evaluations_per_step(self) -> int:
        """Vector-field evaluations of one step (``scipy_solver``: counted as 1)."""
        if self.method in _FIXED_EVALS:
            return _FIXED_EVALS[self.method]
        tableau = getattr(_SOLVERS.get(self.method), "tableau", None)
        return len(tableau.alpha) if tableau is not None else 1

    @property
    def budget(self) -> int:
        """The most vector-field evaluations one solve may make."""
        return self.budget_for(1)

    def budget_for(self, calls: int, *, steps_per_call: int = 0) -> int:
        """Budget of ``calls`` torchdiffeq calls: ``max_steps``, plus per call a start and
        ``steps_per_call`` steps."""
        start = 0 if self.is_fixed else _STARTUP_EVALS
        steps = self.max_steps + calls * steps_per_call
        return steps * self.evaluations_per_step + calls * start

    def describe(self, step: float | None = None) -> str:
        """``"dopri5, rtol=1e-07, atol=1e-09"`` or ``"rk4, step_size=0.01"``."""
        if self.is_fixed:
            step = self.step_size if step is None else step
            return f"{self.method}, step_size={step:g}" if step is not None else self.method
        return "{}, rtol={:g}, atol={:g}".format(self.method, *self.tolerances)


class Clock:
    """A solve's last evaluation time, its evaluation count and the most it may make
    (``None``: its first solve's budget); shared by several :func:`solve` calls, it
    keeps counting through ``odeint_adjoint``'s backward."""

    def __init__(self, t0: float, limit: int | None = None) -> None:
        self.t, self.evaluations, self.limit = t0, 0, limit


@contextlib.contextmanager
def named_failure(what: str, ode: ODE, clock: Clock, step: float | None = None) -> Iterator[None]:
    """Turn torchdiffeq's failures (step underflow, non-finite state) into ``ODESolveError``."""
    try:
        yield
    except (AssertionError, RuntimeError) as err:
        if isinstance(err, ODESolveError):
            raise
        raise ODESolveError(
            f"the {what} ({ode.describe(step)}) failed at t={clock.t:.6g}: {err}"
        ) from err


def solve(
    what: str,
    func: Callable[[Tensor, Tensor], Tensor],
    y0: Tensor,
    t: Tensor,
    ode: ODE,
    *,
    grid_step: float | None = None,
    adjoint: bool = False,
    clock: Clock | None = None,
) -> Tensor:
    """``torchdiffeq.odeint`` (or ``odeint_adjoint``) of ``dy/dt = func(t, y)`` at times ``t``.

    ``what`` names the solve in errors. A fixed-step method whose ``step_size`` is
    ``None`` steps by ``grid_step`` (the stored grid's spacing). ``clock`` (progress and
    budget, shared e.g. by the intervals of a checkpointed adjoint) is fresh by default.

    Raises:
        ValueError: a fixed-step method with neither ``step_size`` nor ``grid_step``.
        ODESolveError: the budget ran out, or torchdiffeq failed; names solve and time.
    """
    if not isinstance(ode, ODE):
        raise TypeError(f"ode must be a tmg.ODE, got {ode!r}")
    options: dict[str, Any] = {}
    step = None
    if ode.is_fixed:
        step = ode.step_size if ode.step_size is not None else grid_step
        if step is None:
            raise ValueError(
                f"the {what}: {ode.method!r} is a fixed-step method and needs a step size: pass "
                f"ODE({ode.method!r}, step_size=...) (this solve has no stored grid to use)"
            )
        options["grid_constructor"] = _fitted_grid(check_positive(step, "step_size"))
    clock = Clock(float(t[0])) if clock is None else clock
    if clock.limit is None:
        clock.limit = ode.budget
    rtol, atol = ode.tolerances

    def tracked(time: Tensor, y: Tensor) -> Tensor:
        clock.t = float(time.detach())
        clock.evaluations += 1
        if clock.limit is not None and clock.evaluations > clock.limit:
            raise ODESolveError(
                f"the {what} ({ode.describe(step)}) ran out of steps (max_steps={ode.max_steps}, "
                f"{clock.limit} vector-field evaluations) at t={clock.t:.6g}; a stiff or "
                f"non-smooth vector field (ReLU nets) needs a fixed-step method such as "
                f"ODE('rk4', step_size=...) or ODE('euler', step_size=...), or raise max_steps"
            )
        return func(time, y)

    kwargs: dict[str, Any] = dict(method=ode.method, rtol=rtol, atol=atol, options=options)
    with named_failure(what, ode, clock, step):
        if adjoint:
            kwargs.update(adjoint_rtol=rtol, adjoint_atol=atol, adjoint_params=())
            return torchdiffeq.odeint_adjoint(tracked, y0, t, **kwargs)
        return torchdiffeq.odeint(tracked, y0, t, **kwargs)


def _fitted_grid(step: float) -> Callable[[Any, Tensor, Tensor], Tensor]:
    """Equal steps of at most ``step`` (+0.01%) landing on every output time (torchdiffeq's
    own grid interpolates outputs linearly, and may add a near-empty step)."""

    def construct(func: Any, y0: Tensor, t: Tensor) -> Tensor:
        pieces = [t[:1]]
        for a, b in zip(t[:-1].tolist(), t[1:], strict=True):
            m = max(1, math.ceil(abs(float(b) - a) / step - 1e-4))
            piece = torch.linspace(a, float(b), m + 1, dtype=t.dtype, device=t.device)[1:]
            piece[-1] = b
            pieces.append(piece)
        return torch.cat(pieces)

    return construct


def linspace(T: float, n: int, like: Tensor) -> Tensor:
    """``n + 1`` uniform times on ``[0, T]`` with ``like``'s dtype and device."""
    return torch.linspace(0.0, T, n + 1, dtype=like.dtype, device=like.device)
