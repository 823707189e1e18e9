"""Vector-Jacobian products of inner steps, at one snapshot or at many at once.

Every second-order rule reduces to ``A_k v``: the VJP of the step increment
``Delta_k(z) = S_k(z) - z`` at the stored snapshot ``z_k`` (for gradient descent,
``-lr * H_k v``, a Hessian-vector product). Two paths compute it:

* one point: plain autograd double backward (build the inner-loss gradient with
  ``create_graph=True`` at a fresh leaf, then one ``torch.autograd.grad``). On
  CPU this measured fastest for a single product; its graph lives only for the
  call, so memory does not grow with the number of steps;
* many points: ``torch.func.vmap`` over stacked snapshots, vectors and (per-step)
  batches of ``torch.func.vjp`` of the increment, with ``torch.func.grad``
  inside. ``chunk_size`` bounds how many products are live at once. When the
  model cannot be vmapped (batch norm that updates running statistics in place,
  per-step batches of different shapes, ...), it falls back to a loop over the
  one-point path with a one-time :class:`VectorizationFallbackWarning`.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from torchopt_metagrad.errors import VectorizationFallbackWarning

if TYPE_CHECKING:
    from torchopt_metagrad.steps import Aux
    from torchopt_metagrad.trajectory import InnerProblem

__all__ = ["checked_loss", "hvp", "vjp_delta", "vjp_delta_many"]

_warned: set[str] = set()
_NO_BATCH_RULE = "There is a performance drop because we have not yet implemented the batching rule"


def checked_loss(problem: InnerProblem, params_flat: Tensor, k: int) -> Tensor:
    """The inner loss of step ``k`` at ``params_flat``, checked to be a usable scalar.

    Raises:
        TypeError: ``loss_fn`` did not return a tensor.
        ValueError: the loss is not a scalar, or does not depend on the params.
    """
    loss = problem.loss(params_flat, problem.schedule.at(k))
    if not isinstance(loss, Tensor):
        raise TypeError(
            f"loss_fn must return a scalar tensor, got {type(loss).__name__} at inner step {k}"
        )
    if loss.numel() != 1:
        raise ValueError(
            f"loss_fn must return a scalar tensor, got shape {tuple(loss.shape)} at inner step {k}"
        )
    if not loss.requires_grad:
        raise ValueError(
            "loss_fn's output does not depend on params (no gradient flows to any of them at "
            f"inner step {k}); compute the loss from the params dict it is given, e.g. with "
            "torch.func.functional_call(model, params, inputs)"
        )
    return loss.reshape(())


def _pullback_one(
    problem: InnerProblem,
    z: Tensor,
    batch: Any,
    v: Tensor,
    out_fn: Callable[[Tensor, Tensor], Tensor],
) -> Tensor:
    """VJP with ``v`` of ``z -> out_fn(z, grad loss(z[:P]))`` at ``z``, by double backward."""
    with torch.enable_grad():
        z = z.detach().requires_grad_(True)
        params = z[: problem.spec.numel]
        loss = problem.loss(params, batch)
        (grad,) = torch.autograd.grad(loss, params, create_graph=True)
        (out,) = torch.autograd.grad(
            out_fn(z, grad), z, v, allow_unused=True, materialize_grads=True
        )
    return out.detach()


def vjp_delta(problem: InnerProblem, z: Tensor, aux: Aux, k: int, v: Tensor) -> Tensor:
    """``A_k v``: the VJP of the increment of step ``k`` at snapshot ``z`` (one graph)."""
    step_map = problem.require_step_map()
    return _pullback_one(
        problem, z, problem.schedule.at(k), v, lambda z_, g: step_map.delta(z_, g, aux)
    )


def hvp(problem: InnerProblem, params: Tensor, batch: Any, v: Tensor) -> Tensor:
    """``H v``, the Hessian of the plain inner loss (no proximal term) at ``params``."""
    return _pullback_one(problem, params, batch, v, lambda _, g: g)


def _functional_vjp(problem: InnerProblem, z: Tensor, aux: Aux, batch: Any, v: Tensor) -> Tensor:
    step_map = problem.require_step_map()

    def increment(z_: Tensor) -> Tensor:
        params = z_[: step_map.param_dim]
        grad = torch.func.grad(problem.loss)(params, batch)
        return step_map.delta(z_, grad, aux)

    pullback = torch.func.vjp(increment, z)[1]
    return pullback(v)[0]


def vjp_delta_many(
    problem: InnerProblem,
    snapshots: Tensor,
    aux: list[Aux],
    start: int,
    vectors: Tensor,
    *,
    chunk_size: int | None = None,
    vectorize: bool = True,
) -> Tensor:
    """``A_{start+r} vectors[r]`` for each row ``r``, batched with ``vmap`` when possible.

    Args:
        problem: the inner problem.
        snapshots: ``(n, dim)`` snapshots of steps ``start..start+n-1``.
        aux: their non-differentiable optimizer state.
        start: step index of the first row.
        vectors: ``(n, dim)`` vectors.
        chunk_size: at most this many products at once (``None``: all ``n``).
        vectorize: ``False`` forces the loop (for comparisons and debugging).
    """
    n = vectors.shape[0]
    if vectorize and n > 1:
        batch = problem.schedule.stacked(start, start + n)
        if batch is None:
            _warn_once(
                "unstackable",
                "per-step batches have different structures or shapes, so they cannot be "
                "stacked for vmap; the Hessian-vector products run one by one",
            )
        else:
            batch_value, batch_dim = batch
            stacked_aux = tuple(torch.stack(col) for col in zip(*aux, strict=True))
            try:
                with warnings.catch_warnings():
                    # PyTorch notes ops without a batching rule (e.g. torchopt's Adam uses
                    # addcmul_); the result is still right, so this is not the user's concern.
                    warnings.filterwarnings("ignore", message=_NO_BATCH_RULE, category=UserWarning)
                    return torch.func.vmap(
                        lambda z, a, b, v: _functional_vjp(problem, z, a, b, v),
                        in_dims=(0, 0, batch_dim, 0),
                        chunk_size=chunk_size,
                    )(snapshots, stacked_aux, batch_value, vectors).detach()
            except (RuntimeError, NotImplementedError, ValueError) as err:
                _warn_once(
                    type(err).__name__,
                    f"torch.func.vmap failed on this model ({type(err).__name__}: "
                    f"{str(err).splitlines()[0] if str(err) else ''}); the Hessian-vector "
                    "products run one by one (same result, slower)",
                )
    return torch.stack(
        [vjp_delta(problem, snapshots[r], aux[r], start + r, vectors[r]) for r in range(n)]
    )


def _warn_once(key: str, message: str) -> None:
    if key in _warned:
        return
    _warned.add(key)
    warnings.warn(message, VectorizationFallbackWarning, stacklevel=4)
