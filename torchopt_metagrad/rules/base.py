"""The rule interface, its family bases, and the registry of rules by name.

A rule is a small frozen dataclass of knobs plus ``meta_gradient(record, g)``, which
turns a recorded inner loop (the record protocol,
:class:`~torchopt_metagrad._core.protocol.RecordProtocol`) and the outer gradient ``g``
into a meta-gradient estimate. What a rule needs recorded is one value,
:class:`~torchopt_metagrad._core.needs.Needs`, filled in by its family base:

* :class:`StepProductRule` — estimators of the product ``(I + A_0) ... (I + A_{K-1}) g``
  of step Jacobians (first-order, truncated, binomial, exact); a rule says only from
  which step on it needs snapshots;
* :class:`FixedPointRule` — implicit differentiation of the proximal inner problem's
  solution (iMAML); the base declares the proximal term and the curvature at the final
  state from the ``reg`` knob;
* :class:`FlowRule` — rules on the inner gradient flow (A-MAML);
* :class:`GraphRule` — differentiate through the kept unrolled graph.

So a new rule in a family cannot forget to declare what it needs. Rules never see
modules, optimizers or losses, and never store anything in themselves: diagnostics are
returned in an :class:`~torchopt_metagrad._core.protocol.Estimate`.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

from torch import Tensor

from torchopt_metagrad._core.checks import check_int, check_positive, ensure_finite
from torchopt_metagrad._core.needs import Needs
from torchopt_metagrad._core.protocol import Estimate, RecordProtocol

__all__ = [
    "RESERVED_KNOBS",
    "AbstractRule",
    "Estimate",
    "FixedPointRule",
    "FlowRule",
    "GraphRule",
    "RecordProtocol",
    "StepProductRule",
    "available_rules",
    "check_order",
    "check_rule",
    "ensure_finite",
    "make_rule",
    "register",
    "rule_class",
]

#: Knob names a rule may not use: they are keys of the recipes' method specs
#: (``binomial:order=2,steps=10,label=...``) and of the runner, so a knob with one of
#: these names would be ambiguous on every recipe's command line.
RESERVED_KNOBS = frozenset({"name", "steps", "lr", "label", "flow", "seed", "rule"})


#: Gradient norms below this count as stationary (sqrt of float32 epsilon).
STATIONARY_FLOOR = 2.0**-11.5


@dataclass(frozen=True)
class AbstractRule(abc.ABC):
    """A way to compute the meta-gradient of a differentiable inner loop.

    Subclass one of the family bases (not this class) and register the rule by name
    with :func:`register`.
    """

    name: ClassVar[str] = ""

    @abc.abstractmethod
    def needs(self, steps: int, *, meta: bool = False) -> Needs:
        """What must be recorded for a meta-gradient after ``steps`` inner steps.

        ``meta``: the inner loop has meta-parameters besides the parameters (a learned
        lr, fixed params, closed-over tensors) whose meta-gradients the rule computes.
        """

    def validate(self, steps: int) -> None:  # noqa: B027 - optional hook
        """Raise ``ValueError`` if the knobs do not fit ``steps`` inner steps."""

    @abc.abstractmethod
    def meta_gradient(self, record: RecordProtocol, g: Tensor) -> Tensor | Estimate:
        """The meta-gradient estimate given ``g = dL/dz_K`` (state-sized).

        Returns a state-sized vector (or an :class:`Estimate` holding one) whose first
        ``record.param_dim`` entries are the estimate for the initial parameters.
        """


@dataclass(frozen=True)
class StepProductRule(AbstractRule):
    r"""Estimators of :math:`(I + A_0) \cdots (I + A_{K-1})\, g` from step Jacobians.

    Override :meth:`first_step` when the rule uses only the last steps.
    """

    def first_step(self, steps: int) -> int:
        """First inner step whose Jacobian the rule applies (``steps``: none)."""
        return 0

    def needs(self, steps: int, *, meta: bool = False) -> Needs:
        # Meta-parameters enter every step: sum_k B_k^T v_{k+1} needs every step's state.
        first = 0 if meta else self.first_step(steps)
        return Needs(snapshots_from=first, step_jacobians=first < steps)


@dataclass(frozen=True)
class FixedPointRule(AbstractRule):
    r"""Implicit differentiation of the proximal inner problem's solution (iMAML).

    The front end adds :math:`\frac{r}{2}\|\phi - \theta\|^2` to every inner step
    (``r = reg``); at its minimizer the meta-gradient is
    :math:`(I + H/r)^{-1} g` with :math:`H` the inner loss's Hessian there. Subclasses
    implement the solve; :meth:`operator` gives ``v -> (I + H/r) v`` at the final state.

    Args:
        reg: proximal strength ``r > 0`` (iMAML's lambda).
    """

    reg: float

    def __post_init__(self) -> None:
        check_positive(self.reg, "reg")

    def needs(self, steps: int, *, meta: bool = False) -> Needs:
        return Needs(
            snapshots_from=steps,
            curvature=True,
            proximal=float(self.reg),
            per_step_batches=False,
            step_meta=False,
        )

    def meta_part(self, record: RecordProtocol, x: Tensor) -> Tensor | None:
        r"""The inner loss's meta-parameters' hypergradient given the solve's ``x``:
        :math:`-\frac1r (\partial^2 \ell / \partial w\,\partial\phi)^\top x` at the final
        params (``None`` without meta-parameters)."""
        if not record.meta_dim:
            return None
        return record.mixed(record.num_steps, x) * (-1.0 / float(self.reg))

    def operator(self, record: RecordProtocol) -> Callable[[Tensor], Tensor]:
        """``v -> (I + H/reg) v`` with ``H`` the inner loss's Hessian at the final params.

        A record that knows the whole system (``tmg.custom_root``: the transposed Jacobian
        ``J^T`` of the optimality function, ``J = H + reg I`` for a proximal gradient)
        gives ``v -> J^T v / reg`` itself through ``proximal_system(reg)``.
        """
        K, reg = record.num_steps, float(self.reg)
        system = getattr(record, "proximal_system", None)
        if system is not None:
            return system(reg)
        return lambda v: v + record.hvp(K, v) / reg

    def stationarity(self, record: RecordProtocol) -> float | None:
        """``||grad F(phi)|| / max(||grad F(phi_0)||, STATIONARY_FLOOR)`` for the proximal
        inner objective ``F`` at the final params and at the start (``None``: the record
        cannot tell); the floor (``sqrt`` of float32's epsilon) keeps a warm start at the
        solution from reading as "not converged".

        Costs two inner-loss gradients (records that support it: ``stationarity(reg)``).
        """
        norms = getattr(record, "stationarity", None)
        found = None if norms is None else norms(float(self.reg))
        if found is None:
            return None
        final, start = found
        # floored: an inner loop that starts at (or near) its solution, e.g. a warm start,
        # has a ratio of ~1 between two round-off-sized norms; below STATIONARY_FLOOR a
        # gradient norm counts as stationary
        return final / max(start, STATIONARY_FLOOR)


@dataclass(frozen=True)
class FlowRule(AbstractRule):
    r"""Rules on the inner gradient flow :math:`\dot u = -\nabla \ell(u)` (A-MAML)."""

    def needs(self, steps: int, *, meta: bool = False) -> Needs:
        return Needs(
            snapshots_from=0,
            curvature=True,
            flow=True,
            per_step_batches=False,
            step_meta=False,
            meta_params=self.flow_meta_params,
        )

    #: whether the rule integrates the meta-parameters' adjoint term (override to True)
    flow_meta_params: ClassVar[bool] = False


@dataclass(frozen=True)
class GraphRule(AbstractRule):
    """Rules that differentiate through the kept unrolled graph (no record)."""

    def needs(self, steps: int, *, meta: bool = False) -> Needs:
        return Needs(snapshots_from=steps, graph=True)

    def meta_gradient(self, record: RecordProtocol, g: Tensor) -> Tensor | Estimate:
        raise RuntimeError(
            f"{type(self).__name__} differentiates through the kept graph; it has no "
            "record-based backward"
        )


def check_rule(rule: Any, name: str = "rule") -> None:
    """Raise ``TypeError`` unless ``rule`` is a meta-gradient rule object."""
    if not isinstance(rule, AbstractRule):
        raise TypeError(
            f"{name} must be a meta-gradient rule such as tmg.Exact() or tmg.Binomial(2), "
            f"got {rule!r}"
        )


def check_order(rule: AbstractRule, order: Any, steps: int | None = None) -> None:
    """Raise unless ``order`` is an int >= 0 (and, given ``steps``, ``order <= steps``)."""
    check_int(order, "order", minimum=0)
    if steps is not None and order > steps:
        raise ValueError(
            f"{type(rule).__name__}: order={order} is larger than steps={steps}; use order <= "
            "steps (order == steps is the exact meta-gradient)"
        )


_REGISTRY: dict[str, type[AbstractRule]] = {}
R = TypeVar("R", bound=type[AbstractRule])
_FAMILIES = (StepProductRule, FixedPointRule, FlowRule, GraphRule)


def register(name: str) -> Callable[[R], R]:
    """Class decorator: register a rule class under ``name``.

    Raises:
        ValueError: the name is taken, or a knob uses a reserved name.
        TypeError: the class is not a frozen dataclass of one of the family bases.
    """

    def deco(cls: R) -> R:
        if not isinstance(name, str) or not name.isidentifier():
            raise ValueError(f"a rule name must be an identifier, got {name!r}")
        if name in _REGISTRY:
            raise ValueError(f"a rule named {name!r} is already registered")
        if not issubclass(cls, _FAMILIES):
            raise TypeError(
                f"{cls.__name__} must subclass one of the rule families: "
                + ", ".join(f.__name__ for f in _FAMILIES)
            )
        params = getattr(cls, "__dataclass_params__", None)
        if params is None or not params.frozen:
            raise TypeError(f"{cls.__name__} must be a frozen dataclass")
        clash = sorted(f.name for f in dataclasses.fields(cls) if f.name in RESERVED_KNOBS)
        if clash:
            raise ValueError(
                f"{cls.__name__}: knob name(s) {clash} are reserved for the recipes' method "
                f"specs ({', '.join(sorted(RESERVED_KNOBS))}); rename them"
            )
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
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown rule {name!r}; available: {', '.join(available_rules())}"
        ) from None


def make_rule(name: str, **knobs: Any) -> AbstractRule:
    """Build the rule registered as ``name``: ``make_rule("binomial", order=2)``."""
    return rule_class(name)(**knobs)
