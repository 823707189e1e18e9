"""The record protocol: everything a rule may ask of a recorded inner loop.

Rules see only this protocol (never modules, optimizers or losses). The inner loop of
every front end produces a :class:`~torchopt_metagrad._core.record.Record` that
implements it; the one autograd node hands it to the rule in its backward.

Notation: the inner state ``z_k`` is the flat parameter vector, followed by the
optimizer's floating-point state if any; ``A_k = J_k^T - I`` with ``J_k`` the Jacobian
of the k-th step map at ``z_k`` (for gradient descent ``A_k = -lr H_k``).
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

    def hvp(self, k: int, v: Tensor) -> Tensor:
        """``H_k v``: Hessian of the plain inner loss (no proximal term) at the params of
        state ``k`` (``k = K``: the final params, with the last step's batch)."""
        ...

    def hvp_at(self, params: Tensor, v: Tensor, *, k: int = ...) -> Tensor:
        """``H v`` at arbitrary flat ``params``, with the inner loss of step ``k``."""
        ...

    def vector_field(self, params: Tensor, *, create_graph: bool = ...) -> Tensor:
        """The gradient-flow vector field ``-grad l(params)`` (one inner objective)."""
        ...


@dataclass(frozen=True)
class Estimate:
    """A meta-gradient with the rule's diagnostics (CG iterations, residual, ...).

    A rule's ``meta_gradient`` returns either a tensor or an ``Estimate``; ``info``
    reaches the user through :func:`torchopt_metagrad.diagnostics.collect`.
    """

    value: Tensor
    info: Any
