"""The record an inner loop leaves for the rules: snapshots, replayable losses, kept graphs.

:class:`Record` implements the record protocol
(:class:`~torchopt_metagrad._core.protocol.RecordProtocol`). Each stored step ``k`` is
either

* a :class:`Snapshot` — the state ``z_k``, its integer optimizer state, and the step's
  :class:`~torchopt_metagrad._core.replay.StepLoss`; ``A_k v`` is recomputed there by the
  engine (batched with vmap when the losses allow it); or
* a :class:`Kept` step — the gradient of the step's loss with its autograd graph (the
  module front end's ``step(loss)``, ``tmg.adapt``'s last ``Exact(keep_graphs=m)``
  steps); ``A_k v`` is one VJP through it.

Both live in :mod:`~torchopt_metagrad._core.entries`.

A record always holds the final state ``z_K`` and, when the front end can recompute
the inner loss, the loss used for curvature at ``z_K`` (the last step's).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from torchopt_metagrad._core import engine
from torchopt_metagrad._core.checkpoints import recompute_segment
from torchopt_metagrad._core.engine import Meta
from torchopt_metagrad._core.entries import Kept, Snapshot, emptied
from torchopt_metagrad._core.flat import FlatSpec
from torchopt_metagrad._core.meta_products import MetaProducts
from torchopt_metagrad._core.pull import is_blocked, pull
from torchopt_metagrad._core.replay import StepLoss
from torchopt_metagrad._core.stack import constant as _constant
from torchopt_metagrad._core.stack import rows as _rows
from torchopt_metagrad._core.stack import stack_batches as _stack_batches
from torchopt_metagrad._core.stack import vmap_failed as _vmap_failed
from torchopt_metagrad._core.steps import AbstractStepMap, Aux

__all__ = ["Kept", "Record", "Snapshot"]


@dataclass(eq=False)
class Record(MetaProducts):
    """Steps ``first..K-1`` of an inner loop and its final state ``z_K``.

    Attributes:
        spec: layout of the parameter block.
        step_map: the step map (``None`` for a flow or a user's solver).
        steps: K.
        first: first stored step.
        entries: the stored steps, ``entries[k - first]``.
        final: ``z_K``.
        final_aux: its integer optimizer state.
        final_loss: the inner loss for curvature at ``z_K`` (``None``: not recomputable).
        time_step: ``h`` when state ``k`` samples a gradient flow at ``t = k h``.
        solver: the ``tmg.ODE`` of a forward flow solve, else ``None``.
        released: why the entries were dropped (``None``: they are here).
        meta: the meta-parameters that require grad (a learned lr, fixed params,
            closed-over leaves); the rules differentiate them too.
        chain: the inner loop whose successive records share kept graphs (the module
            front end), else ``None``; see :meth:`blocked`.
        anchor: the proximal anchor ``theta`` (flat) of a user's solver (``tmg.implicit``);
            ``None``: the step map's, if it has one.
        products: the step/Hessian-vector products asked of it so far (``RuleReport``).
    """

    spec: FlatSpec
    step_map: AbstractStepMap | None
    steps: int
    first: int
    entries: list[Snapshot | Kept]
    final: Tensor
    final_aux: Aux
    final_loss: StepLoss | None
    time_step: float | None = None
    solver: Any = None
    released: str | None = None
    meta: Meta = dataclasses.field(default_factory=Meta)
    chain: object | None = None
    _segment: dict[int, Tensor] = dataclasses.field(default_factory=dict, repr=False)
    products: int = 0
    anchor: Tensor | None = None

    @classmethod
    def of_states(
        cls,
        spec: FlatSpec,
        states: Tensor,
        loss: StepLoss,
        *,
        time_step: float | None = None,
        solver: Any = None,
        meta: Meta | None = None,
        anchor: Tensor | None = None,
    ) -> Record:
        """The record of a flow (or a solver's answer): states ``u_0..u_N`` (rows), one loss."""
        n = states.shape[0] - 1
        return cls(
            spec=spec,
            step_map=None,
            steps=n,
            first=0,
            entries=[Snapshot(states[k], (), loss) for k in range(n)],
            final=states[n],
            final_aux=(),
            final_loss=loss,
            time_step=time_step,
            solver=solver,
            meta=Meta() if meta is None else meta,
            anchor=anchor,
        )

    # -- saving: snapshots go through save_for_backward so autograd frees them ----------
    def take_tensors(self) -> list[Tensor]:
        """Move the snapshot tensors out (to save for backward); :meth:`put_tensors` restores."""
        empty = torch.empty(0)
        taken = [e.z for e in self.entries if isinstance(e, Snapshot) and e.z is not None]
        taken.append(self.final)
        if self.anchor is not None:
            taken.append(self.anchor)
            self.anchor = empty
        # tmg.adapt's kept steps too: saved, their graphs live exactly as long as autograd
        # keeps the node's saved tensors (freed by the backward unless retain_graph=True).
        for e in self.entries:
            if isinstance(e, Kept) and e.flat:
                taken += e.tensors()
        self.entries = [emptied(e, empty) for e in self.entries]
        self._segment = {}
        self.final = empty
        return taken

    def put_tensors(self, tensors: tuple[Tensor, ...]) -> None:
        """Put back what :meth:`take_tensors` took."""
        if self.released is not None:
            raise RuntimeError(self.released)
        it = iter(tensors)
        self.entries = [
            dataclasses.replace(e, z=next(it)) if isinstance(e, Snapshot) and e.z is not None else e
            for e in self.entries
        ]
        self.final = next(it)
        if self.anchor is not None:
            self.anchor = next(it)
        self.entries = [
            e.refilled(it) if isinstance(e, Kept) and e.flat else e for e in self.entries
        ]

    # -- what the one autograd node uses ----------------------------------------------------
    def outputs(self) -> tuple[Tensor, ...]:
        """The final parameters, as new tensors shaped like the parameters."""
        spec = self.spec
        return tuple(t.clone() for t in spec.split(self.final[: spec.numel].detach()))

    def outer_vector(self, grad_outputs: Any) -> Tensor:
        """The outer gradient as a state-sized vector (``None`` -> zeros, state -> zeros)."""
        spec = self.spec
        g = spec.flatten(
            [
                torch.zeros(s, dtype=spec.dtype, device=spec.device) if go is None else go
                for go, s in zip(grad_outputs, spec.shapes, strict=True)
            ]
        )
        if self.state_dim > spec.numel:
            g = torch.cat([g, g.new_zeros(self.state_dim - spec.numel)])
        return g

    def theta_grads(self, grad: Tensor) -> list[Tensor]:
        """The parameter block as per-parameter gradients."""
        return [t.clone() for t in self.spec.split(grad)]

    def blocked(self) -> bool:
        """True while a pullback through a kept graph of the same chain runs.

        A kept step's graph starts at the parameters of that step, which an earlier
        record's autograd node produced from ``theta`` *and the closed-over leaves*. A
        pullback wants partial derivatives with respect to those leaves: the path through
        the earlier node would add a total derivative on top, so that node's backward
        gives nothing while the pullback runs.
        """
        return is_blocked(self.chain)

    def release(self, reason: str) -> None:
        """Drop every stored step (a backward that needs them then raises ``reason``)."""
        self.entries = []
        self.released = reason

    # -- the record protocol ---------------------------------------------------------------
    @property
    def num_steps(self) -> int:
        return self.steps

    @property
    def param_dim(self) -> int:
        return self.spec.numel

    @property
    def state_dim(self) -> int:
        return self.spec.numel if self.step_map is None else self.step_map.dim

    def _entries(self, start: int, n: int) -> list[Snapshot | Kept]:
        """Steps ``start..start+n-1`` (raises if they go past the last step)."""
        if start + n > self.steps:
            raise IndexError(f"steps {start}..{start + n - 1} go past the last step")
        return [self._entry(start + r) for r in range(n)]

    def _entry(self, k: int) -> Snapshot | Kept:
        if self.released is not None:
            raise RuntimeError(self.released)
        if not self.first <= k < self.steps:
            raise IndexError(f"step {k} was not stored (stored: {self.first}..{self.steps - 1})")
        entry = self.entries[k - self.first]
        if isinstance(entry, Kept):  # (a snapshot's loss checks when it is replayed)
            entry.check_replayable()
        return entry

    def snapshot(self, k: int) -> Tensor:
        if k == self.steps:
            return self.final
        entry = self._entry(k)
        if not isinstance(entry, Snapshot):
            raise IndexError(f"state {k} was not stored: step(loss) keeps the step's graph instead")
        if entry.z is not None:
            return entry.z
        if k not in self._segment:  # recompute the segment from its checkpoint
            self._segment = {}  # (free the previous segment first)
            self._segment = recompute_segment(self, k)
        return self._segment[k]

    def _loss(self, k: int) -> StepLoss:
        if k >= self.steps - 1 and self.final_loss is not None:
            return self.final_loss
        entry = self._entry(k) if self.steps > 0 else None
        if isinstance(entry, Snapshot):
            return entry.loss
        raise RuntimeError(
            f"the inner loss of step {k} cannot be recomputed here (its step kept its graph "
            "instead); use a closure"
        )

    def _step_map(self) -> AbstractStepMap:
        if self.step_map is None:
            raise TypeError("this record has no discrete steps (a gradient flow or a solver)")
        return self.step_map

    def apply(self, k: int, v: Tensor) -> Tensor:
        entry, step_map = self._entry(k), self._step_map()
        self.products += 1
        if isinstance(entry, Kept):
            return pull([entry.delta(self.spec, step_map)], entry.inputs, [v])
        aux = entry.aux
        return engine.vjp_increment(
            _constant(entry.loss),
            lambda z, g: step_map.delta(z, g, aux),
            self.snapshot(k),
            v,
            self.param_dim,
        )

    def apply_many(
        self, start: int, vectors: Tensor, *, chunk_size: int | None = None, vectorize: bool = True
    ) -> Tensor:
        n = vectors.shape[0]
        entries = self._entries(start, n)
        if vectorize and n > 1:
            batched = self._batched(entries, vectors, chunk_size)
            if batched is not None:
                self.products += n
                return batched
        return torch.stack([self.apply(start + r, vectors[r]) for r in range(n)])

    def _stack(self, entries: list[Snapshot | Kept]) -> tuple[Any, ...] | None:
        """``(fn, states, aux, batch, batch_dim)`` to vmap over, or ``None`` (loop instead)."""
        if not all(isinstance(e, Snapshot) and e.z is not None for e in entries):
            return None  # kept graphs cannot be stacked; checkpointed states are recomputed
        snaps: list[Snapshot] = entries  # type: ignore[assignment]
        losses = [e.loss for e in snaps]
        for loss in losses:
            loss.check_unchanged()
        if not all(s.batchable for s in losses) or any(s.fn is not losses[0].fn for s in losses):
            return None  # closures: no pure function to vmap
        if any(s.replays_state for s in losses):
            engine.warn_once(
                "replay",
                "the inner loss draws random numbers or updates buffers in place, so each "
                "step's products are replayed one by one with that step's state (same "
                "result, slower than a batched stage)",
            )
            return None
        stacked = _stack_batches([s.batch for s in losses])
        if stacked is None:
            engine.warn_once(
                "unstackable",
                "per-step batches have different structures or shapes, so they cannot be "
                "stacked for vmap; the Hessian-vector products run one by one",
            )
            return None
        aux = tuple(torch.stack(col) for col in zip(*(e.aux for e in snaps), strict=True))
        return (
            losses[0].fn,
            _rows([e.z for e in snaps if e.z is not None]),
            aux,
            stacked[0],
            stacked[1],
        )

    def _batched(
        self, entries: list[Snapshot | Kept], vectors: Tensor, chunk_size: int | None
    ) -> Tensor | None:
        stacked = self._stack(entries)
        if stacked is None:
            return None
        fn, states, aux, batch, batch_dim = stacked
        meta = tuple(t.detach() for t in self.meta.loss)
        try:
            return engine.vjp_increment_many(
                lambda p, b: fn(p, b, meta),
                self._step_map().delta,
                states,
                aux,
                batch,
                batch_dim,
                vectors,
                self.param_dim,
                chunk_size=chunk_size,
            )
        except (RuntimeError, NotImplementedError, ValueError) as err:
            _vmap_failed(err)
            return None

    def hvp(self, k: int, v: Tensor) -> Tensor:
        if k < self.steps:
            entry = self._entry(k)
            if isinstance(entry, Kept):
                self.products += 1
                return pull(entry.grads, entry.params, entry.split(self.spec, v))
        params = self.snapshot(k)[: self.param_dim]
        return self.hvp_at(params, v, k=min(k, max(self.steps - 1, 0)))

    def hvp_at(self, params: Tensor, v: Tensor, *, k: int = 0) -> Tensor:
        self.products += 1
        return engine.hvp(_constant(self._loss(k)), params, v)

    def stationarity(self, reg: float) -> tuple[float, float] | None:
        """Norms of the proximal inner objective's gradient ``grad l + reg (phi - theta)``
        at the final params and at ``theta`` (the inner loop's start), with the last step's
        loss; ``None`` when the anchor ``theta`` or that loss is not known."""
        anchor = self.anchor if self.anchor is not None else getattr(self.step_map, "_anchor", None)
        if anchor is None or self.final_loss is None:
            return None
        loss = _constant(self.final_loss)
        norms = []
        for point in (self.final[: self.param_dim], anchor):
            with torch.enable_grad():
                leaf = point.detach().requires_grad_(True)
                (grad,) = torch.autograd.grad(loss(leaf), leaf)
            norms.append(float((grad + reg * (point - anchor)).norm()))
        return norms[0], norms[1]

    def vector_field(self, params: Tensor, *, create_graph: bool = False) -> Tensor:
        loss = _constant(self._loss(0))
        with torch.enable_grad():
            leaf = params if create_graph else params.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(loss(leaf), leaf, create_graph=create_graph)
        return -grad
