"""Helpers of the record's batched products: stacking rows and batches for vmap, the
fallback warning, a step loss with constant meta-parameters."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.utils import _pytree as pytree

from torchopt_metagrad._core import engine
from torchopt_metagrad._core.replay import StepLoss

__all__ = ["constant", "rows", "stack_batches", "vmap_failed"]


def rows(states: list[Tensor]) -> Tensor:
    """``torch.stack(states)``, as a view when they are consecutive rows of one block."""
    base = states[0]._base
    if base is not None and base.dim() == 2 and all(z._base is base for z in states):
        stride, first = base.stride(0), states[0].storage_offset() - base.storage_offset()
        consecutive = all(
            z.storage_offset() - states[0].storage_offset() == i * stride
            for i, z in enumerate(states)
        )
        if consecutive and first % stride == 0:
            return base[first // stride : first // stride + len(states)]
    return torch.stack(states)


def stack_batches(batches: list[Any]) -> tuple[Any, int | None] | None:
    """``(batch, None)`` if all are one object; ``(stacked, 0)`` if they stack; else ``None``."""
    if all(b is batches[0] for b in batches):
        return batches[0], None
    flat = [pytree.tree_flatten(b) for b in batches]
    spec0 = flat[0][1]
    if any(spec != spec0 for _, spec in flat):
        return None
    stacked = []
    for column in zip(*(leaves for leaves, _ in flat), strict=True):
        if not all(isinstance(t, Tensor) for t in column):
            return None
        if any(t.shape != column[0].shape for t in column):
            return None
        stacked.append(torch.stack(column))
    return pytree.tree_unflatten(stacked, spec0), 0


def constant(loss: StepLoss) -> Any:
    """The loss with its meta-parameters as constants (detached): ``params -> loss``."""
    meta = tuple(t.detach() for t in loss.meta)
    return lambda params: loss(params, meta)


def vmap_failed(err: Exception) -> None:
    first_line = str(err).splitlines()[0] if str(err) else ""
    engine.warn_once(
        f"{type(err).__name__}: {first_line}",  # each different failure is reported once
        f"torch.func.vmap failed on this model ({type(err).__name__}: {first_line}); "
        "the Hessian-vector products run one by one (same result, slower)",
        stacklevel=5,
    )
