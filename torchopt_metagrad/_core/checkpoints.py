"""States between checkpoints, recomputed in the backward (``Exact(snapshots=n)``).

With a bounded number of stored states, a record keeps every step's replayable loss and
integer optimizer state but only the states at checkpoints (every ``s``-th step). A
rule asking for a state that was not stored gets it from :func:`recompute_segment`: the
forward is rerun from the checkpoint at or before it up to the next checkpoint, with
each step's loss replayed (the same random draws, buffers untouched), so the states are
the forward's bit for bit. A rule that walks the steps backwards (``Exact``) recomputes
each segment once: one extra forward pass in all, and at most one segment of states
alive besides the checkpoints (memory ``O(K/s + s)`` states; ``s = sqrt(K)`` minimizes it).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["recompute_segment"]


def recompute_segment(record: Any, k: int) -> dict[int, Tensor]:
    """``{i: z_i}`` for the segment of stored-state-free steps containing step ``k``."""
    first, entries = record.first, record.entries
    start = k
    while entries[start - first].z is None:
        start -= 1
        if start < first:
            raise RuntimeError(f"no checkpoint at or before inner step {k}")
    step_map, P = record.step_map, record.param_dim
    # A fresh copy, not the stored row: the forward took this step at a freshly allocated
    # state, and a row of the snapshot block can sit at an address (d odd, float32) where
    # the CPU kernels sum in another order; the recomputed states would drift from the
    # forward's by round-off growing along the segment (4.5e-4 of the meta-gradient after
    # 10,000 float32 steps of the sine MLP, against 7.6e-7 between Exact and Unrolled).
    z = entries[start - first].z.clone()
    states = {start: z}
    i = start
    while i + 1 < record.steps and entries[i + 1 - first].z is None:
        entry = entries[i - first]
        with torch.enable_grad():
            leaf = z[:P].detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(entry.loss(leaf), leaf)
        with torch.no_grad():
            z, _ = step_map.advance(z, grad, entry.aux)
        i += 1
        states[i] = z
    return states
