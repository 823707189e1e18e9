"""Meta-gradient rules, found by name in one registry.

Each rule module registers its rule(s) with ``@register`` when imported. The registry
entry of a rule module is its import below and its names in ``__all__``; ``tmg``
re-exports everything listed here.
"""

from torchopt_metagrad.rules.adjoint import Adjoint, AdjointInfo
from torchopt_metagrad.rules.base import (
    AbstractRule,
    FixedPointRule,
    FlowRule,
    GraphRule,
    StepProductRule,
    available_rules,
    make_rule,
    register,
    rule_class,
)
from torchopt_metagrad.rules.binomial import Binomial, BinomialInfo
from torchopt_metagrad.rules.first_order import FirstOrder
from torchopt_metagrad.rules.implicit import CGInfo, ImplicitCG, TorchoptSolve
from torchopt_metagrad.rules.neumann import ImplicitNeumann, NeumannInfo
from torchopt_metagrad.rules.truncated import Exact, Truncated
from torchopt_metagrad.rules.unrolled import Unrolled

__all__ = [
    "AbstractRule",
    "Adjoint",
    "AdjointInfo",
    "Binomial",
    "BinomialInfo",
    "CGInfo",
    "Exact",
    "FirstOrder",
    "FixedPointRule",
    "FlowRule",
    "GraphRule",
    "ImplicitCG",
    "ImplicitNeumann",
    "NeumannInfo",
    "StepProductRule",
    "TorchoptSolve",
    "Truncated",
    "Unrolled",
    "available_rules",
    "make_rule",
    "register",
    "rule_class",
]
