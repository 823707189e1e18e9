"""The adjoint of the inner gradient flow (A-MAML); the schemes are in ``adjoint_schemes``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from torchopt_metagrad._core.ode import ODE
from torchopt_metagrad.rules import adjoint_schemes as schemes
from torchopt_metagrad.rules.adjoint_schemes import MAX_SUBSTEPS, SAFE_STEP, AdjointInfo
from torchopt_metagrad.rules.base import Estimate, FlowRule, RecordProtocol, register

__all__ = ["MAX_SUBSTEPS", "SAFE_STEP", "Adjoint", "AdjointInfo"]


@register("adjoint")
@dataclass(frozen=True)
class Adjoint(FlowRule):
    r"""Adjoint method for the inner gradient flow (A-MAML).

    The inner loop is the gradient flow :math:`\dot u = -\nabla \ell(u)`,
    :math:`u(0) = \theta`, on :math:`[0, T]`, stored as ``u_k = u(k h)``; the
    meta-gradient is :math:`\lambda(0)` of the adjoint ODE

    .. math:: \dot\lambda = H(u(t))\,\lambda, \qquad \lambda(T) = g,

    solved backward in time (:math:`\lambda(0) = e^{-TA} g` when
    :math:`\ell = \tfrac12 (u-a)^\top A (u-a)`). ``solver`` chooses how:

    * ``"heun"`` (the paper's modified Euler) over the stored states:
      :math:`\tilde\lambda = \lambda_{k+1} - h H_{k+1}\lambda_{k+1}`,
      :math:`\lambda_k = \lambda_{k+1} - \tfrac h2 (H_{k+1}\lambda_{k+1} + H_k\tilde\lambda)`;
      2 HVPs per interval, error O(h^2). It is stable only for :math:`h\|H\| \le 2`,
      so the stiffness :math:`\rho \approx \|H\|` is estimated up front (power
      iteration at the last and first states, at most 8 HVPs each, and one HVP every 8
      states in between, carrying the vector along) and by :math:`\|H v\|/\|v\|` of
      the HVPs taken anyway; an interval with :math:`h\rho > 1` is split into
      :math:`\lceil h\rho\rceil` substeps over linearly interpolated states (redone
      finer if its own HVPs show more stiffness; at most 256, else ``ODESolveError``):
      never a finite blow-up;
    * a :class:`~torchopt_metagrad.ODE` (or a torchdiffeq method name): checkpointed
      adjoint. On each interval, torchdiffeq integrates :math:`(u, \lambda)` backward
      from :math:`(u_{k+1}, \lambda_{k+1})` with :math:`\dot u = -\nabla\ell(u)`,
      :math:`\dot\lambda = H(u)\lambda`, and ``u`` restarts from the stored ``u_k``:
      accurate to the solver's tolerance, no interpolation error. A fixed-step method
      without ``step_size`` steps on the stored grid, with substeps where the stiffness
      estimate puts :math:`h\rho` past half its stability interval; a ``step_size``
      past the stability interval raises. States that are not flow samples (gradient
      descent near :math:`\mathrm{lr}\|H\| = 2`, where running the flow backward
      amplifies the iterates' oscillation) raise ``ODESolveError``: use ``"heun"``;
    * ``None`` (default): the ``ODE`` that solved the forward flow (``tmg.flow``), so
      the backward is as accurate as the forward; ``"heun"`` for gradient-descent
      iterates.

    ``reintegrate=True`` uses torchdiffeq's ``odeint_adjoint`` instead: ``u`` is
    re-integrated from ``u(0)`` and then backward from ``u(T)`` over the whole horizon
    (no stored state beyond ``u(0)``; unstable when :math:`T\|H\|` is large, since the
    backward flow amplifies the stiff directions by :math:`e^{T\rho}`).

    With ``tmg.adapt`` and plain gradient descent of step ``lr``, the iterates are
    taken as samples of the flow at :math:`t_k = k\,\mathrm{lr}` (the answer
    approaches ``Exact`` as ``lr`` shrinks).

    Meta-parameters :math:`w` (fixed entries of ``params`` with ``adapt=[...]``, leaves
    ``loss_fn`` closes over such as a weight-decay coefficient or a network body): the
    flow :math:`\dot u = -\nabla_u \ell(u; w)` depends on them, and

    .. math:: \frac{dL}{dw} = -\int_0^T \partial_w \langle \nabla_u \ell(u(t); w),
              \lambda(t)\rangle\,dt

    (what ``odeint_adjoint(..., adjoint_params=w)`` computes; the outer loss's direct use
    of :math:`w` is added by autograd). ``"heun"`` applies its own step to it on the same
    substeps: the trapezoid rule with :math:`\lambda` at each substep's upper node and
    the predictor :math:`\tilde\lambda` at the lower one (O(h^2); one mixed product per
    node, by linearity in :math:`\lambda`). Unlike the trapezoid rule with the corrected
    :math:`\lambda` at both nodes (off by about :math:`(h\rho)^2/3` in stiff directions,
    whose contribution to the integral is not damped: 6% on a test with
    :math:`h\rho = 0.8`), it keeps the linear invariant of a locally linear problem, so
    stiff directions come out right. An ODE scheme carries
    :math:`a' = \partial_w\langle\nabla\ell, \lambda\rangle`, :math:`a(T) = 0`, in
    the backward state (:math:`a(0) = dL/dw`), under the solver's error control with a
    norm of its own; ``reintegrate=True`` then runs ``odeint`` forward and the augmented
    state backward over :math:`[0, T]` itself (the record gives the mixed term as a
    product, not as a field to pass to ``odeint_adjoint``). A learned ``lr`` is refused:
    the flow does not depend on it.

    Bias: exact for the flow up to the scheme's error (O(h^2) for ``"heun"``, the
    tolerance for an ODE); differs from the gradient of discrete gradient descent by
    O(lr). Cost: ``"heun"``: 2 HVPs per substep (2 per interval on smooth problems)
    plus the stiffness estimate, about 10 + K/8 HVPs; ODE: one gradient and one HVP
    per evaluation (dopri5: 6 per step, >= 8 per interval), plus the stiffness estimate
    for fixed-step methods. Memory O(d) plus the stored states, no graph per step.
    Meta-parameters add one mixed product (a gradient with its graph and a backward,
    about an HVP) per Heun substep node, or per ODE evaluation (about twice the
    backward's cost), and O(dim w) memory; ``AdjointInfo.meta_evaluations`` counts them.

    Reference: Li et al., "Meta-Learning with Adjoint Methods", AISTATS 2023.

    Args:
        solver: ``"heun"``, an ``ODE``, a torchdiffeq method name (``ODE(name)``), or
            ``None`` (the forward's ``ODE``, else ``"heun"``).
        reintegrate: re-integrate with ``odeint_adjoint`` (needs an ODE solver; with
            meta-parameters the rule runs the same two solves itself).

    Raises:
        ODESolveError: the backward solve failed or ran out of steps (says where).
        NonFiniteError: the adjoint state became non-finite (says at which time).
    """

    solver: ODE | str | None = None
    reintegrate: bool = False

    flow_meta_params: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if isinstance(self.solver, str) and self.solver != "heun":
            try:
                object.__setattr__(self, "solver", ODE(self.solver))
            except ValueError as err:
                raise ValueError(f"solver must be 'heun', a tmg.ODE or {err}") from None
        elif self.solver is not None and not isinstance(self.solver, (str, ODE)):
            raise TypeError(f"solver must be 'heun', a tmg.ODE or None, got {self.solver!r}")
        if not isinstance(self.reintegrate, bool):
            raise TypeError(f"reintegrate must be a bool, got {self.reintegrate!r}")
        if self.reintegrate and self.solver == "heun":
            raise ValueError("reintegrate=True needs an ODE solver (solver=tmg.ODE(...)), not heun")

    def resolve(self, record: RecordProtocol) -> ODE | str:
        """The scheme used for ``record``: ``solver``, else the forward's ``ODE``, else heun."""
        if self.solver is not None:
            return self.solver
        forward = getattr(record, "solver", None)
        return forward if isinstance(forward, ODE) else "heun"

    def meta_gradient(self, record: RecordProtocol, g: Tensor) -> Estimate:
        lam, meta, info = self.solve(record, g)
        return Estimate(lam, info, meta)

    def meta_gradient_with_info(
        self, record: RecordProtocol, g: Tensor
    ) -> tuple[Tensor, AdjointInfo]:
        """:math:`\\lambda(0)` (parameter block) and how it was computed."""
        lam, _, info = self.solve(record, g)
        return lam, info

    def solve(self, record: RecordProtocol, g: Tensor) -> tuple[Tensor, Tensor | None, AdjointInfo]:
        """:math:`\\lambda(0)` (parameter block), the meta-parameters' part (``None``
        without meta-parameters) and how they were computed."""
        h = record.time_step
        if h is None:
            raise ValueError(
                "Adjoint needs samples of a gradient flow: tmg.adapt with plain gradient descent "
                "(lr=..., no optimizer) or tmg.flow"
            )
        lam = g[: record.param_dim]
        scheme = self.resolve(record)
        if self.reintegrate:
            if not isinstance(scheme, ODE):
                raise ValueError(
                    "Adjoint(reintegrate=True) needs an ODE solver: these states come from "
                    "gradient descent, not tmg.flow; pass solver=tmg.ODE(...)"
                )
            return schemes.reintegrate(record, lam, h, scheme)
        if isinstance(scheme, ODE):
            return schemes.checkpointed(record, lam, h, scheme)
        return schemes.heun(record, lam, h)
