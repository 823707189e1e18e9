"""The two kinds of stored inner step a :class:`~torchopt_metagrad._core.record.Record` holds.

* :class:`Snapshot`: the state ``z_k`` (or ``None`` between checkpoints), its integer
  optimizer state and the step's replayable loss; products rebuild the step's graph.
* :class:`Kept`: the step's inner gradient with its autograd graph (``create_graph=True``):
  the module front end's ``step(loss)``, and ``tmg.adapt``'s last ``keep_graphs`` steps.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from torchopt_metagrad._core.flat import FlatSpec
from torchopt_metagrad._core.replay import StepLoss
from torchopt_metagrad._core.steps import AbstractStepMap, Aux

__all__ = ["Kept", "Snapshot", "emptied"]


@dataclass(frozen=True, eq=False)
class Snapshot:
    """A step stored as its state (``None``: recomputed from a checkpoint), integer
    optimizer state, and replayable loss."""

    z: Tensor | None
    aux: Aux
    loss: StepLoss


@dataclass(frozen=True, eq=False)
class Kept:
    """A step stored as its inner gradient with the graph (``create_graph=True``).

    ``Delta_k`` is rebuilt from these for each product, so a step keeps one
    parameter-sized vector beyond its autograd graph.
    """

    params: tuple[Tensor, ...]
    grads: tuple[Tensor, ...]
    state: Tensor | None  # the optimizer state before the step, as a leaf
    aux: Aux
    #: ``params``/``grads`` are one flat tensor each (``tmg.adapt``'s kept steps), not
    #: one per parameter tensor (the module front end's ``step(loss)``).
    flat: bool = False
    #: leaf copies through which the loss's meta-parameters (``Meta.loss``) entered the
    #: kept graph, in order (``tmg.adapt``; empty for the module front end).
    loss_meta: tuple[Tensor, ...] = ()
    #: the step's loss (``tmg.adapt``'s kept steps): checked for a batch modified in place
    #: before a product, as a snapshot's is, so the error says what happened.
    source: StepLoss | None = None

    @property
    def inputs(self) -> tuple[Tensor, ...]:
        return self.params if self.state is None else (*self.params, self.state)

    def check_replayable(self) -> None:
        """:meth:`StepLoss.check_replayable` of the step's loss (``tmg.adapt``'s steps)."""
        if self.source is not None:
            self.source.check_replayable()

    def tensors(self) -> list[Tensor]:
        """Every tensor of the step, in the order :meth:`refilled` takes them back."""
        state = () if self.state is None else (self.state,)
        return [*self.params, *self.grads, *state, *self.loss_meta]

    def refilled(self, it: Iterator[Tensor]) -> Kept:
        """The step with its tensors taken from ``it`` (see :meth:`tensors`)."""

        def take(n: int) -> tuple[Tensor, ...]:
            return tuple(next(it) for _ in range(n))

        params, grads = take(len(self.params)), take(len(self.grads))
        state = None if self.state is None else next(it)
        return dataclasses.replace(
            self, params=params, grads=grads, state=state, loss_meta=take(len(self.loss_meta))
        )

    def split(self, spec: FlatSpec, v: Tensor) -> tuple[Tensor, ...]:
        """A parameter-sized vector laid out as ``params``."""
        return (v,) if self.flat else tuple(spec.split(v))

    def delta(
        self, spec: FlatSpec, step_map: AbstractStepMap, w: tuple[Tensor, ...] = ()
    ) -> Tensor:
        """``Delta_k`` rebuilt from the kept gradient, with its graph (``w``: see
        :meth:`AbstractStepMap.delta`)."""
        with torch.enable_grad():
            if self.flat:
                z, grad = self.params[0], self.grads[0]
            else:
                z, grad = spec.flatten(self.params), spec.flatten(self.grads)
            if self.state is not None:
                z = torch.cat([z, self.state])
            return step_map.delta(z, grad, self.aux, w)


def emptied(entry: Snapshot | Kept, empty: Tensor) -> Snapshot | Kept:
    """``entry`` with the tensors ``Record.take_tensors`` took replaced by ``empty``."""
    if isinstance(entry, Snapshot):
        return entry if entry.z is None else dataclasses.replace(entry, z=empty)
    if not entry.flat:
        return entry
    return entry.refilled(iter([empty] * len(entry.tensors())))
