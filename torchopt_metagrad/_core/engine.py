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
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from torchopt_metagrad.errors import VectorizationFallbackWarning

__all__ = [
    "Meta",
    "hvp",
    "meta_pullback_many",
    "pullback",
    "reset_fallback_warnings",
    "vjp_function",
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
        (out,) = vjp(delta(z, grad), (z,), v)
    return out.detach()


def vjp(out: Tensor, inputs: tuple[Tensor, ...], v: Tensor, **kwargs: Any) -> tuple[Tensor, ...]:
    """``torch.autograd.grad(out, inputs, v)``, zeros for inputs ``out`` does not use, and
    all zeros when ``out`` has no graph at all (a step of a loss linear in the params
    with plain descent: its gradient is a constant, the step's Jacobian the identity)."""
    if not out.requires_grad:
        return tuple(torch.zeros_like(t) for t in inputs)
    return torch.autograd.grad(out, inputs, v, allow_unused=True, materialize_grads=True, **kwargs)


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

    one = vjp_function(loss, delta, param_dim)

    with warnings.catch_warnings():
        # PyTorch notes ops without a batching rule (e.g. torchopt's Adam uses addcmul_);
        # the result is still right, so this is not the user's concern.
        warnings.filterwarnings("ignore", message=_NO_BATCH_RULE, category=UserWarning)
        out = torch.func.vmap(one, in_dims=(0, 0, batch_dim, 0), chunk_size=chunk_size)(
            states, aux, batch, vectors
        )
    return out.detach()


@dataclass(frozen=True)
class Meta:
    """The tensors besides the parameters that a step depends on, by how they enter it.

    Attributes:
        step: the step map's (a learned lr), passed to ``delta`` as ``w``.
        loss: the loss's, passed to it as ``meta`` (fixed entries of ``params``).
        closed: leaves the loss closes over (found in its graph, used as they are).

    ``step`` and ``loss`` are replaced by detached copies in a pullback, so gradients do
    not flow into their histories there (the one autograd node passes them on).
    """

    step: tuple[Tensor, ...] = ()
    loss: tuple[Tensor, ...] = ()
    closed: tuple[Tensor, ...] = ()

    @property
    def tensors(self) -> tuple[Tensor, ...]:
        return (*self.step, *self.loss, *self.closed)

    def __bool__(self) -> bool:
        return bool(self.step or self.loss or self.closed)

    def copies(self) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...]]:
        """Detached leaf copies of ``step`` and ``loss`` to differentiate in a pullback."""
        return tuple(_leaf(t) for t in self.step), tuple(_leaf(t) for t in self.loss)


def _leaf(t: Tensor) -> Tensor:
    return t.detach().requires_grad_(True)


def pullback(
    loss: Callable[[Tensor, tuple[Tensor, ...]], Tensor],
    delta: Callable[[Tensor, Tensor, tuple[Tensor, ...]], Tensor],
    z: Tensor,
    v: Tensor,
    param_dim: int,
    meta: Meta,
    *,
    want_state: bool = True,
) -> tuple[Tensor | None, list[Tensor]]:
    """VJP with ``v`` of ``(z, w) -> delta(z, grad loss(z[:P], w_loss), w_step)`` at ``z``:
    ``(d/dz, [d/dw for w in meta.tensors])`` (``None`` for ``d/dz`` unless ``want_state``)."""
    with torch.enable_grad():
        z = z.detach().requires_grad_(True)
        w_step, w_loss = meta.copies()
        params = z[:param_dim]
        (grad,) = torch.autograd.grad(loss(params, w_loss), params, create_graph=True)
        inputs = ((z,) if want_state else ()) + w_step + w_loss + meta.closed
        # The loss may reach closed-over leaves through tensors computed outside it (a
        # body's features): keep those graphs for the outer backward.
        out = vjp(delta(z, grad, w_step), inputs, v, retain_graph=bool(meta.closed))
    grads = [g.detach() for g in out]
    return (grads.pop(0) if want_state else None), grads


def meta_pullback_many(
    loss: Callable[[Tensor, Any, tuple[Tensor, ...]], Tensor],
    delta: Callable[[Tensor, Tensor, Any, tuple[Tensor, ...]], Tensor],
    states: Tensor,
    aux: Any,
    batch: Any,
    batch_dim: int | None,
    vectors: Tensor,
    param_dim: int,
    meta: Meta,
    *,
    chunk_size: int | None = None,
) -> list[Tensor]:
    """``sum_r`` of the meta part of row ``r``'s VJP (see :func:`pullback`), rows batched.

    One ``torch.func.vmap`` of ``torch.func.vjp`` with respect to the step's and the
    loss's meta-parameters, passed as arguments (reverse over reverse inside
    ``torch.func``). Not for closed-over leaves (``meta.closed``): ``torch.func`` cannot
    differentiate what a function closes over, and plain autograd around
    ``torch.func.grad`` is wrong on convolution + batch-norm nets in torch 2.13 (measured
    6% off), so the caller loops over :func:`pullback` for those.
    """
    if meta.closed:
        raise ValueError("closed-over meta-parameters need the one-by-one pullback")
    w_step = tuple(t.detach() for t in meta.step)
    w_loss = tuple(t.detach() for t in meta.loss)

    def one(z: Tensor, a: Any, b: Any, v: Tensor) -> Any:
        def increment(ws: tuple[Tensor, ...], wl: tuple[Tensor, ...]) -> Tensor:
            grad = torch.func.grad(loss)(z[:param_dim], b, wl)
            return delta(z, grad, a, ws)

        return torch.func.vjp(increment, w_step, w_loss)[1](v)

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_NO_BATCH_RULE, category=UserWarning)
        per_row = torch.func.vmap(one, in_dims=(0, 0, batch_dim, 0), chunk_size=chunk_size)(
            states, aux, batch, vectors
        )
    grads_step, grads_loss = per_row
    return [g.sum(0).detach() for g in (*grads_step, *grads_loss)]


def vjp_function(
    loss: Callable[[Tensor, Any], Tensor],
    delta: Callable[[Tensor, Tensor, Any], Tensor],
    param_dim: int,
) -> Callable[[Tensor, Any, Any, Tensor], Tensor]:
    """``(z, aux, batch, v) -> `` the VJP with ``v`` of ``z -> delta(z, grad loss(z[:P], batch),
    aux)``, written with ``torch.func`` only (vmappable)."""

    def one(z: Tensor, a: Any, b: Any, v: Tensor) -> Tensor:
        def increment(z_: Tensor) -> Tensor:
            grad = torch.func.grad(loss)(z_[:param_dim], b)
            return delta(z_, grad, a)

        return torch.func.vjp(increment, z)[1](v)[0]

    return one


def reset_fallback_warnings() -> None:
    """Forget which fallback warnings were shown (each shows again, once)."""
    _warned.clear()


def warn_once(key: str, message: str, *, stacklevel: int = 4) -> None:
    """Emit a :class:`VectorizationFallbackWarning` once per ``key`` and process."""
    if key in _warned:
        return
    _warned.add(key)
    warnings.warn(message, VectorizationFallbackWarning, stacklevel=stacklevel)
