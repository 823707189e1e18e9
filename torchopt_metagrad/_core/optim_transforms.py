r"""``torch.optim``'s update formulas as pure torchopt ``GradientTransformation``\ s.

Each transform here is the single-tensor update of the ``torch.optim`` optimizer of the
same name, written as a pure function of ``(gradient, state, params)``: the step count
is an integer tensor in the state (not a Python counter or a closure flag), so a rule
that replays step ``k`` from a stored state gets the forward's update exactly, and every
floating-point operation runs in the parameters' dtype (torchopt's ``adam`` and
``adagrad`` compute their bias correction and learning-rate decay in float32, about
1e-7 relative off in float64). They are used where torchopt has no equivalent pure
update (SGD with dampening, Adamax, ASGD, Rprop, Adam with ``amsgrad``) or a less
precise one; ``tests/test_higher_compat.py`` checks each against ``torch.optim``'s
trajectory and ``higher``'s differentiable optimizer.

State layout: ``(count, {name: per-parameter state tuple})``, ``count`` the number of
steps taken (int64, 0-dim).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torchopt.base import GradientTransformation

__all__ = ["adadelta", "adagrad", "adam", "adamax", "asgd", "rprop", "sgd"]

#: ``(param, grad, state, t) -> (update, new state)``; ``t`` is the 1-based step, float
Step = Callable[[Tensor, Tensor, tuple[Tensor, ...], Tensor], tuple[Tensor, tuple[Tensor, ...]]]


def _transform(init: Callable[[Tensor], tuple[Tensor, ...]], step: Step) -> GradientTransformation:
    def init_fn(params: Any) -> Any:
        first = next(iter(params.values()), None)
        device = None if first is None else first.device
        count = torch.zeros((), dtype=torch.long, device=device)
        return count, {n: init(p) for n, p in params.items()}

    def update_fn(
        updates: Any, state: Any, *, params: Any = None, inplace: bool = True
    ) -> tuple[Any, Any]:
        if params is None:
            raise ValueError("this optimizer needs params= in update (torch.optim's formula)")
        count, per = state
        count = count + 1
        out, new = {}, {}
        for n, g in updates.items():
            p = params[n]
            out[n], new[n] = step(p, g, per[n], count.to(p.dtype))
        return out, (count, new)

    return GradientTransformation(init_fn, update_fn)


def _prepare(g: Tensor, p: Tensor, weight_decay: float, maximize: bool) -> Tensor:
    g = -g if maximize else g
    return g + weight_decay * p if weight_decay else g


def sgd(
    lr: float,
    momentum: float,
    dampening: float,
    weight_decay: float,
    nesterov: bool,
    maximize: bool,
) -> GradientTransformation:
    """``torch.optim.SGD``: the momentum buffer starts as the first gradient (no dampening
    on the first step), then ``buf = momentum buf + (1 - dampening) g``."""

    def step(p: Tensor, g: Tensor, s: tuple[Tensor, ...], t: Tensor) -> Any:
        g = _prepare(g, p, weight_decay, maximize)
        if not momentum:
            return g * (-lr), s
        (buf,) = s
        # t == 1: buf is 0 and the factor is 1, so buf becomes g exactly, as in torch.optim
        buf = buf * momentum + g * (1 - dampening * (t > 1).to(g.dtype))
        g = g + momentum * buf if nesterov else buf
        return g * (-lr), (buf,)

    return _transform(lambda p: (torch.zeros_like(p),) if momentum else (), step)


def adam(
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    amsgrad: bool,
    maximize: bool,
    decoupled: bool,
) -> GradientTransformation:
    r"""``torch.optim.Adam`` (``decoupled``: ``AdamW``):
    :math:`p \leftarrow p - \frac{lr}{1-\beta_1^t} m / (\sqrt{v}/\sqrt{1-\beta_2^t} + \epsilon)`
    (``amsgrad``: the running maximum of ``v``)."""
    b1, b2 = betas

    def step(p: Tensor, g: Tensor, s: tuple[Tensor, ...], t: Tensor) -> Any:
        g = -g if maximize else g
        decay = -lr * weight_decay * p if decoupled and weight_decay else None
        if weight_decay and not decoupled:
            g = g + weight_decay * p
        m, v, *vmax = s
        m = m * b1 + (1 - b1) * g
        v = v * b2 + (1 - b2) * g * g
        if amsgrad:
            vmax = [torch.maximum(vmax[0], v)]
        bc1, bc2 = 1 - b1**t, 1 - b2**t
        denom = (vmax[0] if amsgrad else v).sqrt() / bc2.sqrt() + eps
        u = m / denom * (-lr / bc1)
        return (u if decay is None else u + decay), (m, v, *vmax)

    n = 3 if amsgrad else 2
    return _transform(lambda p: tuple(torch.zeros_like(p) for _ in range(n)), step)


def adagrad(
    lr: float,
    lr_decay: float,
    weight_decay: float,
    initial_accumulator_value: float,
    eps: float,
    maximize: bool,
) -> GradientTransformation:
    """``torch.optim.Adagrad``: ``sum += g^2``, ``p -= lr / (1 + (t-1) lr_decay) g /
    (sqrt(sum) + eps)``."""

    def step(p: Tensor, g: Tensor, s: tuple[Tensor, ...], t: Tensor) -> Any:
        g = _prepare(g, p, weight_decay, maximize)
        total = s[0] + g * g
        clr = lr / (1 + (t - 1) * lr_decay)
        return g / (total.sqrt() + eps) * (-clr), (total,)

    return _transform(lambda p: (torch.full_like(p, initial_accumulator_value),), step)


def adadelta(
    lr: float, rho: float, eps: float, weight_decay: float, maximize: bool
) -> GradientTransformation:
    """``torch.optim.Adadelta``."""

    def step(p: Tensor, g: Tensor, s: tuple[Tensor, ...], t: Tensor) -> Any:
        g = _prepare(g, p, weight_decay, maximize)
        square_avg, acc_delta = s
        square_avg = square_avg * rho + (1 - rho) * g * g
        delta = (acc_delta + eps).sqrt() / (square_avg + eps).sqrt() * g
        acc_delta = acc_delta * rho + (1 - rho) * delta * delta
        return delta * (-lr), (square_avg, acc_delta)

    return _transform(lambda p: (torch.zeros_like(p), torch.zeros_like(p)), step)


def adamax(
    lr: float, betas: tuple[float, float], eps: float, weight_decay: float, maximize: bool
) -> GradientTransformation:
    """``torch.optim.Adamax``: ``u = max(beta2 u, |g| + eps)``, ``p -= lr / (1 - beta1^t)
    m / u``."""
    b1, b2 = betas

    def step(p: Tensor, g: Tensor, s: tuple[Tensor, ...], t: Tensor) -> Any:
        g = _prepare(g, p, weight_decay, maximize)
        m, inf = s
        m = m * b1 + (1 - b1) * g
        inf = torch.maximum(inf * b2, g.abs() + eps)
        return m / inf * (-lr / (1 - b1**t)), (m, inf)

    return _transform(lambda p: (torch.zeros_like(p), torch.zeros_like(p)), step)


def asgd(
    lr: float, lambd: float, alpha: float, weight_decay: float, maximize: bool
) -> GradientTransformation:
    """``torch.optim.ASGD``'s parameter update: ``p <- p (1 - lambd eta_t) - eta_t g`` with
    ``eta_t = lr / (1 + lambd lr (t-1))^alpha``. The averaged iterate ``ax`` that
    ``torch.optim.ASGD`` also keeps does not enter the parameters and is not computed."""

    def step(p: Tensor, g: Tensor, s: tuple[Tensor, ...], t: Tensor) -> Any:
        g = _prepare(g, p, weight_decay, maximize)
        eta = lr / (1 + lambd * lr * (t - 1)) ** alpha
        return p * (-lambd * eta) - eta * g, s

    return _transform(lambda p: (), step)


def rprop(
    lr: float,
    etas: tuple[float, float],
    step_sizes: tuple[float, float],
    maximize: bool,
) -> GradientTransformation:
    """``torch.optim.Rprop``. Only the gradient's sign enters the update, so the step's
    Jacobian with respect to the parameters is the identity almost everywhere (``higher``
    warns about the same); the step sizes' dependence on earlier steps is differentiated."""
    minus, plus = etas
    low, high = step_sizes

    def step(p: Tensor, g: Tensor, s: tuple[Tensor, ...], t: Tensor) -> Any:
        g = -g if maximize else g
        prev, size = s
        sign = (g * prev).sign()
        factor = torch.where(
            sign > 0,
            torch.full_like(g, plus),
            torch.where(sign < 0, torch.full_like(g, minus), torch.ones_like(g)),
        )
        size = (size * factor).clamp(low, high)
        g = torch.where(factor == minus, torch.zeros_like(g), g)
        return -(g.sign() * size), (g, size)

    return _transform(lambda p: (torch.zeros_like(p), torch.full_like(p, lr)), step)
