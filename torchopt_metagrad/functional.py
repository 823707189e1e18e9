"""The functional front end: ``tmg.adapt``. Checks arguments, runs the core, links."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from torch import Tensor

from torchopt_metagrad._core.checks import check_batches, check_callable, check_int, check_params
from torchopt_metagrad._core.flat import FlatSpec
from torchopt_metagrad._core.link import Link
from torchopt_metagrad._core.loop import InnerLoop
from torchopt_metagrad._core.needs import Offers, check_fit
from torchopt_metagrad._core.replay import StepLoss
from torchopt_metagrad._core.steps import AbstractStepMap, step_map_factory
from torchopt_metagrad.rules.base import AbstractRule, check_rule

__all__ = ["adapt", "flat_loss", "run_loop"]


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

    Randomness in ``loss_fn`` (dropout) is replayed, not redrawn, when a rule recomputes
    a step, and buffers it updates in place (batch norm's running statistics) are left
    exactly as the forward left them; so every exact rule equals ``Unrolled()``.

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
            momentum=0.9)``, ``torchopt.adam(1e-3)``, ...) or a ``torch.optim.SGD`` /
            ``Adam`` (its hyperparameters) instead of plain gradient descent; the rules
            then use VJPs of the whole step map (parameters and optimizer state).

    Returns:
        ``{name: adapted tensor}`` with the keys of ``params``.

    Raises:
        TypeError, ValueError: an argument is invalid (the message names it).
        NonFiniteError: the inner loss or gradient (forward), or the
            meta-gradient (backward), is not finite; the message names the step.
    """
    spec = check_params(params)
    check_callable(loss_fn, "loss_fn")
    steps = check_int(steps, "steps", minimum=1)
    check_rule(rule)
    rule.validate(steps)
    check_batches(batch, batches, steps)
    needs = rule.needs(steps)
    factory, _, _ = step_map_factory(lr, optimizer)
    step_map = factory(spec, needs.proximal)
    offers = Offers(
        "tmg.adapt",
        per_step_batches=batches is not None,
        flow_samples=step_map.time_step is not None,
    )
    check_fit(rule, needs, offers)
    leaves = list(params.values())
    loop = run_loop(
        loss_fn,
        spec,
        spec.flatten(leaves),
        step_map,
        [batch] * steps if batches is None else list(batches),
        first_needed=lambda n: rule.needs(n).snapshots_from,
        unrolled=needs.graph,
    )
    if needs.graph:
        adapted = spec.split(loop.params)
    else:
        adapted = list(Link.apply(loop.record(), rule, "tmg.adapt", *leaves))
    return dict(zip(spec.names, adapted, strict=True))


def run_loop(
    loss_fn: Callable[[dict[str, Tensor], Any], Tensor],
    spec: FlatSpec,
    theta: Tensor,
    step_map: AbstractStepMap,
    batches: list[Any],
    *,
    first_needed: Callable[[int], int],
    unrolled: bool = False,
) -> InnerLoop:
    """The core's inner loop over ``loss_fn``, one step per batch (a known horizon)."""
    fn = flat_loss(loss_fn, spec)
    loop = InnerLoop(
        spec,
        step_map,
        theta,
        first_needed=first_needed,
        horizon=len(batches),
        unrolled=unrolled,
    )
    for batch in batches:
        loop.step(StepLoss(fn, batch, batchable=True))
    return loop


def flat_loss(
    loss_fn: Callable[[dict[str, Tensor], Any], Tensor], spec: FlatSpec
) -> Callable[[Tensor, Any], Tensor]:
    """``loss_fn`` as a function of flat params (works inside ``torch.func`` transforms)."""
    return lambda flat, batch: loss_fn(spec.unflatten(flat), batch)
