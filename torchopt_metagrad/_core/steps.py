r"""Inner-loop step maps: the differentiable map :math:`z_{k+1} = S_k(z_k)`.

A step map turns the inner state ``z`` (a flat vector: the parameters, followed by
the optimizer's floating-point state, e.g. a momentum buffer or Adam's moments)
and the gradient of the inner loss at the parameters into the next state. Rules
only ever need the increment :math:`\Delta_k(z) = S_k(z) - z` and its
vector-Jacobian product

.. math:: A_k v = \partial \Delta_k(z_k)^\top v = J_k^\top v - v,

so that the meta-gradient is :math:`(I + A_0) \cdots (I + A_{K-1}) g`. For plain
gradient descent :math:`A_k v = -\alpha H_k v`.

Integer optimizer state (Adam's step count) is not differentiated: it travels
beside ``z`` as ``aux``, a tuple of tensors recorded per step.

A step map may carry a proximal term :math:`\frac{r}{2}\|\phi - \theta\|^2` (declared
by the implicit rule, see :class:`~torchopt_metagrad.ImplicitCG`): it is added to the
inner-loss gradient before the update, with :math:`\theta` the initial parameters
taken as a constant.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping
from typing import Any

import optree
import torch
import torchopt
from torch import Tensor

from torchopt_metagrad._core.checks import (
    check_lr,
    check_lr_dict,
    check_lr_or_schedule,
    check_lr_tensor,
)
from torchopt_metagrad._core.flat import FlatSpec
from torchopt_metagrad._core.torch_optim import SUPPORTED, check_dampening, translate

__all__ = [
    "AbstractStepMap",
    "GradientDescent",
    "OptimizerStep",
    "StepMapFactory",
    "learned_rate",
    "sgd_factory",
    "step_map_factory",
    "torch_optim_factory",
    "transformation_factory",
]

Aux = tuple[Tensor, ...]


class AbstractStepMap(abc.ABC):
    """One inner step as a pure function of ``(z, grad, aux)``.

    Attributes:
        param_dim: length of the parameter block at the front of ``z``.
        dim: length of ``z`` (parameters plus floating-point optimizer state).
    """

    param_dim: int
    dim: int
    proximal: float | None = None
    _anchor: Tensor | None = None

    @property
    def meta(self) -> tuple[Tensor, ...]:
        """The step map's own meta-parameters (a learned lr) that require grad.

        ``delta`` and ``advance`` take them as ``w`` (detached copies in a replay, so the
        rules can differentiate them); ``()`` uses the tensors themselves.
        """
        return ()

    def _with_proximal(self, params: Tensor, grad: Tensor) -> Tensor:
        if self.proximal is None:
            return grad
        assert self._anchor is not None, "init_state sets the proximal anchor"
        return grad + self.proximal * (params - self._anchor)

    def _set_anchor(self, theta: Tensor) -> None:
        if self.proximal is not None:
            self._anchor = theta[: self.param_dim].detach()

    @property
    def time_step(self) -> float | None:
        """``h`` when the iterates sample the gradient flow at ``t_k = k h``, else ``None``."""
        return None

    def state_of(self, z: Tensor, aux: Aux) -> Any:
        """The optimizer state at ``z`` in its native layout (``()`` for plain descent)."""
        return ()

    @abc.abstractmethod
    def init_state(self, theta: Tensor) -> tuple[Tensor, Aux]:
        """Initial ``(z_0, aux_0)`` from the flat initial parameters ``theta``.

        Differentiable in ``theta`` (the unrolled rule differentiates through it).
        """

    @abc.abstractmethod
    def advance(self, z: Tensor, grad: Tensor, aux: Aux) -> tuple[Tensor, Aux]:
        """The next state ``(S(z), aux')`` given the inner-loss gradient ``grad`` at ``z``."""

    @abc.abstractmethod
    def delta(self, z: Tensor, grad: Tensor, aux: Aux, w: tuple[Tensor, ...] = ()) -> Tensor:
        """The increment ``S(z) - z``, computed without cancellation where possible.

        ``w`` stands in for :attr:`meta` when given (a replay's detached copies).
        """


class GradientDescent(AbstractStepMap):
    r"""Plain gradient descent :math:`\phi_{k+1} = \phi_k - \alpha_k \odot \nabla \ell_k(\phi_k)`.

    ``lr`` is a float, or a tensor (it may require grad: a learned learning rate): 0-dim
    (one rate), shape ``(param_dim,)`` (one per parameter entry: Meta-SGD), or, with
    ``per_step``, shape ``(steps,)`` (one per step: MAML++); a per-step map counts its
    steps in ``aux``.
    """

    def __init__(
        self,
        lr: float | Tensor,
        param_dim: int,
        proximal: float | None = None,
        *,
        per_step: bool = False,
    ) -> None:
        self.lr = lr if isinstance(lr, Tensor) else float(lr)
        self.per_step = per_step
        self.param_dim = self.dim = param_dim
        self.proximal = proximal

    @property
    def meta(self) -> tuple[Tensor, ...]:
        lr = self.lr
        return (lr,) if isinstance(lr, Tensor) and lr.requires_grad else ()

    @property
    def time_step(self) -> float | None:
        lr = self.lr
        if self.proximal is not None or self.per_step:
            return None
        if isinstance(lr, Tensor):
            return None if lr.requires_grad or lr.dim() else float(lr)
        return lr

    def init_state(self, theta: Tensor) -> tuple[Tensor, Aux]:
        self._set_anchor(theta)
        count = (torch.zeros((), dtype=torch.long, device=theta.device),)
        return theta, count if self.per_step else ()

    def _rate(self, aux: Aux, w: tuple[Tensor, ...]) -> float | Tensor:
        lr = w[0] if w else self.lr
        if self.per_step:
            return torch.gather(lr, 0, aux[0].reshape(1)).reshape(())  # type: ignore[arg-type]
        return lr

    def delta(self, z: Tensor, grad: Tensor, aux: Aux, w: tuple[Tensor, ...] = ()) -> Tensor:
        return self._with_proximal(z, grad) * (-self._rate(aux, w))

    def advance(self, z: Tensor, grad: Tensor, aux: Aux) -> tuple[Tensor, Aux]:
        if self.per_step:
            k, n = int(aux[0]), self.lr.shape[0]  # type: ignore[union-attr]
            if k >= n:
                raise ValueError(
                    f"lr has {n} per-step entries, but inner step {k} (counting from 0) needs "
                    "one more; give one learning rate per inner step"
                )
            return z + self.delta(z, grad, aux), (aux[0] + 1,)
        # Same floating-point operations as torchopt.sgd + apply_updates: p + g * (-lr).
        return z + self.delta(z, grad, aux), aux


class OptimizerStep(AbstractStepMap):
    """A torchopt functional optimizer (``GradientTransformation``) as a step map.

    ``z`` holds the parameters and every floating-point leaf of the optimizer state;
    the other leaves (step counts) are ``aux``. The update is computed with
    ``inplace=False``, so it is differentiable and safe under ``torch.func``.
    """

    def __init__(self, optimizer: Any, spec: FlatSpec, proximal: float | None = None) -> None:
        self.optimizer = optimizer
        self.proximal = proximal
        self.spec = spec
        self.param_dim = spec.numel
        probe = {
            n: torch.zeros(s, dtype=spec.dtype, device=spec.device)
            for n, s in zip(spec.names, spec.shapes, strict=True)
        }
        leaves, self._treedef = optree.tree_flatten(optimizer.init(probe))
        self._is_float = tuple(isinstance(t, Tensor) and t.is_floating_point() for t in leaves)
        if not all(isinstance(t, Tensor) for t in leaves):
            raise TypeError("optimizer: its state must be a pytree of tensors")
        self._state_shapes = tuple(
            t.shape for t, f in zip(leaves, self._is_float, strict=True) if f
        )
        self._state_sizes = tuple(s.numel() for s in self._state_shapes)
        self.dim = self.param_dim + sum(self._state_sizes)

    def _unpack(self, z: Tensor, aux: Aux) -> tuple[dict[str, Tensor], Any]:
        params = self.spec.unflatten(z[: self.param_dim])
        floats = iter(
            t.view(s)
            for t, s in zip(
                z[self.param_dim :].split(self._state_sizes), self._state_shapes, strict=True
            )
        )
        ints = iter(aux)
        leaves = [next(floats) if f else next(ints) for f in self._is_float]
        return params, optree.tree_unflatten(self._treedef, leaves)

    def state_of(self, z: Tensor, aux: Aux) -> Any:
        _, state = self._unpack(z.detach(), aux)
        return optree.tree_map(lambda t: t.clone() if isinstance(t, Tensor) else t, state)

    def _split_state(self, state: Any) -> tuple[list[Tensor], Aux]:
        leaves = optree.tree_leaves(state)
        floats = [t.reshape(-1) for t, f in zip(leaves, self._is_float, strict=True) if f]
        ints = tuple(t for t, f in zip(leaves, self._is_float, strict=True) if not f)
        return floats, ints

    def init_state(self, theta: Tensor) -> tuple[Tensor, Aux]:
        self._set_anchor(theta)
        state = self.optimizer.init(self.spec.unflatten(theta.detach()))
        floats, ints = self._split_state(state)
        floats = [t.detach() for t in floats]
        return torch.cat([theta, *floats]), ints

    def _update(self, z: Tensor, grad: Tensor, aux: Aux) -> tuple[Tensor, list[Tensor], Aux]:
        params, state = self._unpack(z, aux)
        grads = self.spec.unflatten(self._with_proximal(z[: self.param_dim], grad))
        updates, new_state = self.optimizer.update(grads, state, params=params, inplace=False)
        flat_updates = self.spec.flatten([updates[n] for n in self.spec.names])
        floats, ints = self._split_state(new_state)
        return flat_updates, floats, ints

    def advance(self, z: Tensor, grad: Tensor, aux: Aux) -> tuple[Tensor, Aux]:
        updates, floats, ints = self._update(z, grad, aux)
        return torch.cat([z[: self.param_dim] + updates, *floats]), ints

    def delta(self, z: Tensor, grad: Tensor, aux: Aux, w: tuple[Tensor, ...] = ()) -> Tensor:
        updates, floats, _ = self._update(z, grad, aux)
        if not floats:
            return updates
        return torch.cat([updates, torch.cat(floats) - z[self.param_dim :]])


#: ``(spec, proximal) -> step map`` for a set of parameters known only when a loop starts.
StepMapFactory = Callable[[FlatSpec, "float | None"], AbstractStepMap]


def _is_transformation(obj: Any) -> bool:
    return callable(getattr(obj, "init", None)) and callable(getattr(obj, "update", None))


def _plain(lr: Any, steps: int | None = None) -> StepMapFactory:
    if not isinstance(lr, (Tensor, Mapping)):
        rate = float(lr)
        return lambda spec, proximal: GradientDescent(rate, spec.numel, proximal)

    def make(spec: FlatSpec, proximal: float | None) -> AbstractStepMap:
        rate, per_step = learned_rate(lr, spec, steps)
        return GradientDescent(rate, spec.numel, proximal, per_step=per_step)

    return make


def learned_rate(lr: Any, spec: FlatSpec, steps: int | None) -> tuple[Tensor, bool]:
    """A tensor ``lr`` (or a dict of them) as ``(rate, per_step)`` for :class:`GradientDescent`.

    A dict ``{name: tensor}`` (one rate per parameter entry, each tensor shaped like its
    parameter or 0-dim) becomes one flat vector, built here with grad enabled so the
    meta-gradient reaches the dict's tensors.
    """
    if isinstance(lr, Mapping):
        check_lr_dict(lr, spec.names, spec.shapes)
        with torch.enable_grad():
            flat = torch.cat(
                [
                    lr[n].to(spec.dtype).expand(s).reshape(-1)
                    for n, s in zip(spec.names, spec.shapes, strict=True)
                ]
            )
        rate, per_step = flat, False
    else:
        check_lr_tensor(lr, steps)
        rate, per_step = lr, lr.dim() == 1
    if rate.device != spec.device:
        raise ValueError(f"lr is on {rate.device} but the parameters are on {spec.device}")
    return rate, per_step


def _transformation(impl: Any) -> StepMapFactory:
    return lambda spec, proximal: OptimizerStep(impl, spec, proximal)


def step_map_factory(
    lr: Any = None,
    optimizer: Any = None,
    *,
    steps: int | None = None,
    names: Mapping[int, str] | None = None,
) -> tuple[StepMapFactory, Any, list[Tensor] | None]:
    """The one place that turns an inner optimizer into a step map.

    Accepts a plain learning rate (``lr``: gradient descent; a float, or a tensor or dict
    of tensors, see :func:`learned_rate`: a learned rate, differentiated by the rules;
    ``steps`` checks a per-step rate's length), a torchopt functional
    optimizer (``GradientTransformation``: its float state joins the differentiated
    state), or a ``torch.optim`` optimizer (translated by
    :func:`~torchopt_metagrad._core.torch_optim.translate`; plain SGD becomes gradient
    descent, so the flow rules apply; ``names``, ``id(tensor) -> name``, places param
    groups with different settings).

    Returns:
        ``(factory, torchopt_impl, tensors)``: the step-map factory, the equivalent
        torchopt optimizer (``None`` for a tensor lr), and the tensors a ``torch.optim``
        optimizer holds (``None`` otherwise).

    Raises:
        TypeError, ValueError: naming ``lr`` or ``optimizer``.
    """
    if optimizer is not None and lr is not None:
        raise ValueError(
            "give lr (plain gradient descent) or optimizer (which carries its own learning "
            "rate), not both"
        )
    if optimizer is None:
        if lr is None:
            raise TypeError("lr is required (the inner step size) unless optimizer is given")
        if isinstance(lr, (Tensor, Mapping)):
            return _plain(lr, steps), None, None
        rate = check_lr(lr)
        return _plain(rate), torchopt.sgd(rate), None
    if _is_transformation(optimizer):
        return _transformation(optimizer), optimizer, None
    if isinstance(optimizer, torch.optim.Optimizer):
        return torch_optim_factory(optimizer, names)
    raise TypeError(
        "optimizer must be a torchopt functional optimizer (GradientTransformation with "
        "init/update, e.g. torchopt.sgd(0.1, momentum=0.9)) or a torch.optim optimizer; "
        f"got {type(optimizer).__name__}"
    )


def torch_optim_factory(
    opt: torch.optim.Optimizer,
    names: Mapping[int, str] | None = None,
    override: Mapping[str, Any] | None = None,
) -> tuple[StepMapFactory, Any, list[Tensor]]:
    t = translate(opt, names, override)
    for group in opt.param_groups:
        if not isinstance(group["lr"], Tensor):
            check_lr(group["lr"], "optimizer's lr")
    if isinstance(t.lr, float):  # plain gradient descent: every rule applies (flows included)
        return _plain(t.lr), t.impl, t.params
    if t.lr is not None:  # plain SGD, a rate per group (or a learned one): per parameter
        return _plain(t.lr), None, t.params
    return _transformation(t.impl), t.impl, t.params


def sgd_factory(
    lr: Any,
    *,
    momentum: float,
    weight_decay: float,
    dampening: float,
    nesterov: bool,
    maximize: bool,
) -> tuple[StepMapFactory, Any]:
    """``torchopt.MetaSGD``'s arguments as a step map: plain descent when it is one.

    A tensor (or dict of tensors) ``lr`` is a learned rate: plain descent only.
    """
    if isinstance(lr, (Tensor, Mapping)):
        extras = dict(momentum=momentum, weight_decay=weight_decay, dampening=dampening)
        used = [k for k, v in extras.items() if v] + [
            k for k, v in (("nesterov", nesterov), ("maximize", maximize)) if v
        ]
        if used:
            raise ValueError(
                f"a tensor lr (a learned learning rate) works with plain gradient descent only; "
                f"drop {', '.join(used)} or give a float lr"
            )
        return _plain(lr), None
    check_dampening(momentum, dampening, lr)
    rate = check_lr_or_schedule(lr)
    plain = not callable(lr) and momentum == 0 and weight_decay == 0 and not maximize
    if plain and not nesterov:
        return _plain(rate), torchopt.sgd(rate)
    group = dict(
        lr=rate,
        momentum=momentum,
        dampening=dampening,
        weight_decay=weight_decay,
        nesterov=nesterov,
        maximize=maximize,
    )
    impl = SUPPORTED[torch.optim.SGD](group)
    return _transformation(impl), impl


def transformation_factory(impl: Any, name: str = "impl") -> StepMapFactory:
    """A torchopt functional optimizer as a step-map factory (checked)."""
    if not _is_transformation(impl):
        raise TypeError(
            f"{name} must be a torchopt functional optimizer (GradientTransformation with "
            f"init/update), e.g. torchopt.sgd(0.1, momentum=0.9); got {impl!r}"
        )
    return _transformation(impl)
