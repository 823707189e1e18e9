"""The one table of meta-gradient rules under test, read by ``tests/test_contract.py``.

Each row is one rule object plus what the contract tests need to know about it:

* ``family``: the rule family (``"step_product"``, ``"fixed_point"``, ``"flow"``,
  ``"graph"``); checked against the rule's base class.
* ``oracle``: how its meta-gradient is checked in float64:

  - ``"step_product"``: the sum of the products ``A_{k_1} ... A_{k_l} g`` selected by
    ``terms`` (brute force from explicit Hessians, ``tests/oracles.py``) on a tiny MLP
    with a different batch at every step. ``StepTerms()`` is the whole product
    ``(I + A_0) ... (I + A_{K-1}) g``, i.e. autograd through the unrolled loop;
  - ``"fixed_point"``: ``(I + H / rule.reg)^{-1} g`` at the proximal minimizer the inner
    loop reached, ``H`` the explicit Hessian there (depends only on ``rule.reg``, so any
    :class:`~torchopt_metagrad.rules.FixedPointRule` fits);
  - ``"flow"``: ``expm(-T A) g`` on a quadratic ``1/2 (u-a)^T A (u-a)`` sampled by gradient
    descent with a small ``lr`` (``T = steps * lr``).

* ``front_ends``: where the rule may be used: ``ADAPT`` (``tmg.adapt``), ``MODULE_LOSS``
  (``tmg.MetaSGD(...).step(loss)``), ``MODULE_CLOSURE`` (``.step(closure)``). A module
  mode missing from a row is checked to be refused.
* ``rtol``: tolerance of the oracle comparison (the rule's own bias/solver error).
* ``per_step_batches``: the rule accepts a different batch at every inner step.
* ``stores_snapshots``: the rule keeps flat snapshots until the outer backward (memory test).
* ``exact``: the meta-gradient is the derivative of the adapted parameters (gradcheck).
* ``higher_order``: the meta-gradient can be differentiated again (``create_graph=True``).
* ``known_bugs``: ``{test function name: KnownBug(exception, description)}``, library
  bugs a contract test exposes for this row; that test is marked
  ``xfail(strict=True, raises=exception)`` for it (so it fails once the bug is fixed:
  then delete the entry).

``tests/test_contract.py::test_table_columns_agree_with_the_rules_declared_needs`` checks
the columns against what each rule declares (``rule.needs(steps)``), and
``test_every_registered_rule_has_a_row`` that every registered rule has a row.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

import torchopt_metagrad as tmg

__all__ = [
    "ADAPT",
    "ALL_FRONT_ENDS",
    "CLOSURE_FRONT_ENDS",
    "FAMILIES",
    "MODULE_CLOSURE",
    "MODULE_LOSS",
    "ORACLES",
    "ROWS",
    "KnownBug",
    "RuleUnderTest",
    "StepTerms",
    "for_each_rule",
    "for_each_rule_and_front_end",
]

ADAPT = "tmg.adapt"
MODULE_LOSS = "MetaSGD.step(loss)"
MODULE_CLOSURE = "MetaSGD.step(closure)"
ALL_FRONT_ENDS = (ADAPT, MODULE_LOSS, MODULE_CLOSURE)
#: Rules that need curvature at the final parameters ask for step(closure).
CLOSURE_FRONT_ENDS = (ADAPT, MODULE_CLOSURE)

FAMILIES = ("step_product", "fixed_point", "flow", "graph")
ORACLES = ("step_product", "fixed_point", "flow")


@dataclass(frozen=True)
class StepTerms:
    """Which terms of ``(I + A_0) ... (I + A_{K-1}) g`` a step-product rule keeps.

    ``last``: only the factors of the last ``last`` steps (``None``: all steps);
    ``degree``: only the products of at most ``degree`` factors (``None``: any).
    So first order is ``StepTerms(last=0)``, ``Truncated(L)`` is ``StepTerms(last=L)``,
    ``Binomial(L)`` is ``StepTerms(degree=L)`` and the exact product ``StepTerms()``.
    """

    last: int | None = None
    degree: int | None = None


@dataclass(frozen=True)
class KnownBug:
    """A library bug a contract test exposes: the exception it raises and what is wrong."""

    raises: type[BaseException]
    reason: str


@dataclass(frozen=True)
class RuleUnderTest:
    rule: tmg.AbstractRule
    family: str
    oracle: str
    front_ends: tuple[str, ...]
    terms: StepTerms | None = None  # only for oracle == "step_product"
    rtol: float = 1e-10
    per_step_batches: bool = True
    stores_snapshots: bool = True
    exact: bool = False
    higher_order: bool = False
    known_bugs: dict[str, KnownBug] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        assert self.family in FAMILIES, self.family
        assert self.oracle in ORACLES, self.oracle
        assert set(self.front_ends) <= set(ALL_FRONT_ENDS), self.front_ends
        assert ADAPT in self.front_ends  # every rule works with tmg.adapt
        assert (self.terms is not None) == (self.oracle == "step_product"), self

    def __repr__(self) -> str:
        return repr(self.rule)


# fmt: off
ROWS: tuple[RuleUnderTest, ...] = (
    # ---- step products: brute-force sum of the selected products of step Jacobians
    RuleUnderTest(tmg.FirstOrder(), "step_product", "step_product", ALL_FRONT_ENDS,
                  terms=StepTerms(last=0), stores_snapshots=False),
    RuleUnderTest(tmg.Truncated(2), "step_product", "step_product", ALL_FRONT_ENDS,
                  terms=StepTerms(last=2)),
    RuleUnderTest(tmg.Binomial(2), "step_product", "step_product", ALL_FRONT_ENDS,
                  terms=StepTerms(degree=2)),
    RuleUnderTest(tmg.Binomial(2, chunk_size=1), "step_product", "step_product",
                  ALL_FRONT_ENDS, terms=StepTerms(degree=2)),
    # the automatic order at a tolerance far below the oracle's: the whole product
    RuleUnderTest(tmg.Binomial("auto", tol=1e-13), "step_product", "step_product",
                  ALL_FRONT_ENDS, terms=StepTerms(), rtol=1e-9),
    RuleUnderTest(tmg.Exact(), "step_product", "step_product", ALL_FRONT_ENDS,
                  terms=StepTerms(), exact=True),
    # the last steps' graphs kept from the forward (tmg.adapt only: a known horizon)
    RuleUnderTest(tmg.Exact(keep_graphs=2), "step_product", "step_product", (ADAPT,),
                  terms=StepTerms(), exact=True),
    # ---- the kept unrolled graph: the exact product, and differentiable again
    RuleUnderTest(tmg.Unrolled(), "graph", "step_product", ALL_FRONT_ENDS,
                  terms=StepTerms(), stores_snapshots=False, exact=True, higher_order=True),
    # ---- fixed point (iMAML): (I + H/reg)^{-1} g at the proximal minimizer
    RuleUnderTest(tmg.ImplicitCG(2.0, maxiter=100, tol=1e-12), "fixed_point", "fixed_point",
                  CLOSURE_FRONT_ENDS, rtol=1e-9, per_step_batches=False,
                  stores_snapshots=False),
    # ---- gradient flow (A-MAML): expm(-T A) g on a quadratic; Heun's O(lr^2) error
    RuleUnderTest(tmg.Adjoint(), "flow", "flow", CLOSURE_FRONT_ENDS, rtol=1e-3,
                  per_step_batches=False),
    # ---- fixed point by a Neumann series: needs reg > ||H|| (~7 on the oracle problem)
    RuleUnderTest(tmg.ImplicitNeumann(10.0, terms=200), "fixed_point", "fixed_point",
                  CLOSURE_FRONT_ENDS, rtol=1e-9, per_step_batches=False,
                  stores_snapshots=False),
    # ---- NEW RULES: add one row here (the oracle depends only on the family and knobs
    # such as rule.reg, never on the class).
)
# fmt: on


Decorator = Callable[[Callable[..., Any]], Callable[..., Any]]


def _marks(row: RuleUnderTest, test_name: str) -> list[pytest.MarkDecorator]:
    bug = row.known_bugs.get(test_name)
    if bug is None:
        return []
    return [pytest.mark.xfail(strict=True, raises=bug.raises, reason=bug.reason)]


def for_each_rule(*, where: str | None = None, front_end: str | None = None) -> Decorator:
    """``@for_each_rule()``: parametrize a test's ``row`` over the table (ids: the reprs).

    ``where``: keep only the rows whose boolean column of that name is true
    (``"exact"``, ``"stores_snapshots"``, ...); ``front_end``: only the rows that support it.
    """
    rows = [
        r
        for r in ROWS
        if (where is None or getattr(r, where)) and (front_end is None or front_end in r.front_ends)
    ]

    def deco(test: Callable[..., Any]) -> Callable[..., Any]:
        params = [pytest.param(r, id=repr(r.rule), marks=_marks(r, test.__name__)) for r in rows]
        return pytest.mark.parametrize("row", params)(test)

    return deco


def for_each_rule_and_front_end(
    front_ends: tuple[str, ...] = ALL_FRONT_ENDS, *, where: str | None = None
) -> Decorator:
    """Parametrize ``(row, front_end)`` over every row and each of ``front_ends`` it supports."""
    pairs = [
        (r, fe)
        for r in ROWS
        for fe in front_ends
        if fe in r.front_ends and (where is None or getattr(r, where))
    ]

    def deco(test: Callable[..., Any]) -> Callable[..., Any]:
        params = [
            pytest.param(r, fe, id=f"{r.rule!r}-{fe}", marks=_marks(r, test.__name__))
            for r, fe in pairs
        ]
        return pytest.mark.parametrize(("row", "front_end"), params)(test)

    return deco
