"""The autograd node that links the initial parameters to the adapted ones.

``MetaGradientBridge`` runs the inner loop in its forward (without a graph,
recording snapshots) and, when the outer loss is backpropagated, asks the rule
for the meta-gradient. So ``outer_loss.backward()`` and ``torch.autograd.grad``
give the rule's estimate on the initial parameters, and any outer optimizer
works unchanged. The backward is once-differentiable: for higher-order
derivatives of the meta-gradient use ``Unrolled``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from torchopt_metagrad.rules.base import AbstractRule, ensure_finite
from torchopt_metagrad.trajectory import InnerProblem, run_inner_loop

__all__ = ["MetaGradientBridge"]


class MetaGradientBridge(torch.autograd.Function):
    """``(problem, rule, *theta) -> phi_K``; backward runs ``rule.meta_gradient``."""

    @staticmethod
    def forward(
        ctx: Any, problem: InnerProblem, rule: AbstractRule, *theta: Tensor
    ) -> tuple[Tensor, ...]:
        spec = problem.spec
        z0 = spec.flatten([t.detach() for t in theta])
        z_final, trajectory = run_inner_loop(problem, z0, rule.first_step_needed(problem.steps))
        ctx.rule = rule
        ctx.trajectory = trajectory
        return tuple(t.clone() for t in spec.split(z_final[: spec.numel]))

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, *grad_outputs: Tensor | None) -> tuple[Tensor | None, ...]:
        trajectory = ctx.trajectory
        problem = trajectory.problem
        spec = problem.spec
        g = spec.flatten(
            [
                torch.zeros(s, dtype=spec.dtype, device=spec.device) if go is None else go
                for go, s in zip(grad_outputs, spec.shapes, strict=True)
            ]
        )
        ensure_finite(
            g,
            lambda: (
                "before the backward: the outer loss's gradient w.r.t. the adapted "
                "params is not finite"
            ),
        )
        extra = problem.step_map.dim - spec.numel
        if extra:
            g = torch.cat([g, g.new_zeros(extra)])
        meta = ctx.rule.meta_gradient(trajectory, g)[: spec.numel]
        return (None, None, *(t.clone() for t in spec.split(meta)))
