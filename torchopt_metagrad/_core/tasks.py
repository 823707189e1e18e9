"""Front ends under ``torch.func.vmap``: a batch of tasks, each with its own inner loop.

``torch.func.vmap`` over a function that calls ``tmg.adapt`` (one task's inner loop and
outer loss) cannot run the inner loop as written: inside a functorch transform,
``requires_grad_`` and ``torch.autograd.grad`` are not allowed, and a record of
batched tensors would not outlive the transform. So a front end that sees batched
tensors (:func:`is_batched`) does not run the loop there: it hands the core's autograd
node a :class:`TaskJob` (how to run one task, given its tensors) and every tensor the
job reads. The node's vmap rule receives those tensors unbatched, with their batch
dimensions, and runs the job once per task on each task's slices: the same inner loop,
record and rule as without vmap, so every rule gives the same meta-gradient as a loop
over tasks (and ``Unrolled`` its graph). The per-task results are stacked along a new
leading dimension, which vmap reports as the batch dimension.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils._pytree import tree_leaves

__all__ = ["TaskJob", "in_transform", "is_batched"]


def in_transform() -> bool:
    """True inside a ``torch.func`` transform (vmap, grad, vjp, ...)."""
    return torch._C._functorch.maybe_current_level() is not None


def is_batched(*trees: Any) -> bool:
    """True if any tensor in ``trees`` is batched by ``torch.func.vmap`` (a task slice)."""
    return any(
        isinstance(t, Tensor) and torch._C._functorch.is_batchedtensor(t)
        for tree in trees
        for t in tree_leaves(tree)
    )


class TaskJob:
    """One task's run, ``run(tensors) -> outputs``, batched over tasks by the vmap rule.

    Args:
        run: runs one task from its tensors (in the order the front end passed them to
            the node) and returns its output tensors.
        owner: names the front end in messages.
        batched: runs all tasks at once from the unbatched tensors and their task
            dimensions, returning outputs with the task dimension first, or ``None``
            when the tasks cannot be batched (then ``run`` goes task by task).
    """

    def __init__(
        self,
        run: Callable[[list[Tensor]], Sequence[Tensor]],
        owner: str,
        batched: Callable[[int, Sequence[int | None], Sequence[Tensor]], Any] | None = None,
    ) -> None:
        self.run = run
        self.owner = owner
        self.batched = batched

    def per_task(
        self, size: int, in_dims: Sequence[int | None], tensors: Sequence[Tensor]
    ) -> tuple[tuple[Tensor, ...], tuple[int, ...]]:
        """Run every task on its slices; stack each output over tasks (batch dim 0)."""
        if in_transform():
            raise RuntimeError(
                f"{self.owner} under torch.func.vmap works with plain autograd outside the "
                "vmap (loss.backward(), torch.autograd.grad); another torch.func transform "
                "around it (grad, vjp, jacrev, an outer vmap) is not supported"
            )
        if self.batched is not None and size > 1:  # one task: its own loop, no vmap inside
            outputs = self.batched(size, in_dims, tensors)
            if outputs is not None:
                return tuple(outputs), (0,) * len(outputs)
        results = []
        for b in range(size):
            task = [
                t if d is None else t.select(d, b) for t, d in zip(tensors, in_dims, strict=True)
            ]
            results.append(tuple(self.run(task)))
        outputs = tuple(torch.stack(column) for column in zip(*results, strict=True))
        return outputs, (0,) * len(outputs)
