"""The rule interface, the protocol rules consume, and the registry of rules by name.

A rule is a small frozen dataclass of knobs plus ``meta_gradient``, which turns
the step Jacobians of a recorded trajectory and the outer gradient ``g`` into a
meta-gradient estimate. Rules never see modules, optimizers or losses: only
:class:`StepJacobians`.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, TypeVar

import torch
from torch import Tensor

from torchopt_metagrad.errors import NonFiniteError

__all__ = [
    "AbstractRule",
    "StepJacobians",
    "available_rules",
    "check_order",
    "ensure_finite",
    "make_rule",
    "register",
    "rule_class",
]


class StepJacobians(Protocol):
    """The step Jacobians of a K-step trajectory, as linear maps ``v -> A_k v``.

    ``A_k = J_k^T - I`` with ``J_k`` the Jacobian of the k-th step map at its
    snapshot (for gradient descent ``A_k = -lr * H_k``).
    """

    @property
    def num_steps(self) -> int:
        """Number of inner steps K."""
        ...

    def apply(self, k: int, v: Tensor) -> Tensor:
        """``A_k v``."""
        ...

    def apply_many(
        self, start: int, vectors: Tensor, *, chunk_size: int | None = ..., vectorize: bool = ...
    ) -> Tensor:
        """``A_{start+r} vectors[r]`` for every row ``r``, independent products in one call."""
        ...

    @property
    def param_dim(self) -> int:
        """Length of the parameter block at the front of the state."""
        ...

    @property
    def time_step(self) -> float | None:
        """``h`` when snapshot ``k`` samples a gradient flow at ``t = k h``, else ``None``."""
        ...

    def snapshot(self, k: int) -> Tensor:
        """The stored state ``z_k``; ``k = K`` is the final state."""
        ...

    def hvp(self, k: int, v: Tensor) -> Tensor:
        """``H_k v``: Hessian of the plain inner loss at snapshot ``k`` (parameter space)."""
        ...

    def hvp_at(self, params: Tensor, v: Tensor, *, k: int = ...) -> Tensor:
        """``H v`` at arbitrary flat ``params`` (with the batch of step ``k``)."""
        ...

    def vector_field(self, params: Tensor, *, create_graph: bool = ...) -> Tensor:
        """The gradient-flow vector field ``-grad l(params)``."""
        ...


@dataclass(frozen=True)
class AbstractRule(abc.ABC):
    """A way to compute the meta-gradient of a differentiable inner loop.

    Subclasses are frozen dataclasses of knobs, registered by name with
    :func:`register`.
    """

    name: ClassVar[str] = ""
    #: True for the rule that differentiates through the kept unrolled graph instead
    #: of recomputing step Jacobians from snapshots (the front end then keeps the graph).
    differentiates_through_loop: ClassVar[bool] = False
    #: False for rules that never call ``jac.apply``/``apply_many`` (no step Jacobians).
    uses_step_jacobians: ClassVar[bool] = True
    #: True for rules that evaluate the plain inner loss's Hessian at stored states
    #: (``jac.hvp``), which needs the inner loss at points where no step took a gradient.
    uses_hessians: ClassVar[bool] = False
    #: False for rules that differentiate the solution of a single inner objective.
    supports_per_step_batches: ClassVar[bool] = True
    #: True for rules that need only Hessian-vector products along a gradient flow
    #: (usable with :func:`tmg.flow`), not the discrete step Jacobians.
    supports_flow: ClassVar[bool] = False

    @property
    def proximal_reg(self) -> float | None:
        """Strength ``r`` of a proximal term ``r/2 ||phi - theta||^2`` the front end must add."""
        return None

    def validate(self, steps: int) -> None:  # noqa: B027 - optional hook
        """Check the knobs against the number of inner steps; raise ``ValueError`` if unfit."""

    def first_step_needed(self, steps: int) -> int:
        """First inner step whose snapshot the rule uses (``steps``: none)."""
        return 0

    @abc.abstractmethod
    def meta_gradient(self, jac: StepJacobians, g: Tensor) -> Tensor:
        """The meta-gradient estimate given ``g = dL/dz_K``.

        Returns a vector whose first ``jac.param_dim`` entries are the estimate
        (the rest, if any, is the inner-state part and is discarded).
        """


def check_order(order: Any, *, name: str = "order") -> None:
    """Raise ``TypeError``/``ValueError`` unless ``order`` is an int >= 0."""
    if isinstance(order, bool) or not isinstance(order, int):
        raise TypeError(f"{name} must be an int >= 0, got {order!r}")
    if order < 0:
        raise ValueError(f"{name} must be >= 0, got {order}")


def check_order_fits(rule: AbstractRule, order: int, steps: int) -> None:
    """Raise ``ValueError`` if ``order > steps`` (never clipped silently)."""
    if order > steps:
        raise ValueError(
            f"{type(rule).__name__}: order={order} is larger than steps={steps}; use order <= "
            f"steps (order == steps is the exact meta-gradient)"
        )


def ensure_finite(t: Tensor, where: Callable[[], str]) -> None:
    """Raise :class:`NonFiniteError` if ``t`` has a NaN or infinity; ``where()`` names it."""
    if not bool(torch.isfinite(t).all()):
        raise NonFiniteError(f"the meta-gradient became non-finite {where()}")


_REGISTRY: dict[str, type[AbstractRule]] = {}
R = TypeVar("R", bound=type[AbstractRule])


def register(name: str) -> Callable[[R], R]:
    """Class decorator: register a rule class under ``name``."""

    def deco(cls: R) -> R:
        if name in _REGISTRY:
            raise ValueError(f"a rule named {name!r} is already registered")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def available_rules() -> tuple[str, ...]:
    """Names of all registered rules."""
    return tuple(_REGISTRY)


def rule_class(name: str) -> type[AbstractRule]:
    """The rule class registered as ``name``."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"unknown rule {name!r}; available: {', '.join(available_rules())}"
        ) from None


def make_rule(name: str, **knobs: Any) -> AbstractRule:
    """Build the rule registered as ``name``: ``make_rule("binomial", order=2)``."""
    return rule_class(name)(**knobs)
