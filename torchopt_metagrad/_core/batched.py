"""Tasks in parallel: one inner loop over a batch of tasks, vectorized with ``torch.func``.

The per-task path of :mod:`~torchopt_metagrad._core.tasks` runs each task's loop in
turn; for meta-batches of small tasks almost all of that time is Python and dispatch
overhead. When a task's loop is a pure function (a functional loss that draws no random
numbers and writes no buffers, plain gradient descent or a torchopt optimizer, no
meta-parameters), :func:`run_batched` runs all the tasks' steps at once:
``vmap(grad(loss))`` over the stacked states, the step map vmapped over tasks. The
states it stores form a :class:`TaskRecord`, whose step products are one nested
``vmap`` over (steps, tasks); the step-product rules run on it unchanged, their vectors
carrying the task dimension after the row dimension. ``Unrolled`` keeps the graph of the
batched loop instead (regular autograd around ``torch.func``).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from torchopt_metagrad._core.engine import _NO_BATCH_RULE, Meta, vjp_function
from torchopt_metagrad._core.flat import FlatSpec
from torchopt_metagrad._core.steps import AbstractStepMap
from torchopt_metagrad.errors import NonFiniteError

__all__ = ["TaskBatch", "TaskRecord", "run_batched"]


class TaskBatch:
    """A pytree of tensors sliced per task: ``dims`` mirrors it (task dim per leaf, or None)."""

    def __init__(self, tree: Any, dims: Any) -> None:
        self.tree = tree
        self.dims = dims


def _vmap(fn: Any, in_dims: Any, chunk_size: int | None = None) -> Any:
    return torch.func.vmap(fn, in_dims=in_dims, chunk_size=chunk_size)


class TaskRecord:
    """The record of ``size`` tasks' inner loops run together (the record protocol).

    Vectors carry the task dimension: ``g`` is ``(size, state_dim)``, ``apply_many``'s
    vectors ``(n, size, state_dim)``. Only step products are available (the step-product
    rules); no meta-parameters. ``products`` counts every task's products (``n * size``
    per ``apply_many`` call), as :class:`~torchopt_metagrad._core.record.Record` does.
    """

    meta = Meta()
    meta_dim = 0
    time_step = None
    solver = None
    released = None

    def __init__(
        self,
        spec: FlatSpec,
        step_map: AbstractStepMap,
        fn: Any,
        steps: int,
        first: int,
        states: list[Tensor],
        auxs: list[Any],
        batches: list[TaskBatch],
        final: Tensor,
        theta_dims: Sequence[int | None],
    ) -> None:
        self.spec, self.step_map, self.fn = spec, step_map, fn
        self.steps, self.first = steps, first
        self.states, self.auxs, self.batches = states, auxs, batches
        self.final, self.theta_dims = final, tuple(theta_dims)
        self.size = final.shape[0]
        self.products = 0

    # -- what the node uses -----------------------------------------------------------
    def outputs(self) -> tuple[Tensor, ...]:
        return _split_rows(self.final[:, : self.spec.numel].detach(), self.spec, clone=True)

    def take_tensors(self) -> list[Tensor]:
        taken = [*self.states, self.final]
        self.states, self.final = [], torch.empty(0)
        return taken

    def put_tensors(self, tensors: tuple[Tensor, ...]) -> None:
        *self.states, self.final = tensors

    def blocked(self) -> bool:
        return False

    def outer_vector(self, grad_outputs: Sequence[Tensor | None]) -> Tensor:
        spec, n = self.spec, self.size
        parts = [
            torch.zeros(n, s.numel(), dtype=spec.dtype, device=spec.device)
            if go is None
            else go.reshape(n, -1)
            for go, s in zip(grad_outputs, spec.shapes, strict=True)
        ]
        g = torch.cat(parts, dim=1)
        if self.state_dim > spec.numel:
            g = torch.cat([g, g.new_zeros(n, self.state_dim - spec.numel)], dim=1)
        return g

    def theta_grads(self, grad: Tensor) -> list[Tensor]:
        """Per-parameter gradients: summed over tasks for a shared ``theta``."""
        rows = _split_rows(grad, self.spec, clone=False)
        return [
            t.sum(0).reshape(s) if d is None else t.movedim(0, d).contiguous()
            for t, d, s in zip(rows, self.theta_dims, self.spec.shapes, strict=True)
        ]

    # -- the record protocol (step products only) -------------------------------------
    @property
    def num_steps(self) -> int:
        return self.steps

    @property
    def param_dim(self) -> int:
        return self.spec.numel

    @property
    def state_dim(self) -> int:
        return self.step_map.dim

    def snapshot(self, k: int) -> Tensor:
        return self.final if k == self.steps else self.states[k - self.first]

    def apply(self, k: int, v: Tensor) -> Tensor:
        return self.apply_many(k, v[None], vectorize=False)[0]

    def apply_many(
        self, start: int, vectors: Tensor, *, chunk_size: int | None = None, vectorize: bool = True
    ) -> Tensor:
        n = vectors.shape[0]
        if start < self.first or start + n > self.steps:
            raise IndexError(f"steps {start}..{start + n - 1} were not stored")
        rows = range(start - self.first, start - self.first + n)
        self.products += n * self.size
        one = vjp_function(lambda p, b: self.fn(p, b, ()), self.step_map.delta, self.param_dim)
        task_dims = self.batches[rows[0]].dims
        per_task = _vmap(one, (0, 0, task_dims, 0))
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_NO_BATCH_RULE, category=UserWarning)
            if not vectorize or n == 1:
                out = [
                    per_task(self.states[r], self.auxs[r], self.batches[r].tree, vectors[i])
                    for i, r in enumerate(rows)
                ]
                return torch.stack(out).detach()
            states = torch.stack([self.states[r] for r in rows])
            aux = tuple(torch.stack(c) for c in zip(*(self.auxs[r] for r in rows), strict=True))
            batch, row_dim = _stack_rows([self.batches[r] for r in rows])
            both = _vmap(per_task, (0, 0, row_dim, 0), chunk_size)
            return both(states, aux, batch, vectors).detach()

    def hvp(self, k: int, v: Tensor) -> Tensor:
        raise NotImplementedError("a batched task record has step products only")


def _split_rows(flat: Tensor, spec: FlatSpec, *, clone: bool) -> tuple[Tensor, ...]:
    """``(size, numel)`` -> per-parameter ``(size, *shape)`` tensors."""
    parts = flat.split(list(spec.sizes), dim=1)
    out = tuple(p.reshape(flat.shape[0], *s) for p, s in zip(parts, spec.shapes, strict=True))
    return tuple(t.clone() for t in out) if clone else out


def _stack_rows(batches: list[TaskBatch]) -> tuple[Any, int | None]:
    if all(b.tree is batches[0].tree for b in batches):
        return batches[0].tree, None
    leaves = [tree_flatten(b.tree) for b in batches]
    spec0 = leaves[0][1]
    stacked = [
        torch.stack(col) if isinstance(col[0], Tensor) else col[0]
        for col in zip(*(lv for lv, _ in leaves), strict=True)
    ]
    return tree_unflatten(stacked, spec0), 0


def run_batched(
    fn: Any,
    spec: FlatSpec,
    step_map: AbstractStepMap,
    thetas: Sequence[Tensor],
    theta_dims: Sequence[int | None],
    batches: list[TaskBatch],
    size: int,
    *,
    first: int,
    unrolled: bool,
) -> TaskRecord | tuple[Tensor, ...]:
    """Run ``size`` tasks' inner loops together, one step per entry of ``batches``.

    Returns the :class:`TaskRecord` (graph-free, states from step ``first`` on), or,
    ``unrolled``, the adapted parameters ``(size, *shape)`` with the loop's graph.
    """
    flat = [
        (t.reshape(1, -1).expand(size, -1) if d is None else t.movedim(d, 0).reshape(size, -1))
        for t, d in zip(thetas, theta_dims, strict=True)
    ]
    theta = torch.cat(flat, dim=1)
    P = spec.numel
    grad_value = torch.func.grad_and_value(lambda p, b: fn(p, b, ()))
    states: list[Tensor] = []
    auxs: list[Any] = []
    with torch.set_grad_enabled(unrolled and torch.is_grad_enabled()), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_NO_BATCH_RULE, category=UserWarning)
        z, aux = _vmap(step_map.init_state, 0)(theta if unrolled else theta.detach())
        for k, batch in enumerate(batches):
            grad, value = _vmap(grad_value, (0, batch.dims))(z[:, :P], batch.tree)
            _check_finite(value, grad, k)
            if not unrolled and k >= first:
                states.append(z)
                auxs.append(aux)
            z, aux = _vmap(step_map.advance, 0)(z, grad, aux)
    if unrolled:
        return _split_rows(z[:, :P], spec, clone=False)
    return TaskRecord(
        spec, step_map, fn, len(batches), first, states, auxs, batches[first:], z, theta_dims
    )


def _check_finite(value: Tensor, grad: Tensor, k: int) -> None:
    bad = ~(torch.isfinite(value) & torch.isfinite(grad).all(1))
    if bool(bad.any()):
        task = int(bad.nonzero()[0])
        what = "inner loss" if not bool(torch.isfinite(value[task])) else "inner-loss gradient"
        raise NonFiniteError(
            f"the {what} is not finite at inner step {k} (steps count from 0) of task {task}"
        )


def slices(tree: Any, dims: Any, index: int) -> Any:
    """Task ``index``'s slice of a pytree with task dims ``dims``."""
    return tree_map(
        lambda t, d: t if d is None or not isinstance(t, Tensor) else t.select(d, index),
        tree,
        dims,
    )
