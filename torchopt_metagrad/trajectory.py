"""What the inner loop records, and the inner problem it is recorded for.

``InnerProblem`` bundles the user's loss, the parameter layout, the step map and
the per-step batches. ``run_inner_loop`` runs the K steps without keeping any
graph, storing the flat snapshot ``z_k`` of every step a rule will need.
``Trajectory`` then offers rules the only operation they use: the
vector-Jacobian products ``A_k v`` of the step increments at stored snapshots
(see :mod:`torchopt_metagrad.steps`), one at a time or many in one batched call.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils import _pytree as pytree

from torchopt_metagrad import engine
from torchopt_metagrad._flat import FlatSpec
from torchopt_metagrad.errors import NonFiniteError
from torchopt_metagrad.steps import AbstractStepMap, Aux, GradientDescent

__all__ = ["BatchSchedule", "InnerProblem", "Trajectory", "run_inner_loop"]

LossFn = Callable[[dict[str, Tensor], Any], Tensor]


class BatchSchedule:
    """The batch of each inner step: one shared batch, or a sequence of ``steps`` batches."""

    def __init__(self, batch: Any, batches: Sequence[Any] | None, steps: int) -> None:
        self.shared = batches is None
        self._batch = batch
        self._batches = list(batches) if batches is not None else []
        self.steps = steps

    def at(self, k: int) -> Any:
        """Batch of inner step ``k``."""
        return self._batch if self.shared else self._batches[k]

    def stacked(self, start: int, stop: int) -> tuple[Any, int | None] | None:
        """Batches of steps ``start..stop-1`` for ``vmap``: ``(batch, in_dim)``.

        Returns ``(shared_batch, None)`` for a shared batch, ``(stacked, 0)`` when
        every per-step batch is a pytree of tensors of identical structure and
        shapes, and ``None`` when they cannot be stacked.
        """
        if self.shared:
            return self._batch, None
        flat = [pytree.tree_flatten(b) for b in self._batches[start:stop]]
        spec0 = flat[0][1]
        if any(spec != spec0 for _, spec in flat):
            return None
        columns = list(zip(*(leaves for leaves, _ in flat), strict=True))
        stacked = []
        for column in columns:
            if not all(isinstance(t, Tensor) for t in column):
                return None
            if any(t.shape != column[0].shape for t in column):
                return None
            stacked.append(torch.stack(column))
        return pytree.tree_unflatten(stacked, spec0), 0


@dataclass
class InnerProblem:
    """Everything needed to take, or re-linearize, an inner step.

    ``step_map`` is ``None`` for continuous inner problems (gradient flow), which
    have no discrete steps to differentiate.
    """

    loss_fn: LossFn
    spec: FlatSpec
    step_map: AbstractStepMap | None
    schedule: BatchSchedule

    @property
    def steps(self) -> int:
        """Number of inner steps K (grid intervals for a flow)."""
        return self.schedule.steps

    def require_step_map(self) -> AbstractStepMap:
        """The step map, or an error for problems without discrete steps."""
        if self.step_map is None:
            raise TypeError(
                "this inner problem has no discrete steps (a gradient flow); use a rule "
                "that needs only Hessian-vector products, such as tmg.Adjoint()"
            )
        return self.step_map

    def loss(self, params_flat: Tensor, batch: Any) -> Tensor:
        """The user's loss at flat parameters; works inside ``torch.func`` transforms."""
        return self.loss_fn(self.spec.unflatten(params_flat), batch)


@dataclass
class Trajectory:
    """Snapshots ``z_k`` for ``k in [first, K]`` and the data to re-linearize them.

    Row ``k - first`` of ``snapshots`` is ``z_k``; the last row is the final state
    ``z_K``. Implements the ``StepJacobians`` protocol that rules consume.

    Attributes:
        time_step: ``h`` when the snapshots sample a gradient flow on a uniform
            grid ``t_k = k h`` (plain gradient descent with step ``lr``, or
            :func:`tmg.flow`); ``None`` otherwise.
    """

    problem: InnerProblem
    first: int
    snapshots: Tensor  # (K - first + 1, dim)
    aux: list[Aux]  # aux of steps first..K
    time_step: float | None = None

    @property
    def num_steps(self) -> int:
        """Number of inner steps K."""
        return self.problem.steps

    @property
    def param_dim(self) -> int:
        """Length of the parameter block at the front of the state."""
        return self.problem.spec.numel

    def _row(self, k: int) -> int:
        if not self.first <= k <= self.num_steps:
            raise IndexError(f"step {k} was not stored (stored: {self.first}..{self.num_steps})")
        return k - self.first

    def snapshot(self, k: int) -> Tensor:
        """The stored state ``z_k`` (``k = K``: the final state)."""
        return self.snapshots[self._row(k)]

    def apply(self, k: int, v: Tensor) -> Tensor:
        """``A_k v`` at the stored snapshot of step ``k``."""
        row = self._row(k)
        return engine.vjp_delta(self.problem, self.snapshots[row], self.aux[row], k, v)

    def apply_many(
        self,
        start: int,
        vectors: Tensor,
        *,
        chunk_size: int | None = None,
        vectorize: bool = True,
    ) -> Tensor:
        """``A_{start+r} vectors[r]`` for every row ``r``, in one batched call when possible."""
        n = vectors.shape[0]
        lo = self._row(start)
        if start + n > self.num_steps:
            raise IndexError(f"steps {start}..{start + n - 1} go past the last step")
        return engine.vjp_delta_many(
            self.problem,
            self.snapshots[lo : lo + n],
            self.aux[lo : lo + n],
            start,
            vectors,
            chunk_size=chunk_size,
            vectorize=vectorize,
        )

    def hvp(self, k: int, v: Tensor) -> Tensor:
        """``H_k v``: Hessian of the plain inner loss at the parameters of snapshot ``k``.

        ``v`` and the result are parameter-space vectors; at ``k = K`` the batch is
        that of the last step.
        """
        params = self.snapshot(k)[: self.param_dim]
        return self.hvp_at(params, v, k=min(k, self.num_steps - 1))

    def hvp_at(self, params: Tensor, v: Tensor, *, k: int = 0) -> Tensor:
        """``H v`` at arbitrary flat ``params`` with the batch of step ``k``."""
        return engine.hvp(self.problem, params, self._batch(k), v)

    def vector_field(self, params: Tensor, *, create_graph: bool = False) -> Tensor:
        """``-grad l(params)``, the gradient-flow vector field (shared batch only)."""
        with torch.enable_grad():
            leaf = params if create_graph else params.detach().requires_grad_(True)
            loss = self.problem.loss(leaf, self._batch(0))
            (grad,) = torch.autograd.grad(loss, leaf, create_graph=create_graph)
        return -grad

    def _batch(self, k: int) -> Any:
        return self.problem.schedule.at(max(k, 0))


def run_inner_loop(problem: InnerProblem, theta: Tensor, first: int) -> tuple[Tensor, Trajectory]:
    """Run the K inner steps from flat ``theta`` without a graph.

    Args:
        problem: the inner problem.
        theta: flat initial parameters (detached).
        first: first step whose snapshot is stored (``K``: only the final state).

    Returns:
        The final state ``z_K`` and the trajectory.

    Raises:
        NonFiniteError: the inner loss or its gradient is not finite at some step.
    """
    step_map = problem.require_step_map()
    K = problem.steps
    z, aux = step_map.init_state(theta)
    snapshots = torch.empty((K - first + 1, step_map.dim), dtype=z.dtype, device=z.device)
    auxs: list[Aux] = []
    for k in range(K):
        if k >= first:
            snapshots[k - first] = z
            auxs.append(aux)
        leaf = z[: step_map.param_dim].detach().requires_grad_(True)
        with torch.enable_grad():
            loss = engine.checked_loss(problem, leaf, k)
            (grad,) = torch.autograd.grad(loss, leaf)
        check_inner_finite(loss.detach(), grad, k)
        with torch.no_grad():
            z, aux = step_map.advance(z, grad, aux)
    snapshots[K - first] = z
    auxs.append(aux)
    time_step = None
    if isinstance(step_map, GradientDescent) and step_map.proximal is None:
        time_step = step_map.lr
    return z, Trajectory(problem, first, snapshots, auxs, time_step)


def check_inner_finite(loss: Tensor, grad: Tensor, k: int) -> None:
    """Raise ``NonFiniteError`` naming step ``k`` if the inner loss or gradient is not finite."""
    if not bool(torch.isfinite(loss).all() & torch.isfinite(grad).all()):
        what = "inner loss" if not bool(torch.isfinite(loss).all()) else "inner-loss gradient"
        raise NonFiniteError(f"the {what} is not finite at inner step {k} (steps count from 0)")
