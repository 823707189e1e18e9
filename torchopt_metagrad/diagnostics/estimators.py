r"""Measuring a rule as an estimator: its meta-gradient, its error, and the curvature regime.

* :func:`meta_gradient`: the flat meta-gradient a rule gives for one task, through
  ``tmg.adapt`` and ``torch.autograd.grad`` (exactly what a user's backward gets).
* :func:`compare_to_exact`: its relative error and cosine against ``tmg.Exact()``
  (:meth:`Comparison.between` for two vectors; ``tmg.diagnostics.compare`` for a table of
  rules with their cost).
* :func:`hessian_norm`, :func:`curvature_regime`, :func:`inner_iterates`,
  :func:`step_norms`: the regime.
  The truncated expansions drop terms of size about
  :math:`(K\,\mathrm{lr}\,\|H\|)^{L+1} / (L+1)!`, so :math:`K\,\mathrm{lr}\max_k\|H_k\|`
  says whether low orders can be accurate. These are diagnostics, not meta-gradients.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import Tensor

from torchopt_metagrad._core.checks import check_int, check_params
from torchopt_metagrad._core.needs import Needs
from torchopt_metagrad._core.protocol import RecordProtocol
from torchopt_metagrad._core.record import Record
from torchopt_metagrad._core.steps import step_map_factory
from torchopt_metagrad.functional import adapt, run_loop
from torchopt_metagrad.rules import AbstractRule, Exact

__all__ = [
    "Comparison",
    "compare_to_exact",
    "curvature_regime",
    "hessian_norm",
    "inner_iterates",
    "meta_gradient",
    "step_norms",
]

LossFn = Callable[[dict[str, Tensor], Any], Tensor]


def _record(
    loss_fn: LossFn, params: Mapping[str, Tensor], batch: Any, steps: int, lr: float
) -> tuple[Any, Record]:
    r"""One gradient-descent run recorded: the flat layout and the record of every state.

    :math:`\phi_{k+1} = \phi_k - \mathrm{lr}\,\nabla\ell(\phi_k)` with ``loss_fn(phi, batch)``
    as :math:`\ell`: the library's one inner loop (that of ``tmg.adapt``), recording every
    state. One run: ``steps`` gradient evaluations, no graph kept between steps.
    """
    spec = check_params(params)
    factory, _, _ = step_map_factory(lr)
    theta = spec.flatten([p.detach() for p in params.values()])
    step_map = factory(spec, None)
    loop = run_loop(
        loss_fn,
        spec,
        theta,
        step_map,
        [batch] * steps,
        needs=lambda n, meta: Needs(snapshots_from=0),
    )
    return spec, loop.record()


@dataclass(frozen=True)
class Comparison:
    r"""How close an estimate :math:`\hat g` is to a reference :math:`g`.

    Attributes:
        rel_error: :math:`\|\hat g - g\|_2 / \|g\|_2`.
        cosine: :math:`\langle \hat g, g\rangle / (\|\hat g\|_2 \|g\|_2)`.
    """

    rel_error: float
    cosine: float

    @classmethod
    def between(cls, estimate: Tensor, reference: Tensor) -> Comparison:
        """Relative error and cosine of two flat vectors (computed in their dtype)."""
        rel = float((estimate - reference).norm() / reference.norm())
        cos = float(torch.nn.functional.cosine_similarity(estimate, reference, dim=0))
        return cls(rel_error=rel, cosine=cos)


def _check_inner(steps: Any, lr: Any) -> None:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    if not isinstance(lr, int | float) or isinstance(lr, bool) or not lr > 0:
        raise ValueError(f"lr must be a number > 0, got {lr!r}")


def meta_gradient(
    loss_fn: LossFn,
    params: Mapping[str, Tensor],
    task: tuple[Any, Any],
    *,
    steps: int,
    lr: float,
    rule: AbstractRule,
) -> Tensor:
    r"""The flat meta-gradient ``rule`` gives for one task.

    .. math:: \widehat{\nabla_\theta}\, \ell(\phi_K(\theta), \mathcal{D}^{q})

    with :math:`\phi_K` from ``tmg.adapt(loss_fn, params, support, steps=steps, lr=lr,
    rule=rule)`` and the query loss ``loss_fn(phi_K, query)``.

    Args:
        loss_fn: ``loss_fn(params, batch) -> scalar``.
        params: the initial parameters (requiring grad).
        task: ``(support, query)`` batches.
        steps: inner steps K.
        lr: inner step size.
        rule: the rule whose estimate is returned.

    Returns:
        The estimate, the gradients of ``params`` concatenated in their order.
    """
    support, query = task
    adapted = adapt(loss_fn, params, support, steps=steps, lr=lr, rule=rule)
    grads = torch.autograd.grad(loss_fn(adapted, query), list(params.values()))
    return torch.cat([g.reshape(-1) for g in grads])


def compare_to_exact(
    loss_fn: LossFn,
    params: Mapping[str, Tensor],
    task: tuple[Any, Any],
    *,
    steps: int,
    lr: float,
    rule: AbstractRule,
    exact: Tensor | None = None,
) -> Comparison:
    """How far ``rule``'s meta-gradient is from ``tmg.Exact()``'s on one task.

    Args:
        loss_fn, params, task, steps, lr, rule: as for :func:`meta_gradient`.
        exact: ``tmg.Exact()``'s meta-gradient for the same task, when already computed
            (a study comparing many rules computes it once); ``None``: computed here.

    Returns:
        :class:`Comparison` of the rule's estimate against the exact meta-gradient.
    """
    if exact is None:
        exact = meta_gradient(loss_fn, params, task, steps=steps, lr=lr, rule=Exact())
    estimate = meta_gradient(loss_fn, params, task, steps=steps, lr=lr, rule=rule)
    return Comparison.between(estimate, exact)


def inner_iterates(
    loss_fn: LossFn, params: Mapping[str, Tensor], batch: Any, *, steps: int, lr: float
) -> list[dict[str, Tensor]]:
    r"""The iterates :math:`\phi_0, \dots, \phi_{K-1}` of gradient descent, detached.

    These are the points where the K steps take their gradients, i.e. where the step
    Jacobians :math:`I - \mathrm{lr}\,H_k` are evaluated. From one recorded run
    (``steps`` gradient evaluations).
    """
    _check_inner(steps, lr)
    spec, record = _record(loss_fn, params, batch, steps, lr)
    return [
        {k: v.detach() for k, v in spec.unflatten(record.snapshot(k)).items()} for k in range(steps)
    ]


def hessian_norm(
    loss_fn: LossFn,
    params: Mapping[str, Tensor],
    batch: Any,
    *,
    iters: int = 20,
    generator: torch.Generator | None = None,
) -> float:
    r"""Spectral norm :math:`\|H\|_2` of the Hessian of ``loss_fn(., batch)`` at ``params``.

    Power iteration :math:`v \leftarrow Hv / \|Hv\|` from a random unit vector (drawn
    with ``generator``, on the CPU); returns :math:`\|Hv\|` of the last iterate, which
    converges from below to the largest eigenvalue magnitude at the rate
    :math:`|\lambda_2 / \lambda_1|`. Cost: ``iters`` Hessian-vector products (double
    backward through one kept gradient graph).
    """
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
        raise ValueError(f"iters must be an int >= 1, got {iters!r}")
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


def step_norms(
    record: RecordProtocol,
    *,
    iters: int = 20,
    generator: torch.Generator | None = None,
) -> list[float]:
    r"""Power-iteration estimates of :math:`\|A_k\|` at every recorded step, batched.

    :math:`A_k = J_k^\top - I` (:math:`-\mathrm{lr}\,H_k` for gradient descent, whose
    norm is :math:`\mathrm{lr}\,\|H_k\|`; for other step maps the magnitude of the
    dominant eigenvalue). Row ``k`` of ``V`` (random unit rows drawn with ``generator`` on
    the CPU) is replaced by :math:`A_k v_k / \|A_k v_k\|` ``iters`` times; each sweep is
    one ``record.apply_many`` call (K products batched with ``vmap``), so the cost is
    ``K * iters`` products in ``iters`` serial calls. Converges from below. Tasks run
    together under ``vmap``: each step's largest estimate over the tasks.
    """
    check_int(iters, "iters", minimum=1)
    K = record.num_steps
    ref = record.snapshot(K)  # the final state: always stored; (tasks, n) under vmap
    v = torch.randn(K, *ref.shape, generator=generator, dtype=ref.dtype).to(ref.device)
    v = v / v.norm(dim=-1, keepdim=True)
    norms = v.new_zeros(v.shape[:-1])
    for _ in range(iters):
        w = record.apply_many(0, v)
        norms = w.norm(dim=-1)
        v = torch.where(norms[..., None] > 0, w / norms.clamp_min(1e-300)[..., None], 0.0)
    return norms.reshape(K, -1).amax(1).tolist()  # the largest over tasks


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
    r""":math:`K\,\mathrm{lr}\max_k \|H_k\|` over the inner iterates of one task, and the norms.

    :math:`H_k` is the Hessian at :math:`\phi_k`, :math:`k < K` (:func:`inner_iterates`),
    its norm by power iteration (:func:`step_norms`: ``iters`` sweeps, each one batched
    call of K Hessian-vector products, starting vectors drawn from ``generator``).
    ``Binomial(L)`` drops terms of relative size about
    :math:`(K\,\mathrm{lr}\,\|H\|)^{L+1} / (L+1)!`. Cost: K gradients and
    K * ``iters`` Hessian-vector products in ``iters`` serial batched calls.

    Returns:
        ``(K * lr * max_k ||H_k||, [||H_0||, ..., ||H_{K-1}||])``.
    """
    _check_inner(steps, lr)
    _, record = _record(loss_fn, params, batch, steps, lr)
    norms = [n / lr for n in step_norms(record, iters=iters, generator=generator)]
    return steps * lr * max(norms), norms
