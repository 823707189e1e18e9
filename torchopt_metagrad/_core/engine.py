"""Vector-Jacobian products of inner steps over plain callables, one or many at a time.

Every second-order rule reduces to ``A v``: the VJP of a step increment
``Delta(z) = delta(z, grad loss(z[:P]))`` at a stored state ``z`` (for gradient descent,
``-lr * H v``, a Hessian-vector product). This module knows nothing of front ends,
records or rules: it takes the inner loss and the increment as callables.

* one point: plain autograd double backward (the inner-loss gradient with
  ``create_graph=True`` at a fresh leaf, then one ``torch.autograd.grad``); its graph
  lives only for the call. On CPU this measured fastest for a single product;
* many points: ``torch.func.vmap`` over stacked states, vectors and (per-step) batches of
  ``torch.func.vjp`` of the increment, with ``torch.func.grad`` inside; ``chunk_size``
  bounds how many products are live at once. Callers fall back to a loop of one-point
  products when vmap cannot run the model (:func:`warn_once` says so, once per reason).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from torchopt_metagrad.errors import VectorizationFallbackWarning

__all__ = [
    "hvp",
    "reset_fallback_warnings",
    "vjp_increment",
    "vjp_increment_many",
    "warn_once",
]

#: ``delta(z, grad) -> Delta`` of one step (optimizer state captured by the caller).
Increment = Callable[[Tensor, Tensor], Tensor]

_warned: set[str] = set()
_NO_BATCH_RULE = "There is a performance drop because we have not yet implemented the batching rule"


def vjp_increment(
    loss: Callable[[Tensor], Tensor], delta: Increment, z: Tensor, v: Tensor, param_dim: int
) -> Tensor:
    """VJP with ``v`` of ``z -> delta(z, grad loss(z[:param_dim]))`` at ``z`` (double backward)."""
    with torch.enable_grad():
        z = z.detach().requires_grad_(True)
        params = z[:param_dim]
        (grad,) = torch.autograd.grad(loss(params), params, create_graph=True)
        (out,) = torch.autograd.grad(
            delta(z, grad), z, v, allow_unused=True, materialize_grads=True
        )
    return out.detach()


def hvp(loss: Callable[[Tensor], Tensor], params: Tensor, v: Tensor) -> Tensor:
    """``H v`` with ``H`` the Hessian of ``loss`` at ``params``."""
    return vjp_increment(loss, lambda _, g: g, params, v, params.numel())


def vjp_increment_many(
    loss: Callable[[Tensor, Any], Tensor],
    delta: Callable[[Tensor, Tensor, Any], Tensor],
    states: Tensor,
    aux: Any,
    batch: Any,
    batch_dim: int | None,
    vectors: Tensor,
    param_dim: int,
    *,
    chunk_size: int | None = None,
) -> Tensor:
    """Row ``r``: the VJP with ``vectors[r]`` of ``z -> delta(z, grad loss(z[:P], b_r), aux_r)``
    at ``states[r]``, all rows in one ``torch.func.vmap`` call.

    ``aux`` is a pytree of tensors stacked along dim 0; ``batch`` is shared
    (``batch_dim=None``) or stacked along ``batch_dim``. Raises whatever vmap raises
    when the model cannot be batched (the caller falls back to a loop).
    """

    def one(z: Tensor, a: Any, b: Any, v: Tensor) -> Tensor:
        def increment(z_: Tensor) -> Tensor:
            grad = torch.func.grad(loss)(z_[:param_dim], b)
            return delta(z_, grad, a)

        return torch.func.vjp(increment, z)[1](v)[0]

    with warnings.catch_warnings():
        # PyTorch notes ops without a batching rule (e.g. torchopt's Adam uses addcmul_);
        # the result is still right, so this is not the user's concern.
        warnings.filterwarnings("ignore", message=_NO_BATCH_RULE, category=UserWarning)
        out = torch.func.vmap(one, in_dims=(0, 0, batch_dim, 0), chunk_size=chunk_size)(
            states, aux, batch, vectors
        )
    return out.detach()


def reset_fallback_warnings() -> None:
    """Forget which fallback warnings were shown (each shows again, once)."""
    _warned.clear()


def warn_once(key: str, message: str, *, stacklevel: int = 4) -> None:
    """Emit a :class:`VectorizationFallbackWarning` once per ``key`` and process."""
    if key in _warned:
        return
    _warned.add(key)
    warnings.warn(message, VectorizationFallbackWarning, stacklevel=stacklevel)
