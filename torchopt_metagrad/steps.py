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
from typing import Any

import optree
import torch
from torch import Tensor

from torchopt_metagrad._flat import FlatSpec

__all__ = ["AbstractStepMap", "GradientDescent", "OptimizerStep"]

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

    def _with_proximal(self, params: Tensor, grad: Tensor) -> Tensor:
        if self.proximal is None:
            return grad
        assert self._anchor is not None, "init_state sets the proximal anchor"
        return grad + self.proximal * (params - self._anchor)

    def _set_anchor(self, theta: Tensor) -> None:
        if self.proximal is not None:
            self._anchor = theta[: self.param_dim].detach()

    @abc.abstractmethod
    def init_state(self, theta: Tensor) -> tuple[Tensor, Aux]:
        """Initial ``(z_0, aux_0)`` from the flat initial parameters ``theta``.

        Differentiable in ``theta`` (the unrolled rule differentiates through it).
        """

    @abc.abstractmethod
    def advance(self, z: Tensor, grad: Tensor, aux: Aux) -> tuple[Tensor, Aux]:
        """The next state ``(S(z), aux')`` given the inner-loss gradient ``grad`` at ``z``."""

    @abc.abstractmethod
    def delta(self, z: Tensor, grad: Tensor, aux: Aux) -> Tensor:
        """The increment ``S(z) - z``, computed without cancellation where possible."""


class GradientDescent(AbstractStepMap):
    r"""Plain gradient descent :math:`\phi_{k+1} = \phi_k - \alpha \nabla \ell_k(\phi_k)`."""

    def __init__(self, lr: float, param_dim: int, proximal: float | None = None) -> None:
        self.lr = float(lr)
        self.param_dim = self.dim = param_dim
        self.proximal = proximal

    def init_state(self, theta: Tensor) -> tuple[Tensor, Aux]:
        self._set_anchor(theta)
        return theta, ()

    def delta(self, z: Tensor, grad: Tensor, aux: Aux) -> Tensor:
        return self._with_proximal(z, grad) * (-self.lr)

    def advance(self, z: Tensor, grad: Tensor, aux: Aux) -> tuple[Tensor, Aux]:
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

    def delta(self, z: Tensor, grad: Tensor, aux: Aux) -> Tensor:
        updates, floats, _ = self._update(z, grad, aux)
        if not floats:
            return updates
        return torch.cat([updates, torch.cat(floats) - z[self.param_dim :]])
