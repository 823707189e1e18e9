"""The functional front end: ``tmg.adapt``."""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from torchopt_metagrad._flat import FlatSpec
from torchopt_metagrad.bridge import MetaGradientBridge, discrete_runner
from torchopt_metagrad.engine import checked_loss
from torchopt_metagrad.rules.base import AbstractRule
from torchopt_metagrad.steps import AbstractStepMap, GradientDescent, OptimizerStep
from torchopt_metagrad.trajectory import (
    BatchSchedule,
    InnerProblem,
    check_inner_finite,
)

__all__ = ["adapt"]


def adapt(
    loss_fn: Callable[[dict[str, Tensor], Any], Tensor],
    params: Mapping[str, Tensor],
    batch: Any = None,
    *,
    batches: Sequence[Any] | None = None,
    steps: int,
    lr: float | None = None,
    rule: AbstractRule,
    optimizer: Any = None,
) -> dict[str, Tensor]:
    r"""Adapt ``params`` for ``steps`` inner steps; differentiate with ``rule``.

    Runs :math:`\phi_0 = \theta`, :math:`\phi_{k+1} = \phi_k - \mathrm{lr}\,
    \nabla \ell_k(\phi_k)` (or the steps of ``optimizer``) and returns
    :math:`\phi_K`. Anything computed from the result is differentiable w.r.t.
    ``params``; ``backward()`` / ``torch.autograd.grad`` give the meta-gradient
    estimate of ``rule``. Switching rule changes nothing else.

    Args:
        loss_fn: ``loss_fn(params, batch) -> scalar tensor``, with ``params`` a
            ``dict[str, Tensor]`` shaped like the input (use
            ``torch.func.functional_call(model, params, inputs)`` inside).
        params: the initial parameters, e.g. ``dict(model.named_parameters())``;
            floating point, one dtype and device, all requiring grad.
        batch: passed unchanged to ``loss_fn`` at every step (any object).
        batches: alternatively, exactly ``steps`` batches, one per step.
        steps: number of inner steps K >= 1.
        lr: inner gradient-descent step size > 0 (leave ``None`` with ``optimizer``).
        rule: how to compute the meta-gradient, e.g. ``tmg.Binomial(2)``. A rule
            that declares a proximal term (``tmg.ImplicitCG(reg)``) adds
            ``reg/2 * ||phi - theta||^2`` to the inner loss of every step.
        optimizer: a torchopt functional optimizer (``torchopt.sgd(0.1,
            momentum=0.9)``, ``torchopt.adam(1e-3)``, ...) instead of plain
            gradient descent; the rules then use VJPs of the whole step map
            (parameters and optimizer state).

    Returns:
        ``{name: adapted tensor}`` with the keys of ``params``.

    Raises:
        TypeError, ValueError: an argument is invalid (the message names it).
        NonFiniteError: the inner loss or gradient (forward), or the
            meta-gradient (backward), is not finite; the message names the step.
    """
    spec = check_params(params)
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
    _check_steps(steps)
    steps = int(steps)
    check_rule(rule)
    rule.validate(steps)
    if batches is not None and not rule.supports_per_step_batches:
        raise ValueError(
            f"{type(rule).__name__} differentiates the solution of one inner objective; give "
            "one batch (batch=...), not per-step batches"
        )
    step_map = _make_step_map(lr, optimizer, spec, rule.proximal_reg)
    problem = InnerProblem(loss_fn, spec, step_map, _make_schedule(batch, batches, steps))
    leaves = list(params.values())
    if rule.differentiates_through_loop:
        adapted = _unrolled(problem, leaves)
    else:
        adapted = list(MetaGradientBridge.apply(discrete_runner(problem, rule), rule, *leaves))
    return dict(zip(spec.names, adapted, strict=True))


def check_rule(rule: Any) -> None:
    """Raise ``TypeError`` unless ``rule`` is a meta-gradient rule object."""
    if not isinstance(rule, AbstractRule):
        raise TypeError(
            f"rule must be a meta-gradient rule such as tmg.Exact() or tmg.Binomial(2), "
            f"got {rule!r}"
        )


def _unrolled(problem: InnerProblem, leaves: list[Tensor]) -> list[Tensor]:
    """The inner loop with its whole graph kept (rule ``Unrolled``)."""
    step_map = problem.require_step_map()
    with torch.enable_grad():
        z, aux = step_map.init_state(problem.spec.flatten(leaves))
        for k in range(problem.steps):
            if k > 0 and z.requires_grad:
                z.register_hook(_finite_hook(k))
            params = z[: step_map.param_dim]
            loss = checked_loss(problem, params, k)
            (grad,) = torch.autograd.grad(loss, params, create_graph=True)
            check_inner_finite(loss.detach(), grad.detach(), k)
            z, aux = step_map.advance(z, grad, aux)
    return problem.spec.split(z[: step_map.param_dim])


def _finite_hook(k: int) -> Callable[[Tensor], None]:
    from torchopt_metagrad.rules.base import ensure_finite

    def hook(grad: Tensor) -> None:
        ensure_finite(grad, lambda: f"at inner step {k} (backward through the unrolled graph)")

    return hook


def check_params(params: Any) -> FlatSpec:
    if not isinstance(params, Mapping):
        raise TypeError(
            "params must be a dict of named tensors, e.g. dict(model.named_parameters()), "
            f"got {type(params).__name__}"
        )
    if not params:
        raise ValueError("params is empty")
    first: Tensor | None = None
    for name, t in params.items():
        if not isinstance(name, str):
            raise TypeError(f"params keys must be str, got {name!r}")
        if not isinstance(t, Tensor):
            raise TypeError(f"params[{name!r}] must be a tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"params[{name!r}] must be floating point, got dtype {t.dtype}")
        if not t.requires_grad:
            raise ValueError(
                f"params[{name!r}] does not require grad; pass only the tensors to "
                "meta-learn (requires_grad=True), close over the others in loss_fn"
            )
        if first is None:
            first = t
        elif t.dtype != first.dtype or t.device != first.device:
            raise ValueError(
                f"params[{name!r}] is {t.dtype} on {t.device} but the first param is "
                f"{first.dtype} on {first.device}; all params must share dtype and device"
            )
    return FlatSpec.from_tensors(params)


def _check_steps(steps: Any) -> None:
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral):
        raise TypeError(f"steps must be an int >= 1, got {steps!r}")
    if int(steps) < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")


def _make_step_map(
    lr: Any, optimizer: Any, spec: FlatSpec, proximal: float | None = None
) -> AbstractStepMap:
    if optimizer is not None:
        if lr is not None:
            raise ValueError(
                "give lr (plain gradient descent) or optimizer (which carries its own "
                "learning rate), not both"
            )
        if not (
            callable(getattr(optimizer, "init", None))
            and callable(getattr(optimizer, "update", None))
        ):
            raise TypeError(
                "optimizer must be a torchopt functional optimizer (GradientTransformation "
                f"with init/update), e.g. torchopt.sgd(0.1, momentum=0.9); got {optimizer!r}"
            )
        return OptimizerStep(optimizer, spec, proximal)
    if lr is None:
        raise TypeError("lr is required (the inner step size) unless optimizer is given")
    if isinstance(lr, bool) or not isinstance(lr, numbers.Real):
        raise TypeError(f"lr must be a float > 0, got {lr!r}")
    if not (float(lr) > 0 and math.isfinite(lr)):
        raise ValueError(f"lr must be a finite float > 0, got {lr}")
    return GradientDescent(float(lr), spec.numel, proximal)


def _make_schedule(batch: Any, batches: Sequence[Any] | None, steps: int) -> BatchSchedule:
    if batches is not None:
        if batch is not None:
            raise ValueError(
                "give batch (the same at every step) or batches (one per step), not both"
            )
        if not isinstance(batches, Sequence) or isinstance(batches, (str, bytes)):
            raise TypeError(
                f"batches must be a sequence of {steps} batches, got {type(batches).__name__}"
            )
        if len(batches) != steps:
            raise ValueError(
                f"batches has {len(batches)} entries but steps={steps}; give one per step"
            )
    return BatchSchedule(batch, batches, steps)
