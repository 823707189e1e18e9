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
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from torchopt_metagrad._core.checks import ensure_finite
from torchopt_metagrad._core.closed import describe
from torchopt_metagrad._core.protocol import Estimate
from torchopt_metagrad._core.record import Record

__all__ = ["Link", "RuleReport", "collect"]


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
    the rule."""

    @staticmethod
    def forward(ctx: Any, record: Record, rule: Any, owner: str, *inputs: Tensor) -> Any:
        ctx.rule, ctx.owner = rule, owner
        # Snapshots go through save_for_backward so autograd frees them after the backward
        # (unless retain_graph=True) instead of living as long as the outputs.
        spec = record.spec
        outputs = tuple(t.clone() for t in spec.split(record.final[: spec.numel].detach()))
        ctx.save_for_backward(*record.take_tensors())
        ctx.record = record
        return outputs

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
            *(t.clone() for t in record.spec.split(theta_grad)),
            *(p.view(t.shape).to(t.dtype) for p, t in zip(parts, metas, strict=True)),
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
    g = spec.flatten(
        [
            torch.zeros(s, dtype=spec.dtype, device=spec.device) if go is None else go
            for go, s in zip(grad_outputs, spec.shapes, strict=True)
        ]
    )
    ensure_finite(
        g,
        lambda: (
            f"before the backward: the outer loss's gradient w.r.t. the adapted params "
            f"after {record.steps} inner step(s) ({owner}) is not finite"
        ),
    )
    if record.state_dim > spec.numel:
        g = torch.cat([g, g.new_zeros(record.state_dim - spec.numel)])
    before = record.products
    result = rule.meta_gradient(record, g)
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
    theta_grad = out[: spec.numel]
    ensure_finite(theta_grad, lambda: f"in {type(rule).__name__}'s result ({owner})")
    if meta is None:
        meta = theta_grad.new_zeros(0)
    ensure_finite(meta, lambda: f"in {type(rule).__name__}'s meta-parameter result ({owner})")
    return theta_grad, meta
