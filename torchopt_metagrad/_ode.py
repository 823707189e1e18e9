"""Thin checked wrappers over torchdiffeq: method names, and errors that say where."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torchdiffeq
from torch import Tensor

from torchopt_metagrad.errors import ODESolveError

__all__ = [
    "ADAPTIVE_METHODS",
    "FIXED_METHODS",
    "check_method",
    "check_tolerance",
    "named_failure",
    "solve",
]

# torchdiffeq keeps its registry private (torchdiffeq._impl.odeint.SOLVERS); read it when
# present so new solvers are accepted, and fall back to the 0.2.x names otherwise.
_FIXED = (
    "euler",
    "midpoint",
    "heun2",
    "heun3",
    "rk4",
    "explicit_adams",
    "implicit_adams",
    "fixed_adams",
)
try:
    from torchdiffeq._impl.odeint import SOLVERS as _SOLVERS

    _ALL = tuple(_SOLVERS)
except ImportError:  # pragma: no cover - depends on torchdiffeq internals
    _ALL = ("dopri8", "dopri5", "bosh3", "fehlberg2", "adaptive_heun", *_FIXED, "scipy_solver")
FIXED_METHODS = frozenset(m for m in _ALL if m in _FIXED)
ADAPTIVE_METHODS = frozenset(m for m in _ALL if m not in FIXED_METHODS)


def check_method(method: Any, *, name: str = "method") -> None:
    """Raise ``ValueError`` listing torchdiffeq's methods if ``method`` is not one."""
    if method not in _ALL:
        raise ValueError(f"{name}={method!r} is not a torchdiffeq method; valid: {', '.join(_ALL)}")


def check_tolerance(value: Any, name: str) -> None:
    """Raise unless ``value`` is a finite float > 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float > 0, got {value!r}")
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be a finite float > 0, got {value}")


class _Clock:
    """The last time at which a solve evaluated its vector field."""

    def __init__(self, t0: float) -> None:
        self.t = t0


@contextlib.contextmanager
def named_failure(
    what: str, method: str, rtol: float, atol: float, clock: _Clock
) -> Iterator[None]:
    """Turn torchdiffeq's failures (step underflow, non-finite state) into ``ODESolveError``."""
    try:
        yield
    except (AssertionError, RuntimeError) as err:
        if isinstance(err, ODESolveError):
            raise
        raise ODESolveError(
            f"the {what} ({method}, rtol={rtol:g}, atol={atol:g}) failed at t={clock.t:.6g}: {err}"
        ) from err


def solve(
    what: str,
    func: Callable[[Tensor, Tensor], Tensor],
    y0: Tensor,
    t: Tensor,
    *,
    method: str,
    rtol: float,
    atol: float,
    step_size: float | None,
    adjoint: bool = False,
    clock: _Clock | None = None,
) -> Tensor:
    """``torchdiffeq.odeint`` (or ``odeint_adjoint``) that names the solve and time on failure.

    ``clock`` (optional) keeps tracking the time after the call, e.g. through the
    backward solve that ``odeint_adjoint`` runs later.
    """
    clock = _Clock(float(t[0])) if clock is None else clock

    def tracked(time: Tensor, y: Tensor) -> Tensor:
        clock.t = float(time.detach())
        return func(time, y)

    options = {"step_size": step_size} if step_size is not None else None
    with named_failure(what, method, rtol, atol, clock):
        if adjoint:
            return torchdiffeq.odeint_adjoint(
                tracked,
                y0,
                t,
                method=method,
                rtol=rtol,
                atol=atol,
                options=options,
                adjoint_rtol=rtol,
                adjoint_atol=atol,
                adjoint_params=(),
            )
        return torchdiffeq.odeint(
            tracked, y0, t, method=method, rtol=rtol, atol=atol, options=options
        )


def linspace(T: float, n: int, like: Tensor) -> Tensor:
    """``n + 1`` uniform times on ``[0, T]`` with ``like``'s dtype and device."""
    return torch.linspace(0.0, T, n + 1, dtype=like.dtype, device=like.device)
