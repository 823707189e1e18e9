"""The one autograd node that links a record to the initial parameters.

``Link.apply(record, rule, owner, *theta, *record.meta.tensors)`` returns the parameters
of the record's final state; when anything computed from them is backpropagated, its
backward runs the rule on the record and returns the meta-gradient for ``theta`` and
for the meta-parameters (a learned lr, fixed params, closed-over leaves), which autograd
passes on into their histories. Every front end uses it:
``tmg.adapt``, ``tmg.flow``, the decorators and the module optimizers. So
``outer_loss.backward()`` and ``torch.autograd.grad`` give the rule's estimate, and any
outer optimizer works unchanged.

The meta-gradient is once-differentiable: a backward with ``create_graph=True`` (a
second derivative through the rule) raises, naming the rule and pointing to
``Unrolled()``, instead of silently treating the meta-gradient as a constant.

Diagnostics a rule returns (an :class:`Estimate`) are published to the collectors of
:func:`collect` (``tmg.diagnostics.collect``), the one channel they reach users by.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils._pytree import tree_flatten, tree_unflatten

from torchopt_metagrad._core.checks import ensure_finite
from torchopt_metagrad._core.closed import describe
from torchopt_metagrad._core.protocol import Estimate
from torchopt_metagrad._core.record import Record
from torchopt_metagrad._core.tasks import TaskJob
from torchopt_metagrad.errors import NonFiniteError

__all__ = ["Link", "RuleReport", "collect", "over_tasks"]


@dataclass(frozen=True)
class RuleReport:
    """What one backward of a rule reported.

    Attributes:
        rule: the rule object.
        front_end: where the inner loop ran (``"tmg.adapt"``, ``"MetaSGD"``, ...).
        steps: number of inner steps differentiated.
        info: the rule's diagnostics (e.g. ``tmg.CGInfo``), ``None`` if it has none.
        products: the Jacobian-/Hessian-vector products this backward computed (``A_k v``,
            ``H v``, meta-parameter pullbacks; a batched call of ``n`` rows counts ``n``).
    """

    rule: Any
    front_end: str
    steps: int
    info: Any
    products: int = 0


_collectors: list[list[RuleReport]] = []
_lock = threading.Lock()  # backward may run on autograd's device threads (CUDA)


@contextlib.contextmanager
def collect() -> Iterator[list[RuleReport]]:
    """Collect a :class:`RuleReport` for every meta-gradient computed inside the block.

    ::

        with tmg.diagnostics.collect() as reports:
            outer_loss.backward()
        reports[0].info  # e.g. CGInfo(iterations=7, residual=3e-7, converged=True)
    """
    reports: list[RuleReport] = []
    with _lock:
        _collectors.append(reports)
    try:
        yield reports
    finally:
        with _lock:
            _collectors.remove(reports)


def _publish(report: RuleReport) -> None:
    with _lock:
        for reports in _collectors:
            reports.append(report)


class Link(torch.autograd.Function):
    """``(record, rule, owner, *theta, *meta) -> params of the final state``; backward runs
    the rule.

    Under ``torch.func.vmap`` (a front end called on one task of a batch of tasks), the
    front end passes a :class:`~torchopt_metagrad._core.tasks.TaskJob` instead of a record,
    with every tensor the job reads as an input; :meth:`vmap` runs the job per task on the
    unbatched tensors (each task's inner loop and record as without vmap) and stacks the
    results, so each task's meta-gradient is the rule's, exactly as in a loop over tasks.
    """

    @staticmethod
    def forward(record: Any, rule: Any, owner: str, *inputs: Tensor) -> Any:
        if isinstance(record, TaskJob):
            raise RuntimeError(
                f"{owner}: internal error: a per-task job reached the forward outside vmap"
            )
        return record.outputs()

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        record, ctx.rule, ctx.owner = inputs[:3]
        # Snapshots go through save_for_backward so autograd frees them after the backward
        # (unless retain_graph=True) instead of living as long as the outputs.
        ctx.save_for_backward(*record.take_tensors())
        ctx.record = record

    @staticmethod
    def vmap(
        info: Any, in_dims: tuple[Any, ...], job: Any, rule: Any, owner: str, *inputs: Tensor
    ) -> tuple[tuple[Tensor, ...], tuple[int, ...]]:
        if not isinstance(job, TaskJob):
            raise RuntimeError(f"{owner} cannot run under torch.func.vmap from a finished record")
        return job.per_task(info.batch_size, in_dims[3:], inputs)

    @staticmethod
    def backward(ctx: Any, *grad_outputs: Tensor | None) -> Any:
        rule, owner = ctx.rule, ctx.owner
        if torch.is_grad_enabled():
            raise RuntimeError(
                f"{type(rule).__name__} (in {owner}) computes a once-differentiable "
                "meta-gradient from snapshots: it cannot be differentiated again "
                "(create_graph=True, a Hessian-vector product of the outer objective, ...). "
                "Use rule=tmg.Unrolled(), which keeps the whole graph, for higher-order "
                "derivatives"
            )
        record: Record = ctx.record
        if record.blocked():  # a pullback of a later step wants partial derivatives
            return (None, None, None, *(None for _ in ctx.needs_input_grad[3:]))
        record.put_tensors(ctx.saved_tensors)
        try:
            theta_grad, meta_grad = run_rule(rule, record, grad_outputs, owner)
        finally:
            record.take_tensors()  # autograd owns the snapshots: free them with its graph
        metas = record.meta.tensors
        parts = meta_grad.split([t.numel() for t in metas]) if metas else ()
        return (
            None,
            None,
            None,
            *record.theta_grads(theta_grad),
            *(p.view(t.shape).to(t.dtype) for p, t in zip(parts, metas, strict=True)),
        )


def over_tasks(
    call: Callable[[Any], Mapping[str, Tensor]],
    args: Any,
    names: Sequence[str],
    rule: Any,
    owner: str,
    fast: Callable[[Any, Any, int], Sequence[Tensor] | None] | None = None,
) -> list[Tensor]:
    """A front end's outputs ``names`` under ``torch.func.vmap``: ``call(args)`` per task.

    ``args`` is a pytree of the front end's arguments; its tensors (batched or not) go
    through the node, whose vmap rule runs ``fast(args, dims, size)`` (all tasks at once,
    ``dims`` the task dimension of each leaf; ``None`` if it does not apply) or else
    ``call`` on each task's slices.
    """
    leaves, treedef = tree_flatten(args)
    where = [i for i, t in enumerate(leaves) if isinstance(t, Tensor)]

    def rebuild(tensors: Sequence[Any], *, dims: bool = False) -> Any:
        task = [None] * len(leaves) if dims else list(leaves)  # dims: None = not batched
        for i, t in zip(where, tensors, strict=True):
            task[i] = t
        return tree_unflatten(task, treedef)

    def run(tensors: list[Tensor]) -> list[Tensor]:
        out = call(rebuild(tensors))
        return [out[n] for n in names]

    def batched(size: int, dims: Sequence[int | None], tensors: Sequence[Tensor]) -> Any:
        assert fast is not None
        return fast(rebuild(tensors), rebuild(dims, dims=True), size)

    job = TaskJob(run, owner, batched if fast is not None else None)
    return list(Link.apply(job, rule, owner, *(leaves[i] for i in where)))


def _hint(record: Any) -> str:
    """A likely cause of a non-finite backward through an optimizer with state."""
    if getattr(record.step_map, "optimizer", None) is None:
        return ""
    return (
        ". With Adam, RMSprop or Adagrad as the inner optimizer, a gradient entry that is "
        "exactly zero (a dead ReLU unit, an unused parameter) puts a square root at zero in "
        "the step, whose derivative is infinite: give the optimizer eps_root > 0 (e.g. "
        "torchopt.adam(lr, eps_root=1e-8), tmg.MetaAdam(..., eps_root=1e-8))"
    )


def run_rule(
    rule: Any, record: Record, grad_outputs: Sequence[Tensor | None], owner: str
) -> tuple[Tensor, Tensor]:
    """The rule's meta-gradient for the outer gradient ``grad_outputs``: the parameter
    block and the flat meta-parameter vector.

    Flattens the outer gradient (``None`` -> zeros), checks it is finite, pads it with
    zeros for the optimizer-state block, runs the rule and publishes its diagnostics.
    """
    try:
        rule.validate(record.steps)
    except ValueError as err:
        raise ValueError(
            f"{err} (the outer loss uses the parameters after {record.steps} "
            f"inner step(s) of {owner})"
        ) from None
    spec = record.spec
    g = record.outer_vector(grad_outputs)
    ensure_finite(
        g,
        lambda: (
            f"before the backward: the outer loss's gradient w.r.t. the adapted params "
            f"after {record.steps} inner step(s) ({owner}) is not finite"
        ),
    )
    before = record.products
    try:
        result = rule.meta_gradient(record, g)
    except NonFiniteError as err:
        raise NonFiniteError(f"{err}{_hint(record)}") from None
    info, meta = None, None
    if isinstance(result, Estimate):
        out, info, meta = result.value, result.info, result.meta
    else:
        out = result
    if record.meta_dim and (meta is None or meta.shape != (record.meta_dim,)):
        raise RuntimeError(
            f"{type(rule).__name__} returned no meta-gradient for the inner loop's "
            f"meta-parameters ({', '.join(describe(t) for t in record.meta.tensors)}): it "
            "does not support tensors besides the adapted params (a learned lr, fixed or "
            "closed-over tensors that require grad). Use a built-in rule, or detach them"
        )
    _publish(RuleReport(rule, owner, record.steps, info, record.products - before))
    theta_grad = out[..., : spec.numel]
    ensure_finite(theta_grad, lambda: f"in {type(rule).__name__}'s result ({owner})")
    if meta is None:
        meta = theta_grad.new_zeros(0)
    ensure_finite(meta, lambda: f"in {type(rule).__name__}'s meta-parameter result ({owner})")
    return theta_grad, meta
