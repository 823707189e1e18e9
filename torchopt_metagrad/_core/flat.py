"""Flat views of a named parameter dict.

The rules work on one flat vector per snapshot, so that many snapshots can be
stacked into one tensor and ``torch.func.vmap``-ed over. ``FlatSpec`` converts
between that vector and the ``dict[str, Tensor]`` a user's ``loss_fn`` expects.
Unflattening returns views (``split`` + ``view``), which works inside
``torch.func`` transforms.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["FlatSpec"]


@dataclass(frozen=True)
class FlatSpec:
    """Names, shapes and sizes of a set of tensors laid end to end in one vector."""

    names: tuple[str, ...]
    shapes: tuple[torch.Size, ...]
    sizes: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, Tensor]) -> FlatSpec:
        """Describe ``tensors`` (all of one dtype and device, checked by the caller)."""
        first = next(iter(tensors.values()))
        return cls(
            names=tuple(tensors),
            shapes=tuple(t.shape for t in tensors.values()),
            sizes=tuple(t.numel() for t in tensors.values()),
            dtype=first.dtype,
            device=first.device,
        )

    @property
    def numel(self) -> int:
        """Length of the flat vector."""
        return sum(self.sizes)

    def flatten(self, tensors: Sequence[Tensor]) -> Tensor:
        """Concatenate ``tensors`` (in ``names`` order) into one vector; differentiable."""
        return torch.cat([t.reshape(-1) for t in tensors])

    def split(self, flat: Tensor) -> list[Tensor]:
        """Views of ``flat`` with the original shapes, in ``names`` order."""
        return [t.view(s) for t, s in zip(flat.split(self.sizes), self.shapes, strict=True)]

    def unflatten(self, flat: Tensor) -> dict[str, Tensor]:
        """``{name: view}`` of ``flat``; works on batched tensors inside ``vmap``."""
        return dict(zip(self.names, self.split(flat), strict=True))
