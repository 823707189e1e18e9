"""The record protocol: everything a rule may ask of a recorded inner loop.

Rules see only this protocol (never modules, optimizers or losses). The inner loop of
every front end produces a :class:`~torchopt_metagrad._core.record.Record` that
implements it; the one autograd node hands it to the rule in its backward.

Notation: the inner state ``z_k`` is the flat parameter vector, followed by the
optimizer's floating-point state if any; ``A_k = J_k^T - I`` with ``J_k`` the Jacobian
of the k-th step map at ``z_k`` (for gradient descent ``A_k = -lr H_k``).

Meta-parameters ``w`` (every tensor besides the parameters that the steps depend on and
that requires grad: a learned lr, fixed params, closed-over tensors) are one flat vector
of ``meta_dim`` entries; ``B_k = dS_k/dw`` at ``z_k``. With the adjoints
``v_{k+1} = dL/dz_{k+1}``, ``dL/dw = sum_k B_k^T v_{k+1}`` (plus the outer loss's direct
use of ``w``, which autograd adds outside). A rule returns its estimate of that sum in
``Estimate.meta`` whenever ``meta_dim > 0``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from torch import Tensor

__all__ = ["Estimate", "RecordProtocol"]


class RecordProtocol(Protocol):
    """A recorded inner loop of ``num_steps`` steps, as rules consume it."""

    @property
    def num_steps(self) -> int:
        """Number of inner steps K (grid intervals for a flow; 0 for a user's solver)."""
        ...

    @property
    def param_dim(self) -> int:
        """Length of the parameter block at the front of the state."""
        ...

    @property
    def state_dim(self) -> int:
        """Length of the whole state (parameters plus optimizer state)."""
        ...

    @property
    def time_step(self) -> float | None:
        """``h`` when state ``k`` samples a gradient flow at ``t = k h``, else ``None``."""
        ...

    @property
    def solver(self) -> Any:
        """The ``tmg.ODE`` that solved the forward flow (``tmg.flow``), else ``None``."""
        ...

    def snapshot(self, k: int) -> Tensor:
        """The stored state ``z_k``; ``k = K`` is the final state."""
        ...

    def apply(self, k: int, v: Tensor) -> Tensor:
        """``A_k v`` (one product)."""
        ...

    def apply_many(
        self, start: int, vectors: Tensor, *, chunk_size: int | None = ..., vectorize: bool = ...
    ) -> Tensor:
        """``A_{start+r} vectors[r]`` for every row ``r``: independent products, one call."""
        ...

    @property
    def meta_dim(self) -> int:
        """Length of the flat meta-parameter vector (0: there are none)."""
        ...

    def pullback(
        self, k: int, v: Tensor, *, want_state: bool = ...
    ) -> tuple[Tensor | None, Tensor]:
        """``(A_k v, B_k^T v)`` in one VJP (``A_k v`` is ``None`` unless ``want_state``)."""
        ...

    def meta_pullback_many(
        self, start: int, vectors: Tensor, *, chunk_size: int | None = ..., vectorize: bool = ...
    ) -> Tensor:
        """``sum_r B_{start+r}^T vectors[r]`` (batched like :meth:`apply_many`)."""
        ...

    def mixed(self, k: int, v: Tensor) -> Tensor:
        """``d/dw <grad_phi l(phi_k; w), v>``: the plain inner loss's mixed second derivative
        at state ``k`` (``k = K``: the final params), the parameter block of ``v``."""
        ...

    def mixed_at(self, params: Tensor, v: Tensor, *, k: int = ...) -> Tensor:
        """:meth:`mixed` at arbitrary flat ``params``, with the inner loss of step ``k``."""
        ...

    def hvp(self, k: int, v: Tensor) -> Tensor:
        """``H_k v``: Hessian of the plain inner loss (no proximal term) at the params of
        state ``k`` (``k = K``: the final params, with the last step's batch)."""
        ...

    def hvp_at(self, params: Tensor, v: Tensor, *, k: int = ...) -> Tensor:
        """``H v`` at arbitrary flat ``params``, with the inner loss of step ``k``."""
        ...

    def stationarity(self, reg: float) -> tuple[float, float] | None:
        """``(||grad F(phi_K)||, ||grad F(phi_0)||)`` for the proximal inner objective
        ``F = l + reg/2 ||phi - theta||^2``; ``None`` when it cannot be recomputed."""
        ...

    def vector_field(self, params: Tensor, *, create_graph: bool = ...) -> Tensor:
        """The gradient-flow vector field ``-grad l(params)`` (one inner objective)."""
        ...


@dataclass(frozen=True)
class Estimate:
    """A meta-gradient with the meta-parameters' part and the rule's diagnostics.

    A rule's ``meta_gradient`` returns either a tensor (no meta-parameters) or an
    ``Estimate``; ``info`` (CG iterations, residual, ...) reaches the user through
    :func:`torchopt_metagrad.diagnostics.collect`.

    Attributes:
        value: the state-sized estimate (parameter block first).
        info: the rule's diagnostics, or ``None``.
        meta: the estimate of ``sum_k B_k^T v_{k+1}`` (``record.meta_dim`` entries);
            required when the record has meta-parameters.
    """

    value: Tensor
    info: Any = None
    meta: Tensor | None = None
