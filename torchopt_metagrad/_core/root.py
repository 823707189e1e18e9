r"""The record of a user's root solver (``tmg.custom_root``), for the one autograd node.

The solver returns :math:`x^\star` with :math:`F(x^\star, w) = 0` (``F`` the user's
optimality function, ``w`` the tensors of the ``argnums`` arguments). By the implicit
function theorem, with :math:`J = \partial F / \partial x` at the solution,

.. math:: \frac{dL}{dw} = -\Big(\frac{\partial F}{\partial w}\Big)^\top J^{-\top} g.

A fixed-point rule solves :math:`(J^\top / r)\, y = g` (``r`` the rule's ``reg``; for
iMAML's :math:`F = \nabla \ell + r (x - \theta)` this is :math:`(I + H/r) y = g`) and
returns :math:`-\frac1r (\partial F/\partial w)^\top y`, the same vector. Both products
are ``torch.func.vjp`` of ``F`` (as torchopt's ``custom_root`` does), so torchopt's solve
functions that transpose the product (normal CG) work on it too.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from torchopt_metagrad._core.engine import Meta
from torchopt_metagrad._core.flat import FlatSpec

__all__ = ["RootRecord"]

#: ``F(x_parts, w_parts) -> residual parts`` (shaped like the solution's parts)
Optimality = Callable[[Sequence[Tensor], Sequence[Tensor]], Sequence[Tensor]]


@dataclass(eq=False)
class RootRecord:
    """A solution of ``F(x, w) = 0`` and how to differentiate ``F`` there.

    Attributes:
        spec: layout of the solution's tensors (flat ``x``).
        solution: ``x*`` (flat, detached).
        optimality: ``F`` with every argument but ``x`` and ``w`` fixed.
        meta: the ``argnums`` tensors ``w`` (their meta-gradients are the result).
        reg: the rule's scale ``r``.
        norms: ``(||F(x*)||, ||F(x0)||)`` from the forward (``x0``: the solver's first
            argument), or ``None``.
        symmetric: check once that ``J`` is symmetric (a plugin Krylov rule assumes it).
    """

    spec: FlatSpec
    solution: Tensor
    optimality: Optimality
    meta: Meta
    reg: float
    norms: tuple[float, float] | None = None
    symmetric: bool = False
    products: int = 0
    steps: int = 0
    step_map: Any = None
    time_step: float | None = None
    solver: Any = None
    released: str | None = None
    _vjps: dict[str, Any] = field(default_factory=dict, repr=False)

    # -- what the one autograd node uses --------------------------------------------------
    def take_tensors(self) -> list[Tensor]:
        """The solution (saved for backward); drops the products' graphs of a backward."""
        self._vjps.clear()
        taken, self.solution = self.solution, torch.empty(0)
        return [taken]

    def put_tensors(self, tensors: tuple[Tensor, ...]) -> None:
        (self.solution,) = tensors

    def outputs(self) -> tuple[Tensor, ...]:
        return tuple(t.clone() for t in self.spec.split(self.solution))

    def outer_vector(self, grad_outputs: Any) -> Tensor:
        spec = self.spec
        return spec.flatten(
            [
                torch.zeros(s, dtype=spec.dtype, device=spec.device) if go is None else go
                for go, s in zip(grad_outputs, spec.shapes, strict=True)
            ]
        )

    def theta_grads(self, grad: Tensor) -> list[Tensor]:
        return []  # every differentiated input is a meta-parameter (argnums)

    def blocked(self) -> bool:
        return False

    # -- the record protocol, as far as fixed-point rules use it ---------------------------
    @property
    def num_steps(self) -> int:
        return 0

    @property
    def param_dim(self) -> int:
        return self.spec.numel

    @property
    def state_dim(self) -> int:
        return self.spec.numel

    @property
    def meta_dim(self) -> int:
        return sum(t.numel() for t in self.meta.tensors)

    def _vjp(self, which: str) -> Any:
        if which not in self._vjps:
            x = tuple(self.spec.split(self.solution))
            w = tuple(t.detach() for t in self.meta.tensors)
            if which == "x":
                fn = torch.func.vjp(lambda *xs: tuple(self.optimality(xs, w)), *x)[1]
            else:
                fn = torch.func.vjp(lambda *ws: tuple(self.optimality(x, ws)), *w)[1]
            self._vjps[which] = fn
        return self._vjps[which]

    def _jt(self, v: Tensor) -> Tensor:
        """``J^T v``."""
        self.products += 1
        parts = self._vjp("x")(tuple(self.spec.split(v)))
        return torch.cat([p.reshape(-1) for p in parts])

    def proximal_system(self, reg: float) -> Callable[[Tensor], Tensor]:
        """``v -> J^T v / reg`` (checked once for symmetry when ``symmetric``)."""
        self._vjp("x")  # now, not lazily inside a solve's own torch.func transform
        if self.symmetric:
            self._check_symmetric()
        return lambda v: self._jt(v) / reg

    def hvp(self, k: int, v: Tensor) -> Tensor:
        """``J^T v - reg v``: the inner Hessian when ``F`` is a proximal gradient."""
        return self._jt(v) - self.reg * v

    def mixed(self, k: int, v: Tensor) -> Tensor:
        """``(dF/dw)^T v``."""
        self.products += 1
        parts = self._vjp("w")(tuple(self.spec.split(v)))
        return torch.cat([p.reshape(-1) for p in parts])

    def stationarity(self, reg: float) -> tuple[float, float] | None:
        return self.norms

    def _check_symmetric(self) -> None:
        self.symmetric = False  # once
        gen = torch.Generator(device=self.solution.device).manual_seed(0)
        u, v = (
            torch.randn(self.param_dim, generator=gen, dtype=self.spec.dtype,
                        device=self.solution.device)
            for _ in range(2)
        )  # fmt: skip
        uJv, vJu = float(u.dot(self._jt(v))), float(v.dot(self._jt(u)))
        tol = 1e-8 if self.spec.dtype == torch.float64 else 1e-3
        if abs(uJv - vJu) > tol * max(abs(uJv), abs(vJu), 1e-30):
            raise ValueError(
                "solve: a tmg rule (ImplicitCG, ImplicitNeumann) needs a symmetric Jacobian "
                f"dF/dx of optimality_fn (F the gradient of an objective, as in iMAML), but "
                f"u^T J v = {uJv:.6g} != v^T J u = {vJu:.6g}; pass a torchopt solve such as "
                "torchopt.linear_solve.solve_normal_cg() instead"
            )
