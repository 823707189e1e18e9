"""THE inner loop, used by every front end: graph-free with a record, or unrolled.

:class:`InnerLoop` takes one step at a time (the functional front end calls it K times;
the module front end once per ``opt.step``). Per step it gets either

* a :class:`~torchopt_metagrad._core.replay.StepLoss` (:meth:`InnerLoop.step`): the loop
  evaluates it at the current parameters — a fresh leaf when graph-free, the graph's node
  when unrolled — and stores the state and the loss for replay when the rule needs them;
* a loss tensor already computed from given parameter tensors (:meth:`InnerLoop.step_on`,
  the module front end's ``step(loss)``): the gradient is taken w.r.t. those tensors,
  with its graph kept when the rule applies that step's Jacobian.

Graph-free, the loop keeps only what ``needs(n).snapshots_from`` says a meta-gradient
after ``n`` steps uses, releasing older steps as it goes. Unrolled (rule ``Unrolled``), it
keeps the whole graph and checks the gradient reaching every state, ``z_0`` included,
for non-finite values.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from torchopt_metagrad._core.checks import check_inner_finite, check_loss, ensure_finite
from torchopt_metagrad._core.flat import FlatSpec
from torchopt_metagrad._core.record import Kept, Record, Snapshot
from torchopt_metagrad._core.replay import StepLoss
from torchopt_metagrad._core.steps import AbstractStepMap

__all__ = ["InnerLoop"]


class InnerLoop:
    """One inner loop from flat initial parameters ``theta``.

    Args:
        spec: layout of the parameter block.
        step_map: the step map.
        theta: flat initial parameters (with their graph when ``unrolled``).
        first_needed: ``n -> first step a meta-gradient after n steps uses``.
        horizon: the number of steps, when known in advance (then steps before
            ``first_needed(horizon)`` are never stored).
        unrolled: keep the whole graph (``Unrolled``) instead of a record.
        what: names the loss in error messages.
    """

    def __init__(
        self,
        spec: FlatSpec,
        step_map: AbstractStepMap,
        theta: Tensor,
        *,
        first_needed: Callable[[int], int],
        horizon: int | None = None,
        unrolled: bool = False,
        what: str = "loss_fn",
    ) -> None:
        self.spec = spec
        self.step_map = step_map
        self.unrolled = unrolled
        self.first_needed = first_needed
        self.what = what
        self._store_from = 0 if horizon is None else min(first_needed(horizon), horizon)
        # With a known horizon the snapshots are rows of one block, so a batched stage
        # takes a view of consecutive rows instead of stacking copies.
        self._block: Tensor | None = None
        if horizon is not None and not unrolled and horizon > self._store_from:
            rows = horizon - self._store_from
            self._block = theta.new_empty((rows, step_map.dim))
        with torch.set_grad_enabled(unrolled and torch.is_grad_enabled()):
            self.z, self.aux = step_map.init_state(theta if unrolled else theta.detach())
        if unrolled and self.z.requires_grad:
            self.z.register_hook(_finite_hook(0))
        self.n = 0
        self.first = 0
        self.entries: list[Snapshot | Kept | None] = []
        self.last_loss: StepLoss | None = None
        self._mutates: bool | None = None

    @property
    def params(self) -> Tensor:
        """The current flat parameters (part of the unrolled graph when unrolled)."""
        return self.z[: self.spec.numel]

    def step(self, loss: StepLoss, *, what: str | None = None) -> None:
        """Take one step with the inner loss ``loss`` (evaluated here, replayable later)."""
        k, P = self.n, self.spec.numel
        store = not self.unrolled and k >= self._store_from
        with torch.enable_grad():
            leaf = self.z[:P] if self.unrolled else self.z[:P].detach().requires_grad_(True)
            value = loss.evaluate(leaf, record=not self.unrolled, watch=self._mutates is None)
            if self._mutates is None:
                self._mutates = loss.mutates
            loss.mutates = self._mutates
            value = check_loss(value, k, what or self.what)
            (grad,) = torch.autograd.grad(value, leaf, create_graph=self.unrolled)
        check_inner_finite(value.detach(), grad.detach(), k)
        entry = Snapshot(self._keep(k), self.aux, loss) if store else None
        self.last_loss = None if self.unrolled else loss
        self._advance(grad, entry)

    def _keep(self, k: int) -> Tensor:
        """The state ``z_k`` to store (a row of the block when there is one)."""
        if self._block is None:
            return self.z
        row = self._block[k - self._store_from]
        row.copy_(self.z)
        return row

    def step_on(
        self, value: Tensor, params: Sequence[Tensor], *, keep_graph: bool, what: str | None = None
    ) -> None:
        """Take one step with a loss already computed from the tensors ``params``.

        ``keep_graph`` keeps the gradient's graph so the rule can apply this step's
        Jacobian (ignored, always kept, when unrolled).
        """
        k = self.n
        value = check_loss(value, k, what or self.what)
        keep = self.unrolled or (keep_graph and k >= self._store_from)
        with torch.enable_grad():
            grads = torch.autograd.grad(value, tuple(params), create_graph=keep, allow_unused=True)
        if all(g is None for g in grads):
            raise ValueError(
                f"{self.what} does not depend on the adapted parameters at inner step {k}; "
                "compute it with the module after the last step"
            )
        grads = tuple(
            torch.zeros_like(p) if g is None else g for g, p in zip(grads, params, strict=True)
        )
        grad = self.spec.flatten(grads if self.unrolled else [g.detach() for g in grads])
        check_inner_finite(value.detach(), grad.detach(), k)
        entry = None
        if keep and not self.unrolled:
            P = self.spec.numel
            state = None
            if self.step_map.dim > P:
                state = self.z[P:].detach().clone().requires_grad_(True)
            entry = Kept(tuple(params), grads, state, self.aux)
        self.last_loss = None
        self._advance(grad, entry)

    def _advance(self, grad: Tensor, entry: Snapshot | Kept | None) -> None:
        if not self.unrolled:
            self.entries.append(entry)  # covers steps first..n-1; None: not stored
        with torch.set_grad_enabled(self.unrolled and torch.is_grad_enabled()):
            self.z, self.aux = self.step_map.advance(self.z, grad, self.aux)
        self.n += 1
        if self.unrolled and self.z.requires_grad:
            self.z.register_hook(_finite_hook(self.n))
        # Drop stored steps that no meta-gradient after n steps uses.
        first = min(max(self.first_needed(self.n), 0), self.n)
        while not self.unrolled and self.first < first:
            self.entries.pop(0)
            self.first += 1

    def record(self) -> Record:
        """The record of the steps so far (a new object: later steps do not change it)."""
        if self.unrolled:
            raise RuntimeError("an unrolled loop keeps its graph, not a record")
        entries = self.entries
        if any(e is None for e in entries):
            missing = self.first + next(i for i, e in enumerate(entries) if e is None)
            raise RuntimeError(f"inner step {missing} was not recorded")
        return Record(
            spec=self.spec,
            step_map=self.step_map,
            steps=self.n,
            first=self.first,
            entries=list(entries),  # type: ignore[arg-type]
            final=self.z,
            final_aux=self.aux,
            final_loss=self.last_loss,
            time_step=self.step_map.time_step,
        )


def _finite_hook(k: int) -> Callable[[Tensor], None]:
    def hook(grad: Tensor | None) -> None:
        if grad is None:  # an undefined gradient (e.g. gradcheck's check_undefined_grad)
            return
        ensure_finite(grad, lambda: f"at inner step {k} (backward through the unrolled graph)")

    return hook
