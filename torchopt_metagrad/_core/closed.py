"""Tensors an inner loss closes over: found in its autograd graph, never silently dropped.

A snapshot rule recomputes each step's inner loss at a stored state and differentiates
it with respect to what it knows: the adapted parameters and the meta-parameters it was
given (a learned lr, fixed entries of ``params``). A tensor that the loss *closes over*
and that requires grad (a network body used inside ``loss_fn``, a weight-decay
coefficient, features computed outside) would get no gradient through the inner loop.

:func:`closed_over` walks the autograd graph of one evaluation of the loss (the first
inner step's) from its value to the leaves, stopping at the adapted parameters and the
known meta-parameters, and returns every other leaf that requires grad. The inner loop
then treats those leaves as meta-parameters (the rules differentiate them; the one
autograd node returns their meta-gradients). Walking to *leaves* (through tensors
computed outside the loss, e.g. a body's features) keeps the paths disjoint: in a
replay the known meta-parameters are detached copies, so no gradient is counted twice.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["closed_meta", "closed_over", "describe", "reaches"]


def closed_over(outputs: Sequence[Tensor], stop: Sequence[Tensor]) -> list[Tensor]:
    """Leaves requiring grad that ``outputs`` depend on other than through ``stop``.

    ``stop`` tensors (leaves or not) end the walk where their node is reached; a
    multi-output node is matched by output index, so a sibling output is still walked.
    """
    stop_leaves = {id(t) for t in stop if t.grad_fn is None}
    stop_edges = {(t.grad_fn, t.output_nr) for t in stop if t.grad_fn is not None}
    found: dict[int, Tensor] = {}
    seen: set[torch.autograd.graph.Node] = set()
    stack: list[tuple[torch.autograd.graph.Node | None, int]] = [
        (t.grad_fn, t.output_nr) for t in outputs if t.grad_fn is not None
    ]
    while stack:
        node, nr = stack.pop()
        if node is None or (node, nr) in stop_edges or node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)  # AccumulateGrad: a leaf
        if isinstance(variable, Tensor):
            if id(variable) not in stop_leaves:
                found.setdefault(id(variable), variable)
            continue
        stack.extend(node.next_functions)
    return list(found.values())


def reaches(output: Tensor, targets: Sequence[Tensor]) -> bool:
    """Whether ``output``'s autograd graph reaches any of ``targets`` (leaves or not)."""
    leaves = {id(t) for t in targets if t.grad_fn is None}
    edges = {(t.grad_fn, t.output_nr) for t in targets if t.grad_fn is not None}
    nodes = {node for node, _ in edges}
    if output.grad_fn is None:
        return id(output) in leaves
    seen: set[torch.autograd.graph.Node] = set()
    stack: list[tuple[torch.autograd.graph.Node | None, int]] = [(output.grad_fn, output.output_nr)]
    while stack:
        node, nr = stack.pop()
        if node is None:
            continue
        if (node, nr) in edges:
            return True
        if node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)
        if isinstance(variable, Tensor):
            if id(variable) in leaves:
                return True
            continue
        stack.extend((n, i) for n, i in node.next_functions if n in nodes or n not in seen)
    return False


def closed_meta(loss: Any, params: Tensor, rule: Any) -> Any:
    """The :class:`~torchopt_metagrad._core.engine.Meta` of the leaves that ``loss`` (a
    ``StepLoss``) closes over, from one evaluation at flat ``params``; raises if ``rule``
    cannot differentiate them (front ends without an inner loop: flows, solvers)."""
    from torchopt_metagrad._core.engine import Meta

    with torch.enable_grad():
        leaf = params.detach().requires_grad_(True)
        value = loss(leaf)
    found = closed_over([value], [leaf]) if isinstance(value, Tensor) else []
    if found and not rule.needs(1, meta=True).meta_params:
        raise ValueError(
            f"{type(rule).__name__} does not compute meta-gradients for tensors besides the "
            f"adapted params, and loss_fn depends on {describe(found[0])} that requires "
            "grad. Use tmg.ImplicitCG / tmg.ImplicitNeumann, or detach it"
        )
    return Meta(closed=tuple(found))


def describe(t: Tensor) -> str:
    """``"a tensor of shape (3, 4), torch.float64"`` (``nn.Parameter`` named as such)."""
    kind = "an nn.Parameter" if isinstance(t, torch.nn.Parameter) else "a tensor"
    return f"{kind} of shape {tuple(t.shape)}, {t.dtype} on {t.device}"
