"""Continuous inner problems: ``tmg.flow`` and the gradient decorators.

* :func:`flow` solves the inner gradient flow with torchdiffeq and differentiates
  it with a flow rule (``tmg.Adjoint``), at constant graph memory in T.
* :func:`implicit` turns any user-written inner solver into a function whose
  output is differentiated implicitly (``tmg.ImplicitCG``), in the style of
  ``torchopt.diff.implicit.custom_root``.
* :func:`adjoint` attaches the adjoint backward to a user's own inner dynamics
  that return the states on a uniform time grid.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from torchopt_metagrad import _ode
from torchopt_metagrad.bridge import MetaGradientBridge
from torchopt_metagrad.errors import NonFiniteError
from torchopt_metagrad.functional import check_params, check_rule
from torchopt_metagrad.rules.adjoint import Adjoint
from torchopt_metagrad.rules.implicit import ImplicitCG
from torchopt_metagrad.trajectory import BatchSchedule, InnerProblem, Trajectory

__all__ = ["adjoint", "flow", "implicit"]

LossFn = Callable[[dict[str, Tensor], Any], Tensor]


def flow(
    loss_fn: LossFn,
    params: Mapping[str, Tensor],
    batch: Any = None,
    *,
    T: float,
    rule: Adjoint | None = None,
    method: str = "dopri5",
    rtol: float = 1e-7,
    atol: float = 1e-9,
    step_size: float | None = None,
    save_every: float = 0.01,
) -> dict[str, Tensor]:
    r"""Adapt ``params`` by the gradient flow :math:`\dot u = -\nabla \ell(u)` for time ``T``.

    The flow is solved with torchdiffeq's ``odeint`` (any of its methods) without a
    graph; its states are kept on the grid ``t = 0, h, ..., T`` (``h`` close to
    ``save_every``), and the backward of anything computed from the result runs
    ``rule`` (default ``tmg.Adjoint()``) over them. Graph memory does not grow
    with ``T``; the stored states take ``T / save_every`` flat copies of the params.

    Args:
        loss_fn: ``loss_fn(params, batch) -> scalar`` as in :func:`tmg.adapt`.
        params: initial parameters (floating point, requiring grad).
        batch: the inner batch (one objective for the whole flow).
        T: adaptation time > 0 (A-MAML uses 2 and 5, i.e. 200 and 500 steps of 0.01).
        rule: a flow rule (``tmg.Adjoint(...)``).
        method: torchdiffeq method of the forward solve (``dopri5``, ``rk4``, ...).
        rtol: relative tolerance of adaptive methods.
        atol: absolute tolerance of adaptive methods.
        step_size: step of fixed-grid methods (``None``: the storage grid).
        save_every: spacing ``h`` of the stored states (> 0).

    Returns:
        ``{name: u(T)}`` with the keys of ``params``.

    Raises:
        ODESolveError: the forward (or backward) solve failed; says where.
        NonFiniteError: a stored state is not finite.
    """
    spec = check_params(params)
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
    rule = Adjoint() if rule is None else rule
    check_rule(rule)
    if not rule.supports_flow:
        raise TypeError(
            f"tmg.flow needs a rule that works on a gradient flow (tmg.Adjoint), got {rule!r}"
        )
    _ode.check_tolerance(T, "T")
    _ode.check_tolerance(save_every, "save_every")
    _ode.check_method(method)
    _ode.check_tolerance(rtol, "rtol")
    _ode.check_tolerance(atol, "atol")
    if step_size is not None:
        _ode.check_tolerance(step_size, "step_size")
    n = max(1, round(T / save_every))
    problem = InnerProblem(loss_fn, spec, None, BatchSchedule(batch, None, n))

    def field(t: Tensor, u: Tensor) -> Tensor:
        with torch.enable_grad():
            leaf = u.detach().requires_grad_(True)
            loss = problem.loss(leaf, batch)
            _check_scalar(loss)
            (grad,) = torch.autograd.grad(loss, leaf)
        return -grad

    def runner(theta: Tensor) -> tuple[Tensor, Trajectory]:
        times = _ode.linspace(float(T), n, theta)
        states = _ode.solve(
            "forward gradient-flow solve",
            field,
            theta,
            times,
            method=method,
            rtol=rtol,
            atol=atol,
            step_size=step_size,
        )
        _check_states(states, float(T) / n)
        return states[-1], Trajectory(problem, 0, states, [()] * (n + 1), float(T) / n)

    leaves = list(params.values())
    return dict(zip(spec.names, MetaGradientBridge.apply(runner, rule, *leaves), strict=True))


def implicit(
    loss_fn: LossFn, rule: ImplicitCG
) -> Callable[[Callable[[dict[str, Tensor], Any], Mapping[str, Tensor]]], Callable[..., Any]]:
    r"""Decorator: differentiate a user's inner solver implicitly (iMAML).

    The decorated ``solver(params, batch) -> adapted`` must (approximately)
    minimize ``loss_fn(phi, batch) + rule.reg / 2 * ||phi - params||^2`` over
    ``phi`` — with any optimizer and any number of steps; it runs without a
    graph. The returned function has the same signature; the backward of
    anything computed from its output solves
    :math:`(I + H/r) x = g` at the returned point (see :class:`tmg.ImplicitCG`),
    and ``rule.info`` then holds the CG iteration count and residual.

    Example::

        rule = tmg.ImplicitCG(reg=2.0, maxiter=10)

        @tmg.implicit(loss_fn, rule)
        def solve(params, batch):  # params arrive detached: a constant anchor
            phi = {k: v.clone().requires_grad_() for k, v in params.items()}
            opt = torch.optim.SGD(phi.values(), lr=0.1)
            for _ in range(100):
                opt.zero_grad()
                prox = sum(((phi[k] - params[k]) ** 2).sum() for k in phi)
                (loss_fn(phi, batch) + rule.reg / 2 * prox).backward()
                opt.step()
            return phi

        solve(dict(net.named_parameters()), batch)  # differentiable w.r.t. params
    """
    check_rule(rule)
    if not isinstance(rule, ImplicitCG):
        raise TypeError(f"rule must be a tmg.ImplicitCG, got {rule!r}")

    def decorator(
        solver: Callable[[dict[str, Tensor], Any], Mapping[str, Tensor]],
    ) -> Callable[..., dict[str, Tensor]]:
        @functools.wraps(solver)
        def wrapped(params: Mapping[str, Tensor], batch: Any = None) -> dict[str, Tensor]:
            spec = check_params(params)
            problem = InnerProblem(loss_fn, spec, None, BatchSchedule(batch, None, 0))

            def runner(theta: Tensor) -> tuple[Tensor, Trajectory]:
                anchor = {k: t.clone() for k, t in spec.unflatten(theta).items()}
                with torch.enable_grad():  # the solver may take gradients; theta is detached
                    out = solver(anchor, batch)
                phi = _flatten_output(out, spec.names, "solver").detach()
                return phi, Trajectory(problem, 0, phi[None], [()], None)

            leaves = list(params.values())
            adapted = MetaGradientBridge.apply(runner, rule, *leaves)
            return dict(zip(spec.names, adapted, strict=True))

        return wrapped

    return decorator


def adjoint(
    loss_fn: LossFn, *, T: float, rule: Adjoint | None = None
) -> Callable[[Callable[..., Sequence[Mapping[str, Tensor]]]], Callable[..., Any]]:
    r"""Decorator: attach the adjoint backward (A-MAML) to a user's inner dynamics.

    The decorated ``dynamics(params, batch) -> states`` runs the user's own
    integrator of the gradient flow of ``loss_fn`` (without a graph) and returns
    the list of states ``[u(0), u(h), ..., u(T)]`` on a uniform grid (each a dict
    like ``params``; ``u(0)`` is ``params``). The returned function gives the final
    state ``u(T)``; its backward solves the adjoint ODE over the returned states
    with ``rule`` (default ``tmg.Adjoint()``, the modified Euler scheme).

    Example::

        @tmg.adjoint(loss_fn, T=1.0)
        def dynamics(params, batch):  # params arrive detached, requiring grad
            states, u = [params], params
            for _ in range(100):  # explicit Euler with h = 0.01
                g = torch.autograd.grad(loss_fn(u, batch), list(u.values()))
                u = {k: (v - 0.01 * gk).detach().requires_grad_() for (k, v), gk in
                     zip(u.items(), g)}
                states.append(u)
            return states
    """
    rule = Adjoint() if rule is None else rule
    check_rule(rule)
    if not rule.supports_flow:
        raise TypeError(f"rule must be a flow rule such as tmg.Adjoint(), got {rule!r}")
    _ode.check_tolerance(T, "T")

    def decorator(
        dynamics: Callable[..., Sequence[Mapping[str, Tensor]]],
    ) -> Callable[..., dict[str, Tensor]]:
        @functools.wraps(dynamics)
        def wrapped(params: Mapping[str, Tensor], batch: Any = None) -> dict[str, Tensor]:
            spec = check_params(params)

            def runner(theta: Tensor) -> tuple[Tensor, Trajectory]:
                start = {
                    k: t.clone().requires_grad_(True) for k, t in spec.unflatten(theta).items()
                }
                with torch.enable_grad():  # the dynamics take gradients of the inner loss
                    states = dynamics(start, batch)
                if not isinstance(states, Sequence) or len(states) < 2:
                    raise ValueError(
                        "the adjoint-decorated function must return the list of states "
                        "[u(0), ..., u(T)] (at least two)"
                    )
                flat = torch.stack(
                    [
                        _flatten_output(s, spec.names, f"state {i}").detach()
                        for i, s in enumerate(states)
                    ]
                )
                n = len(states) - 1
                _check_states(flat, float(T) / n)
                problem = InnerProblem(loss_fn, spec, None, BatchSchedule(batch, None, n))
                return flat[-1], Trajectory(problem, 0, flat, [()] * (n + 1), float(T) / n)

            leaves = list(params.values())
            adapted = MetaGradientBridge.apply(runner, rule, *leaves)
            return dict(zip(spec.names, adapted, strict=True))

        return wrapped

    return decorator


def _flatten_output(out: Any, names: tuple[str, ...], what: str) -> Tensor:
    if not isinstance(out, Mapping) or set(out) != set(names):
        raise ValueError(f"{what} must return a dict with the keys of params: {list(names)}")
    return torch.cat([out[k].reshape(-1) for k in names])


def _check_scalar(loss: Any) -> None:
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        raise ValueError("loss_fn must return a scalar tensor")
    if not loss.requires_grad:
        raise ValueError("loss_fn's output does not depend on params")


def _check_states(states: Tensor, h: float) -> None:
    bad = (~torch.isfinite(states)).flatten(1).any(1)
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        raise NonFiniteError(f"the inner state is not finite at t={i * h:.6g} (stored state {i})")
