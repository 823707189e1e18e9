"""The functional front end: ``tmg.adapt``. Checks arguments, runs the core, links."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import Tensor

from torchopt_metagrad._core.batched import TaskBatch, run_batched, slices
from torchopt_metagrad._core.checks import (
    check_adapt,
    check_batches,
    check_callable,
    check_int,
    check_params,
)
from torchopt_metagrad._core.closed import closed_over
from torchopt_metagrad._core.engine import warn_once
from torchopt_metagrad._core.flat import FlatSpec
from torchopt_metagrad._core.link import Link, over_tasks
from torchopt_metagrad._core.loop import InnerLoop
from torchopt_metagrad._core.needs import Needs, Offers, check_fit
from torchopt_metagrad._core.replay import StepLoss, evaluate_pure
from torchopt_metagrad._core.steps import AbstractStepMap, step_map_factory
from torchopt_metagrad._core.tasks import is_batched
from torchopt_metagrad.errors import NonFiniteError
from torchopt_metagrad.rules.base import AbstractRule, StepProductRule, check_rule

__all__ = ["Layout", "adapt", "flat_loss", "run_loop"]


def adapt(
    loss_fn: Callable[[dict[str, Tensor], Any], Tensor],
    params: Mapping[str, Tensor],
    batch: Any = None,
    *,
    batches: Sequence[Any] | None = None,
    steps: int,
    lr: float | Tensor | Mapping[str, Tensor] | None = None,
    rule: AbstractRule,
    optimizer: Any = None,
    adapt: Sequence[str] | None = None,
) -> dict[str, Tensor]:
    r"""Adapt ``params`` for ``steps`` inner steps; differentiate with ``rule``.

    Runs :math:`\phi_0 = \theta`, :math:`\phi_{k+1} = \phi_k - \mathrm{lr}\,
    \nabla \ell_k(\phi_k)` (or the steps of ``optimizer``) and returns
    :math:`\phi_K`. Anything computed from the result is differentiable w.r.t.
    ``params``; ``backward()`` / ``torch.autograd.grad`` give the meta-gradient
    estimate of ``rule``. Switching rule changes nothing else.

    Meta-parameters: every other tensor the inner loop depends on that requires grad
    gets its meta-gradient under the rule too (see each rule's docstring for its
    definition): a learned ``lr``, the fixed entries of ``params`` (``adapt=``), and
    leaves that ``loss_fn`` closes over (a body's parameters, a weight-decay
    coefficient), found in the first step's graph.

    Randomness in ``loss_fn`` (dropout) is replayed, not redrawn, when a rule recomputes
    a step, and buffers it updates in place (batch norm's running statistics) are left
    exactly as the forward left them; so every exact rule equals ``Unrolled()``.

    Args:
        loss_fn: ``loss_fn(params, batch) -> scalar tensor``, with ``params`` a
            ``dict[str, Tensor]`` shaped like the input (use
            ``torch.func.functional_call(model, params, inputs)`` inside).
        params: the initial parameters, e.g. ``dict(model.named_parameters())``. The
            adapted ones must be floating point, of one dtype and device, and require grad.
        batch: passed unchanged to ``loss_fn`` at every step (any object).
        batches: alternatively, exactly ``steps`` batches, one per step (their tensors
            must not require grad).
        steps: number of inner steps K >= 1.
        lr: inner gradient-descent step size: a float > 0, or a tensor (a learned
            rate; it may require grad): 0-dim, or shape ``(steps,)`` (one per step,
            MAML++), or a dict ``{name: tensor}`` over the adapted names, each shaped
            like its parameter or 0-dim (Meta-SGD). Leave ``None`` with ``optimizer``.
        rule: how to compute the meta-gradient, e.g. ``tmg.Binomial(2)``. A rule
            that declares a proximal term (``tmg.ImplicitCG(reg)``) adds
            ``reg/2 * ||phi - theta||^2`` to the inner loss of every step.
        optimizer: a torchopt functional optimizer (``torchopt.sgd(0.1,
            momentum=0.9)``, ``torchopt.adam(1e-3)``, ...) or a ``torch.optim.SGD`` /
            ``Adam`` (its hyperparameters) instead of plain gradient descent; the rules
            then use VJPs of the whole step map (parameters and optimizer state).
        adapt: names of the entries of ``params`` to adapt (default: all). The others
            are held fixed (e.g. ANIL's body, or features computed by it) and passed to
            ``loss_fn`` as given; those that require grad get their meta-gradient
            through the inner loop under the rule (plus the outer loss's direct use).

    Returns:
        ``{name: tensor}`` with the keys of ``params``: the adapted tensors, and the
        fixed entries as given.

    Raises:
        TypeError, ValueError: an argument is invalid (the message names it), or the
            rule cannot differentiate a meta-parameter (the message names it).
        NonFiniteError: the inner loss or gradient (forward), or the
            meta-gradient (backward), is not finite; the message names the step.
    """
    names = check_adapt(adapt, params)
    if is_batched(params, batch, batches, lr):  # under torch.func.vmap: one loop per task
        check_callable(loss_fn, "loss_fn")
        steps = check_int(steps, "steps", minimum=1)
        check_rule(rule)
        rule.validate(steps)
        check_batches(batch, batches, steps)
        keep = dict(steps=steps, rule=rule, optimizer=optimizer, adapt=adapt)
        outputs = over_tasks(
            lambda a: _adapt(loss_fn, a[0], a[1], batches=a[2], lr=a[3], **keep),
            (dict(params), batch, batches, lr),
            names,
            rule,
            "tmg.adapt",
            fast=partial(_all_tasks, loss_fn, names, steps, rule, optimizer),
        )
        by_name = dict(zip(names, outputs, strict=True))
        return {n: by_name.get(n, params[n]) for n in params}
    spec = check_params({n: params[n] for n in names} if adapt is not None else params)
    layout = None if adapt is None else Layout.of(params, names)
    check_callable(loss_fn, "loss_fn")
    steps = check_int(steps, "steps", minimum=1)
    check_rule(rule)
    rule.validate(steps)
    check_batches(batch, batches, steps)
    by_id = {id(t): n for n, t in params.items()}
    factory, _, held = step_map_factory(lr, optimizer, steps=steps, names=by_id)
    if held is not None:
        _check_held(held, params, spec.names)
    loss_meta = () if layout is None else tuple(params[n] for n in layout.meta_names)
    needs = rule.needs(steps, meta=bool(loss_meta))
    step_map = factory(spec, needs.proximal)
    offers = Offers(
        "tmg.adapt",
        per_step_batches=batches is not None,
        flow_samples=step_map.time_step is not None,
        step_meta=bool(step_map.meta),
    )
    check_fit(rule, needs, offers)
    leaves = [params[n] for n in spec.names]
    loop = run_loop(
        loss_fn,
        spec,
        spec.flatten(leaves),
        step_map,
        [batch] * steps if batches is None else list(batches),
        needs=lambda n, meta: rule.needs(n, meta=meta),
        unrolled=needs.graph,
        layout=layout,
        loss_meta=loss_meta,
        rule_name=type(rule).__name__,
    )
    if needs.graph:
        final = spec.split(loop.params)
    else:
        record = loop.record()
        final = list(Link.apply(record, rule, "tmg.adapt", *leaves, *record.meta.tensors))
    out = dict(zip(spec.names, final, strict=True))
    return out if layout is None else {n: out.get(n, params[n]) for n in params}


_adapt = adapt  # inside adapt, the name is its argument


def _all_tasks(
    loss_fn: Any,
    names: tuple[str, ...],
    steps: int,
    rule: AbstractRule,
    optimizer: Any,
    args: Any,
    dims: Any,
    size: int,
) -> Sequence[Tensor] | None:
    """Every task's inner loop at once (``_core.batched``), or ``None`` when that does
    not apply: meta-parameters, a fixed-point or flow rule, a loss that draws random
    numbers or writes buffers, or one that torch.func cannot run."""
    params, batch, batches, lr = args
    p_dims, b_dims, bs_dims, _ = dims
    # Not Unrolled: plain autograd through torch.func.grad (its batched loop's graph) is
    # wrong on convolution + batch-norm nets in torch 2.13 (7.7% off on torchopt's
    # FuncTorch MAML example); the per-task path's double backward is right.
    if isinstance(lr, (Tensor, Mapping)) or not isinstance(rule, StepProductRule):
        return None
    fixed = [n for n in params if n not in names]
    if any(params[n].requires_grad or p_dims[n] is not None for n in fixed):
        return None  # fixed entries that are meta-parameters, or differ per task
    check_params({n: params[n] for n in names})  # the unbatched tensors
    shapes = {n: _task_shape(params[n], p_dims[n]) for n in names}
    first = params[names[0]]
    spec = FlatSpec(
        names,
        tuple(shapes.values()),
        tuple(s.numel() for s in shapes.values()),
        first.dtype,
        first.device,
    )
    layout = None if len(names) == len(params) else Layout.of(params, names)
    fn = flat_loss(loss_fn, spec, layout)
    factory, _, _ = step_map_factory(lr, optimizer, steps=steps)
    step_map = factory(spec, None)
    per_step = (
        [TaskBatch(batch, b_dims)] * steps
        if batches is None
        else [TaskBatch(b, d) for b, d in zip(batches, bs_dims, strict=True)]
    )
    distinct = {id(b.tree): b for b in per_step}.values()  # every step's batch, once
    if not all(_plain_loss(fn, spec, params, p_dims, b) for b in distinct):
        return None
    thetas = [params[n] for n in names]
    theta_dims = [p_dims[n] for n in names]
    needs = rule.needs(steps)
    if needs.checkpoints is not None or needs.kept_graphs:
        return None  # per-task records: they recompute between checkpoints, or keep graphs
    try:
        out = run_batched(
            fn,
            spec,
            step_map,
            thetas,
            theta_dims,
            per_step,
            size,
            first=needs.snapshots_from,
            unrolled=needs.graph,
        )
    except (RuntimeError, NotImplementedError, ValueError) as err:
        if isinstance(err, NonFiniteError):
            raise
        warn_once(
            "tasks:" + type(err).__name__,
            f"torch.func.vmap could not run the tasks' inner loops together "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); "
            "they run one after another (same result, slower)",
        )
        return None
    if isinstance(out, tuple):  # Unrolled: the batched loop's graph
        return out
    return Link.apply(out, rule, "tmg.adapt", *thetas)


def _check_held(held: Sequence[Tensor], params: Mapping[str, Tensor], names: Sequence[str]) -> None:
    """A ``torch.optim`` optimizer must hold exactly the adapted tensors: ``tmg.adapt``
    adapts ``params`` (or ``adapt=``), not the optimizer's list, so a difference would
    silently adapt other tensors than the optimizer names."""
    ids = {id(t) for t in held}
    missing = [n for n in names if id(params[n]) not in ids]
    extra = len(ids - {id(params[n]) for n in names})
    if missing or extra:
        raise ValueError(
            "optimizer holds other tensors than the ones tmg.adapt adapts"
            + (f": it does not hold {missing}" if missing else "")
            + (f"{';' if missing else ':'} it holds {extra} tensor(s) not adapted" if extra else "")
            + "; pass adapt=[the names of the optimizer's tensors] (the others stay fixed), "
            "or build the optimizer over every adapted tensor"
        )


def _task_shape(t: Tensor, dim: int | None) -> torch.Size:
    if dim is None:
        return t.shape
    return torch.Size(s for i, s in enumerate(t.shape) if i != dim)


def _plain_loss(fn: Any, spec: FlatSpec, params: Any, dims: Any, batch: TaskBatch) -> bool:
    """Task 0's first loss draws no random numbers, writes no buffers and closes over no
    tensor that requires grad (else the per-task path handles it). No side effects."""
    theta = spec.flatten([_slice(params[n], dims[n]) for n in spec.names])
    with torch.enable_grad():
        leaf = theta.detach().requires_grad_(True)
        value, pure = evaluate_pure(fn, leaf, slices(batch.tree, batch.dims, 0))
    return pure and isinstance(value, Tensor) and not closed_over([value], [leaf])


def _slice(t: Tensor, dim: int | None) -> Tensor:
    return t if dim is None else t.select(dim, 0)


def run_loop(
    loss_fn: Callable[[dict[str, Tensor], Any], Tensor],
    spec: FlatSpec,
    theta: Tensor,
    step_map: AbstractStepMap,
    batches: list[Any],
    *,
    needs: Callable[[int, bool], Needs],
    unrolled: bool = False,
    layout: Layout | None = None,
    loss_meta: tuple[Tensor, ...] = (),
    rule_name: str = "the rule",
) -> InnerLoop:
    """The core's inner loop over ``loss_fn``, one step per batch (a known horizon)."""
    fn = flat_loss(loss_fn, spec, layout)
    loop = InnerLoop(
        spec,
        step_map,
        theta,
        needs=needs,
        horizon=len(batches),
        unrolled=unrolled,
        loss_meta=loss_meta,
        rule_name=rule_name,
    )
    for batch in batches:
        loop.step(StepLoss(fn, batch, batchable=True, meta=loss_meta))
    return loop


@dataclass(frozen=True)
class Layout:
    """``params`` split by ``adapt=``: adapted entries, fixed meta-parameters (requiring
    grad), fixed constants; :meth:`merge` puts them back together in ``params``' order."""

    order: tuple[str, ...]
    adapted: tuple[str, ...]
    meta_names: tuple[str, ...]
    constants: dict[str, Tensor]

    @classmethod
    def of(cls, params: Mapping[str, Tensor], adapted: tuple[str, ...]) -> Layout:
        fixed = [n for n in params if n not in adapted]
        return cls(
            order=tuple(params),
            adapted=adapted,
            meta_names=tuple(n for n in fixed if params[n].requires_grad),
            constants={n: params[n] for n in fixed if not params[n].requires_grad},
        )

    def merge(self, adapted: list[Tensor], meta: tuple[Tensor, ...]) -> dict[str, Tensor]:
        parts = dict(zip(self.adapted, adapted, strict=True))
        parts.update(zip(self.meta_names, meta, strict=True))
        parts.update(self.constants)
        return {n: parts[n] for n in self.order}


def flat_loss(
    loss_fn: Callable[[dict[str, Tensor], Any], Tensor],
    spec: FlatSpec,
    layout: Layout | None = None,
) -> Callable[[Tensor, Any, tuple[Tensor, ...]], Tensor]:
    """``loss_fn`` as ``fn(flat, batch, meta)`` (works inside ``torch.func`` transforms).

    With a :class:`Layout` (``adapt=``), ``loss_fn`` gets every entry of ``params``: the
    adapted ones from ``flat``, the fixed meta-parameters from ``meta`` and the fixed
    constants as given, in the order of ``params``.
    """
    if layout is None:
        return lambda flat, batch, meta: loss_fn(spec.unflatten(flat), batch)
    return lambda flat, batch, meta: loss_fn(layout.merge(spec.split(flat), meta), batch)
