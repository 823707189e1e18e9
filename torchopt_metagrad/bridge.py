"""The autograd node that links the initial parameters to the adapted ones.

``MetaGradientBridge`` runs the inner loop in its forward (without a graph,
recording snapshots) and, when the outer loss is backpropagated, asks the rule
for the meta-gradient. So ``outer_loss.backward()`` and ``torch.autograd.grad``
give the rule's estimate on the initial parameters, and any outer optimizer
works unchanged. The backward is once-differentiable: for higher-order
derivatives of the meta-gradient use ``Unrolled``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from torchopt_metagrad._flat import FlatSpec
from torchopt_metagrad.rules.base import AbstractRule, StepJacobians, ensure_finite
from torchopt_metagrad.trajectory import InnerProblem, Trajectory, run_inner_loop

__all__ = ["MetaGradientBridge", "Runner", "discrete_runner", "run_rule"]

#: Runs an inner problem from flat initial parameters without a graph:
#: ``theta -> (z_final, trajectory)``.
Runner = Callable[[Tensor], tuple[Tensor, Trajectory]]


def discrete_runner(problem: InnerProblem, rule: AbstractRule) -> Runner:
    """The runner of ``tmg.adapt``: K discrete steps, storing what ``rule`` needs."""
    first = rule.first_step_needed(problem.steps)
    return lambda theta: run_inner_loop(problem, theta, first)


def run_rule(
    rule: AbstractRule,
    jac: StepJacobians,
    spec: FlatSpec,
    grad_outputs: Sequence[Tensor | None],
    state_dim: int,
    what: str,
) -> Tensor:
    """The rule's meta-gradient (parameter block) for the outer gradient ``grad_outputs``.

    Shared by every autograd node that ends an inner loop: flattens the outer
    gradient (``None`` -> zeros), checks it is finite (``what`` says what it is),
    pads it with zeros for the optimizer-state block, and runs the rule.
    """
    g = spec.flatten(
        [
            torch.zeros(s, dtype=spec.dtype, device=spec.device) if go is None else go
            for go, s in zip(grad_outputs, spec.shapes, strict=True)
        ]
    )
    ensure_finite(g, lambda: f"before the backward: {what}")
    if state_dim > spec.numel:
        g = torch.cat([g, g.new_zeros(state_dim - spec.numel)])
    return rule.meta_gradient(jac, g)[: spec.numel]


_RELEASED = torch.empty(0)  # placeholder while the snapshots live in saved_tensors


class MetaGradientBridge(torch.autograd.Function):
    """``(runner, rule, *theta) -> phi_K``; backward runs ``rule.meta_gradient``."""

    @staticmethod
    def forward(ctx: Any, runner: Runner, rule: AbstractRule, *theta: Tensor) -> tuple[Tensor, ...]:
        z0 = torch.cat([t.detach().reshape(-1) for t in theta])
        z_final, trajectory = runner(z0)
        spec = trajectory.problem.spec
        ctx.rule = rule
        # The snapshots go through save_for_backward so autograd frees them after the
        # backward (unless retain_graph=True), instead of living as long as the outputs.
        ctx.save_for_backward(trajectory.snapshots)
        ctx.trajectory = dataclasses.replace(trajectory, snapshots=_RELEASED)
        return tuple(t.clone() for t in spec.split(z_final[: spec.numel]))

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, *grad_outputs: Tensor | None) -> tuple[Tensor | None, ...]:
        (snapshots,) = ctx.saved_tensors
        trajectory = dataclasses.replace(ctx.trajectory, snapshots=snapshots)
        problem = trajectory.problem
        spec = problem.spec
        meta = run_rule(
            ctx.rule,
            trajectory,
            spec,
            grad_outputs,
            trajectory.snapshots.shape[1],
            "the outer loss's gradient w.r.t. the adapted params is not finite",
        )
        return (None, None, *(t.clone() for t in spec.split(meta)))
