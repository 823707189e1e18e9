r"""How many of a stage's independent products to batch into one call, within a memory budget.

A batched (``vmap``) call of ``n`` step products holds ``n`` products' autograd graphs at
once: its peak live memory is ``n`` times one product's (measured on the 4-conv net: 16.8
MB per row for 1, 2, ..., 16 rows, against a 16.3 MB peak for one product by plain double
backward; ``benchmarks/bench_rules.py``). So one product is measured -- the first of the
first stage, which the stage needs anyway -- under :class:`PeakLiveBytes`, and the rows
per call follow from the budget:

* ``memory=n`` (bytes): ``max(1, n // R)`` rows per call, ``R`` the measured peak of one
  product;
* ``memory="auto"``: a budget of ``K R / 4`` bytes (``K`` inner steps), at least
  :data:`AUTO_FLOOR`: at most ``ceil(K / 4)`` products at once, more when they fit in the
  floor. One product's peak ``R`` is 1.6-2.2x one step's graph (sine MLP, 4-conv net), so
  this keeps the products of a call at about half of the ``K`` step graphs that unrolled
  backprop keeps alive, while small models (``R`` of a few KB) still batch whole stages.

A call of one row runs by plain double backward, not ``vmap`` (same values; on the CPU
the 4-conv net's product takes 34 ms that way against 52 ms as a one-row ``vmap``).
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable
from typing import Any, Literal, TypeVar

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

__all__ = ["AUTO_FLOOR", "Memory", "PeakLiveBytes", "check_memory", "measure_peak", "rows_per_call"]

#: ``memory="auto"`` lets a call's products hold at least this many bytes (8 MiB).
AUTO_FLOOR = 8 * 2**20

#: A memory budget: bytes, ``"auto"``, or ``None`` (no bound).
Memory = int | Literal["auto"] | None

T = TypeVar("T")


class PeakLiveBytes(TorchDispatchMode):
    """Bytes of tensor storages created inside the block and still alive; the running peak.

    A compact form of ``tmg.diagnostics.LiveMemoryTracker`` for one call: every new
    storage an op returns is added, and subtracted when it is freed (``weakref.finalize``
    on the storage object). Storages created before the block count zero.
    """

    def __init__(self) -> None:
        super().__init__()
        self.current = 0
        self.peak = 0
        self._seen: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {_key(t) for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            key = _key(t)
            if key is None or key in inputs or key in self._seen:
                continue
            storage = t.untyped_storage()
            self._seen.add(key)
            size = storage.nbytes()
            self.current += size
            self.peak = max(self.peak, self.current)
            weakref.finalize(storage, self._free, key, size)
        return out

    def _free(self, key: int, size: int) -> None:
        self._seen.discard(key)
        self.current -= size


def _key(t: torch.Tensor) -> int | None:
    try:
        if t.is_meta or t.layout != torch.strided:
            return None
        return t.untyped_storage()._cdata
    except (RuntimeError, NotImplementedError):
        return None


def measure_peak(fn: Callable[[], T]) -> tuple[T, int]:
    """``(fn(), peak live bytes of the storages it created)``."""
    with PeakLiveBytes() as mode:
        out = fn()
    return out, mode.peak


def rows_per_call(memory: int | Literal["auto"], per_row: int, steps: int) -> int:
    """Products per batched call within ``memory`` (module docstring), at least one."""
    per_row = max(per_row, 1)
    budget = max(steps * per_row / 4, AUTO_FLOOR) if memory == "auto" else memory
    return max(1, math.floor(budget / per_row))


def check_memory(memory: Any) -> None:
    """Raise unless ``memory`` is ``None``, ``"auto"`` or an int >= 1 (bytes)."""
    if memory is None or memory == "auto":
        return
    if isinstance(memory, bool) or not isinstance(memory, int) or memory < 1:
        raise ValueError(f"memory must be 'auto', None or a number of bytes >= 1, got {memory!r}")
