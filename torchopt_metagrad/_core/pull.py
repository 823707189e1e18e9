"""Pullbacks through kept step graphs (the module front end's ``step(loss)``).

A kept step's gradient graph starts at the parameters of that step, which the module
front end's previous autograd node produced from ``theta`` and the closed-over leaves.
A pullback wants *partial* derivatives with respect to the step's inputs and those
leaves; autograd would also follow the path through the earlier node (a total
derivative, counted again by the rule). While a pullback of a chain runs, that chain's
nodes give nothing (:func:`blocking`, checked by the node through :func:`is_blocked`).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

__all__ = ["blocking", "is_blocked", "pull", "pull_list"]

_blocked: set[int] = set()
_blocked_lock = threading.Lock()  # the backward may run on autograd's device threads


@contextlib.contextmanager
def blocking(chain: object | None) -> Iterator[None]:
    if chain is None:
        yield
        return
    with _blocked_lock:
        _blocked.add(id(chain))
    try:
        yield
    finally:
        with _blocked_lock:
            _blocked.discard(id(chain))


def is_blocked(chain: object | None) -> bool:
    """True while a pullback through a kept graph of ``chain`` runs."""
    return chain is not None and id(chain) in _blocked


def pull(out: list[Tensor] | tuple[Tensor, ...], inputs: tuple[Tensor, ...], v: Any) -> Tensor:
    return torch.cat([g.reshape(-1) for g in pull_list(out, inputs, v)])


def pull_list(
    out: list[Tensor] | tuple[Tensor, ...], inputs: tuple[Tensor, ...], v: Any
) -> list[Tensor]:
    if not any(t.requires_grad for t in out):  # a constant gradient: see engine.vjp
        return [torch.zeros_like(t) for t in inputs]
    grads = torch.autograd.grad(
        out, inputs, v, retain_graph=True, allow_unused=True, materialize_grads=True
    )
    return [g.detach() for g in grads]
