"""Continuous and solver front ends: ``tmg.flow`` and the gradient decorators.

* :func:`flow` solves the inner gradient flow with torchdiffeq and differentiates it with
  a flow rule (``tmg.Adjoint``), at constant graph memory in T;
* :func:`implicit` turns any user-written inner solver into a function whose output is
  differentiated implicitly by a fixed-point rule (``tmg.ImplicitCG``,
  ``tmg.ImplicitNeumann``), in the style of ``torchopt.diff.implicit.custom_root``;
* :func:`adjoint` attaches a flow rule's backward to a user's own inner dynamics that
  return the states on a uniform time grid.

Each builds a record of states and links it with the one autograd node of the core.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from torchopt_metagrad._core import ode as _ode
from torchopt_metagrad._core.checks import (
    NON_FINITE_CAUSES,
    all_finite,
    check_callable,
    check_loss,
    check_params,
    check_positive,
    not_using_params,
    refuse_inference_mode,
)
from torchopt_metagrad._core.closed import closed_meta
from torchopt_metagrad._core.flat import FlatSpec
from torchopt_metagrad._core.link import Link, over_tasks
from torchopt_metagrad._core.needs import Offers, check_fit
from torchopt_metagrad._core.record import Record
from torchopt_metagrad._core.replay import StepLoss
from torchopt_metagrad._core.tasks import is_batched
from torchopt_metagrad.errors import NonFiniteError
from torchopt_metagrad.functional import flat_loss
from torchopt_metagrad.rules.adjoint import Adjoint
from torchopt_metagrad.rules.base import AbstractRule, check_rule

__all__ = ["adjoint", "flow", "implicit"]

LossFn = Callable[[dict[str, Tensor], Any], Tensor]


def flow(
    loss_fn: LossFn,
    params: Mapping[str, Tensor],
    batch: Any = None,
    *,
    T: float,
    rule: AbstractRule | None = None,
    solver: _ode.ODE | None = None,
    save_every: float = 0.01,
) -> dict[str, Tensor]:
    r"""Adapt ``params`` by the gradient flow :math:`\dot u = -\nabla \ell(u)` for time ``T``.

    The flow is solved with torchdiffeq's ``odeint`` (``solver``, a :class:`tmg.ODE`)
    without a graph; its states are kept on the grid ``t = 0, h, ..., T`` (``h`` the
    nearest divisor of ``T`` to ``save_every``), and the backward of anything computed
    from the result runs ``rule`` (default ``tmg.Adjoint()``, which by default solves the
    adjoint with the same ``solver``, so the meta-gradient is as accurate as the forward
    solve). Graph memory does not grow with ``T``; the states take ``T / h`` flat copies
    of the params.

    For non-smooth networks (ReLU) an adaptive solver may shrink its steps at every
    kink: use a fixed-step method, e.g. ``tmg.ODE("rk4")`` (step = the storage grid) or
    ``tmg.ODE("euler", step_size=...)``. ``ODE.max_steps`` bounds the work of an adaptive
    solve and raises :class:`tmg.ODESolveError` when exceeded.

    Args:
        loss_fn: ``loss_fn(params, batch) -> scalar`` as in :func:`tmg.adapt`.
        params: initial parameters (floating point, requiring grad).
        batch: the inner batch (one objective for the whole flow).
        T: adaptation time > 0 (A-MAML uses 2 and 5, i.e. 200 and 500 steps of 0.01).
        rule: a flow rule (default ``tmg.Adjoint()``).
        solver: the forward solve (default ``tmg.ODE()``: dopri5, rtol 1e-7, atol 1e-9).
        save_every: spacing ``h`` of the stored states (``0 < save_every <= T``).

    Returns:
        ``{name: u(T)}`` with the keys of ``params``.

    Raises:
        ODESolveError: the forward (or backward) solve failed or ran out of steps.
        NonFiniteError: a stored state is not finite.
    """
    rule = Adjoint() if rule is None else rule
    if is_batched(params, batch):  # under torch.func.vmap: one flow per task
        check_rule(rule)
        one = functools.partial(flow, loss_fn, T=T, rule=rule, solver=solver, save_every=save_every)
        return _per_task(one, params, batch, rule, "tmg.flow")
    spec = check_params(params)
    check_callable(loss_fn, "loss_fn")
    check_rule(rule)
    T = check_positive(T, "T")
    save_every = check_positive(save_every, "save_every")
    if save_every > T:
        raise ValueError(f"save_every={save_every:g} is larger than T={T:g}; use save_every <= T")
    solver = _ode.ODE() if solver is None else solver
    if not isinstance(solver, _ode.ODE):
        raise TypeError(f"solver must be a tmg.ODE, got {solver!r}")
    n = max(1, round(T / save_every))
    h = T / n
    rule.validate(n)
    check_fit(rule, rule.needs(n), _offers("tmg.flow", flow_samples=True))
    loss = StepLoss(flat_loss(loss_fn, spec), batch, batchable=True)

    def field(t: Tensor, u: Tensor) -> Tensor:
        with torch.enable_grad():
            leaf = u.detach().requires_grad_(True)
            value = loss.evaluate(leaf, record=False, watch=False)
            _check_scalar(value)
            (grad,) = torch.autograd.grad(value, leaf)
        return -grad

    leaves = list(params.values())
    theta = spec.flatten([t.detach() for t in leaves])
    _check_start(loss, theta)
    times = _ode.linspace(T, n, theta)
    states = _ode.solve("forward gradient-flow solve", field, theta, times, solver, grid_step=h)
    _check_states(states, h)
    meta = closed_meta(loss, states[0], rule)
    record = Record.of_states(spec, states, loss, time_step=h, solver=solver, meta=meta)
    outputs = Link.apply(record, rule, "tmg.flow", *leaves, *meta.tensors)
    return dict(zip(spec.names, outputs, strict=True))


def implicit(
    loss_fn: LossFn, rule: AbstractRule
) -> Callable[[Callable[[dict[str, Tensor], Any], Mapping[str, Tensor]]], Callable[..., Any]]:
    r"""Decorator: differentiate a user's inner solver implicitly (iMAML).

    The decorated ``solver(params, batch) -> adapted`` must (approximately)
    minimize ``loss_fn(phi, batch) + rule.reg / 2 * ||phi - params||^2`` over
    ``phi`` — with any optimizer and any number of steps; it runs without a
    graph. The returned function has the same signature; the backward of
    anything computed from its output solves :math:`(I + H/r) x = g` at the returned
    point with ``rule`` (a fixed-point rule: ``tmg.ImplicitCG``, ``tmg.ImplicitNeumann``),
    whose diagnostics reach ``tmg.diagnostics.collect()``.

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
    check_callable(loss_fn, "loss_fn")
    check_rule(rule)
    # the user's solver minimizes the proximal objective: the proximal term is theirs. Its
    # needs after one step, not zero: a step rule (Exact, Binomial) then asks for step
    # Jacobians, which a solver has none of (with zero steps Exact would return g).
    check_fit(rule, rule.needs(1), _offers("tmg.implicit", flow_samples=False, proximal=True))

    def decorator(
        solver: Callable[[dict[str, Tensor], Any], Mapping[str, Tensor]],
    ) -> Callable[..., dict[str, Tensor]]:
        check_callable(solver, "solver")

        @functools.wraps(solver)
        def wrapped(params: Mapping[str, Tensor], batch: Any = None) -> dict[str, Tensor]:
            if is_batched(params, batch):
                return _per_task(wrapped, params, batch, rule, "tmg.implicit")
            spec = check_params(params)
            anchor = {k: t.detach().clone() for k, t in params.items()}
            with torch.enable_grad():  # the solver may take gradients; the anchor is constant
                out = solver(anchor, batch)
            phi = _flatten_output(out, spec, "solver").detach()
            loss = StepLoss(flat_loss(loss_fn, spec), batch, batchable=True)
            meta = closed_meta(loss, phi, rule)
            theta = spec.flatten([anchor[k] for k in spec.names])
            record = Record.of_states(spec, phi[None], loss, meta=meta, anchor=theta)
            outputs = Link.apply(record, rule, "tmg.implicit", *params.values(), *meta.tensors)
            return dict(zip(spec.names, outputs, strict=True))

        return wrapped

    return decorator


def adjoint(
    loss_fn: LossFn, *, T: float, rule: AbstractRule | None = None
) -> Callable[[Callable[..., Sequence[Mapping[str, Tensor]]]], Callable[..., Any]]:
    r"""Decorator: attach a flow rule's backward (A-MAML) to a user's inner dynamics.

    The decorated ``dynamics(params, batch) -> states`` runs the user's own
    integrator of the gradient flow of ``loss_fn`` (without a graph) and returns
    the list of states ``[u(0), u(h), ..., u(T)]`` on a uniform grid (each a dict
    like ``params``; ``u(0)`` is ``params``). The returned function gives the final
    state ``u(T)``; its backward solves the adjoint ODE over the returned states
    with ``rule`` (default ``tmg.Adjoint()``: the modified Euler scheme).

    The states are checked against ``T``: on the first and last intervals the step
    ``||u_{k+1} - u_k||`` must be within 10% of ``h ||grad l||`` (trapezoid), with
    ``h = T / (len(states) - 1)``; otherwise ``ValueError`` (a wrong ``T`` or grid would
    give a silently wrong meta-gradient).

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
    check_callable(loss_fn, "loss_fn")
    rule = Adjoint() if rule is None else rule
    check_rule(rule)
    T = check_positive(T, "T")
    check_fit(rule, rule.needs(1), _offers("tmg.adjoint", flow_samples=True))

    def decorator(
        dynamics: Callable[..., Sequence[Mapping[str, Tensor]]],
    ) -> Callable[..., dict[str, Tensor]]:
        check_callable(dynamics, "dynamics")

        @functools.wraps(dynamics)
        def wrapped(params: Mapping[str, Tensor], batch: Any = None) -> dict[str, Tensor]:
            if is_batched(params, batch):
                return _per_task(wrapped, params, batch, rule, "tmg.adjoint")
            spec = check_params(params)
            start = {k: t.detach().clone().requires_grad_(True) for k, t in params.items()}
            with torch.enable_grad():  # the dynamics take gradients of the inner loss
                states = dynamics(start, batch)
            if not isinstance(states, Sequence) or len(states) < 2:
                raise ValueError(
                    "the adjoint-decorated function must return the list of states "
                    "[u(0), ..., u(T)] (at least two)"
                )
            flat = torch.stack(
                [_flatten_output(s, spec, f"state {i}").detach() for i, s in enumerate(states)]
            )
            n = len(states) - 1
            h = T / n
            _check_states(flat, h)
            loss = StepLoss(flat_loss(loss_fn, spec), batch, batchable=True)
            _check_grid(loss, flat, h, T)
            rule.validate(n)
            meta = closed_meta(loss, flat[0], rule)
            record = Record.of_states(spec, flat, loss, time_step=h, meta=meta)
            outputs = Link.apply(record, rule, "tmg.adjoint", *params.values(), *meta.tensors)
            return dict(zip(spec.names, outputs, strict=True))

        return wrapped

    return decorator


def _per_task(
    wrapped: Callable[..., dict[str, Tensor]], params: Any, batch: Any, rule: Any, owner: str
) -> dict[str, Tensor]:
    """A front end's ``wrapped(params, batch)`` under ``torch.func.vmap``: once per task."""
    names = list(check_params(params).names)
    outputs = over_tasks(lambda a: wrapped(a[0], a[1]), (dict(params), batch), names, rule, owner)
    return dict(zip(names, outputs, strict=True))


def _offers(name: str, *, flow_samples: bool, proximal: bool = False) -> Offers:
    return Offers(
        name,
        per_step_batches=False,
        flow_samples=flow_samples,
        proximal=proximal,
        step_jacobians=False,
        graph=False,
    )


def _flatten_output(out: Any, spec: FlatSpec, what: str) -> Tensor:
    """The flat vector of a solver's (or dynamics') output, checked against ``params``:
    the same keys, and each value a finite tensor of the parameter's shape, dtype and
    device (nothing is reshaped, cast or moved silently)."""
    if not isinstance(out, Mapping):
        raise TypeError(
            f"{what} must return a dict with the keys of params {list(spec.names)}, got "
            f"{type(out).__name__}"
        )
    missing = [k for k in spec.names if k not in out]
    extra = [k for k in out if k not in spec.names]
    if missing or extra:
        raise ValueError(
            f"{what} must return a dict with the keys of params: missing {missing}, "
            f"unexpected {extra}"
        )
    for k, shape in zip(spec.names, spec.shapes, strict=True):
        t = out[k]
        if not isinstance(t, Tensor):
            raise TypeError(f"{what}[{k!r}] must be a tensor, got {type(t).__name__}")
        if t.shape != shape:
            raise ValueError(
                f"{what}[{k!r}] has shape {tuple(t.shape)} but params[{k!r}] has {tuple(shape)}"
            )
        if t.dtype != spec.dtype or t.device != spec.device:
            raise TypeError(
                f"{what}[{k!r}] is {t.dtype} on {t.device} but params[{k!r}] is "
                f"{spec.dtype} on {spec.device}"
            )
        if not bool(torch.isfinite(t).all()):
            raise NonFiniteError(f"{what}[{k!r}] is not finite")
    return torch.cat([out[k].reshape(-1) for k in spec.names])


def _check_scalar(loss: Any) -> None:
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        raise ValueError("loss_fn must return a scalar tensor")
    if not loss.requires_grad:
        raise ValueError("loss_fn's output does not depend on params")


def _check_start(loss: StepLoss, theta: Tensor) -> None:
    """The inner loss at the flow's start: a real scalar that depends on the params it is
    given, finite with a finite gradient (an ODE solver would otherwise fail with its own
    message, or, on an empty batch whose gradient is zero, return the params unchanged)."""
    refuse_inference_mode("tmg.flow")
    with torch.enable_grad():
        leaf = theta.detach().requires_grad_(True)
        value = check_loss(loss.evaluate(leaf, record=False, watch=False), 0)
        (grad,) = torch.autograd.grad(value, leaf, allow_unused=True)
    if grad is None:
        raise ValueError(not_using_params("loss_fn", 0))
    if not (all_finite(value.detach()) and all_finite(grad)):
        raise NonFiniteError(
            "the inner loss or its gradient is not finite at the flow's start (t=0): "
            + NON_FINITE_CAUSES
        )


def _check_states(states: Tensor, h: float) -> None:
    bad = (~torch.isfinite(states)).flatten(1).any(1)
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        raise NonFiniteError(f"the inner state is not finite at t={i * h:.6g} (stored state {i})")


def _check_grid(loss: StepLoss, states: Tensor, h: float, T: float) -> None:
    """Refuse states that are not the gradient flow of the loss on a grid of step ``h``.

    On the first and last intervals the distance moved must lie between ``h`` times the
    smaller and the larger gradient norm at the two ends (within 5%): true of any
    consistent integrator of the flow, false when ``T`` or the grid is wrong.
    """
    n = states.shape[0] - 1
    for k in sorted({0, n - 1}):
        norms = []
        for u in (states[k], states[k + 1]):
            with torch.enable_grad():
                leaf = u.detach().requires_grad_(True)
                (g,) = torch.autograd.grad(loss(leaf), leaf)
            norms.append(float(g.norm()))
        moved = float((states[k + 1] - states[k]).norm())
        lo, hi = 0.95 * h * min(norms), 1.05 * h * max(norms)
        if lo <= moved <= hi or moved == hi == 0.0:
            continue
        ratio = moved / (h * max(norms)) if moved > hi else moved / (h * min(norms))
        raise ValueError(
            f"the states returned by the dynamics do not match T={T:g}: between states {k} "
            f"and {k + 1} the flow moved {ratio:.3g}x the distance h*||grad l|| expected with "
            f"h = T/{n} = {h:.6g} (it looks like T={T * ratio:.4g}); pass the T the dynamics "
            "integrate over and return every state of the uniform grid"
        )
