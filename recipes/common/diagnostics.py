"""Measurements for estimator studies: a rule's meta-gradient, and the Hessian's norm.

The meta-gradients come from the library (``tmg.adapt`` + ``torch.autograd.grad``);
the recipes never form one themselves. The Hessian norm is a diagnostic of the
regime (how large ``K * lr * ||H||`` is), measured by power iteration with
Hessian-vector products (autograd double backward), not a meta-gradient.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, cast

import torch
from torch import Tensor

import torchopt_metagrad as tmg

__all__ = ["curvature_regime", "hessian_norm", "inner_iterates", "meta_gradient"]

LossFn = Callable[[dict[str, Tensor], Any], Tensor]


def meta_gradient(
    loss_fn: LossFn,
    params: Mapping[str, Tensor],
    task: tuple[Any, Any],
    *,
    steps: int,
    lr: float,
    rule: tmg.AbstractRule,
) -> Tensor:
    """The flat meta-gradient ``rule`` gives for one task (query loss after ``steps``)."""
    support, query = task
    adapted = tmg.adapt(loss_fn, params, support, steps=steps, lr=lr, rule=rule)
    grads = torch.autograd.grad(loss_fn(adapted, query), list(params.values()))
    return torch.cat([g.reshape(-1) for g in grads])


def inner_iterates(
    loss_fn: LossFn, params: Mapping[str, Tensor], batch: Any, *, steps: int, lr: float
) -> list[dict[str, Tensor]]:
    """The inner iterates ``phi_0 .. phi_{steps-1}`` (detached), taken from ``tmg.adapt``."""
    iterates = [{k: v.detach() for k, v in params.items()}]
    for k in range(1, steps):
        adapted = tmg.adapt(loss_fn, params, batch, steps=k, lr=lr, rule=tmg.FirstOrder())
        iterates.append({n: v.detach() for n, v in adapted.items()})
    return iterates


def hessian_norm(
    loss_fn: LossFn,
    params: Mapping[str, Tensor],
    batch: Any,
    *,
    iters: int = 20,
    generator: torch.Generator | None = None,
) -> float:
    r"""Spectral norm :math:`\|H\|_2` of the Hessian of ``loss_fn`` at ``params``.

    Power iteration :math:`v \leftarrow Hv / \|Hv\|` from a random unit vector; returns
    :math:`\|Hv\|` of the last iterate, which converges (from below) to the largest
    eigenvalue magnitude. Cost: ``iters`` Hessian-vector products.
    """
    leaves = [p.detach().requires_grad_(True) for p in params.values()]
    names = list(params)
    with torch.enable_grad():
        loss = loss_fn(dict(zip(names, leaves, strict=True)), batch)
        grads = torch.autograd.grad(loss, leaves, create_graph=True)
        v = [torch.randn(p.shape, generator=generator, dtype=p.dtype).to(p.device) for p in leaves]
        norm = torch.sqrt(cast(Tensor, sum((x * x).sum() for x in v)))
        v = [x / norm for x in v]
        value = 0.0
        for _ in range(iters):
            hv = torch.autograd.grad(grads, leaves, v, retain_graph=True)
            norm = torch.sqrt(cast(Tensor, sum((x * x).sum() for x in hv)))
            value = float(norm)
            if value == 0.0:
                break
            v = [x.detach() / norm for x in hv]
    return value


def curvature_regime(
    loss_fn: LossFn,
    params: Mapping[str, Tensor],
    batch: Any,
    *,
    steps: int,
    lr: float,
    iters: int = 20,
    generator: torch.Generator | None = None,
) -> tuple[float, list[float]]:
    r"""``K * lr * max_k ||H_k||`` over the inner iterates of one task, and the ``||H_k||``.

    The truncated binomial expansion drops terms of size about
    :math:`(K \, \mathrm{lr} \, \|H\|)^{L+1} / (L+1)!`, so this number says whether
    low orders can be accurate.
    """
    norms = [
        hessian_norm(loss_fn, phi, batch, iters=iters, generator=generator)
        for phi in inner_iterates(loss_fn, params, batch, steps=steps, lr=lr)
    ]
    return steps * lr * max(norms), norms
