"""The record's products for meta-parameters: ``(A_k v, B_k^T v)``, their sums, mixed terms.

A mixin of :class:`~torchopt_metagrad._core.record.Record` (kept apart for size): it uses
the record's ``_entry``, ``snapshot``, ``_loss``, ``_step_map``, ``_stack``, ``meta``,
``spec`` and ``chain``. See :mod:`~torchopt_metagrad._core.protocol` for the definitions.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from torchopt_metagrad._core import engine
from torchopt_metagrad._core.pull import blocking, pull_list
from torchopt_metagrad._core.stack import vmap_failed as _vmap_failed

__all__ = ["MetaProducts"]


class MetaProducts:
    """``pullback``, ``meta_pullback_many``, ``mixed``, ``mixed_at`` of the record protocol."""

    meta: Any
    spec: Any
    chain: Any
    steps: int
    products: int

    if TYPE_CHECKING:  # provided by Record

        @property
        def param_dim(self) -> int: ...

        def _entry(self, k: int) -> Any: ...

        def _entries(self, start: int, n: int) -> list[Any]: ...

        def snapshot(self, k: int) -> Tensor: ...

        def _loss(self, k: int) -> Any: ...

        def _step_map(self) -> Any: ...

        def _stack(self, entries: list[Any]) -> Any: ...

    @property
    def meta_dim(self) -> int:
        return sum(t.numel() for t in self.meta.tensors)

    def _flat_meta(self, grads: list[Tensor]) -> Tensor:
        spec = self.spec
        if not grads:
            return torch.zeros(0, dtype=spec.dtype, device=spec.device)
        return torch.cat([g.reshape(-1).to(spec.dtype) for g in grads])

    def pullback(
        self, k: int, v: Tensor, *, want_state: bool = True
    ) -> tuple[Tensor | None, Tensor]:
        entry, step_map = self._entry(k), self._step_map()
        self.products += 1
        if not hasattr(entry, "loss"):  # a kept step
            w_step, _ = self.meta.copies()
            delta = entry.delta(self.spec, step_map, w_step)
            inputs = (*entry.inputs, *w_step, *entry.loss_meta, *self.meta.closed)
            with blocking(self.chain):
                grads = pull_list([delta], inputs, [v])
            n = len(entry.inputs)
            a = torch.cat([g.reshape(-1) for g in grads[:n]]) if want_state else None
            return a, self._flat_meta(grads[n:])
        aux = entry.aux
        a, grads = engine.pullback(
            entry.loss,
            lambda z, g, w: step_map.delta(z, g, aux, w),
            self.snapshot(k),
            v,
            self.param_dim,
            self.meta,
            want_state=want_state,
        )
        return a, self._flat_meta(grads)

    def meta_pullback_many(
        self, start: int, vectors: Tensor, *, chunk_size: int | None = None, vectorize: bool = True
    ) -> Tensor:
        n = vectors.shape[0]
        entries = self._entries(start, n)
        batchable = vectorize and n > 1 and not self.meta.closed  # see engine
        stacked = self._stack(entries) if batchable else None
        if stacked is not None:
            fn, states, aux, batch, batch_dim = stacked
            try:
                grads = engine.meta_pullback_many(
                    fn,
                    self._step_map().delta,
                    states,
                    aux,
                    batch,
                    batch_dim,
                    vectors,
                    self.param_dim,
                    self.meta,
                    chunk_size=chunk_size,
                )
                self.products += n
                return self._flat_meta(grads)
            except (RuntimeError, NotImplementedError, ValueError) as err:
                _vmap_failed(err)
        total = torch.zeros(self.meta_dim, dtype=self.spec.dtype, device=self.spec.device)
        for r in range(n):
            total = total + self.pullback(start + r, vectors[r], want_state=False)[1]
        return total

    def mixed(self, k: int, v: Tensor) -> Tensor:
        params = self.snapshot(k)[: self.param_dim]
        return self.mixed_at(params, v, k=min(k, max(self.steps - 1, 0)))

    def mixed_at(self, params: Tensor, v: Tensor, *, k: int = 0) -> Tensor:
        self.products += 1
        _, grads = engine.pullback(
            self._loss(k),
            lambda z, g, w: g,
            params,
            v[: self.param_dim],
            self.param_dim,
            self.meta,
            want_state=False,
        )
        return self._flat_meta(grads)
