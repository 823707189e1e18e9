"""torchopt_metagrad: swap the rule that computes a meta-gradient by changing one argument.

Usage::

    import torchopt_metagrad as tmg

    adapted = tmg.adapt(loss_fn, dict(model.named_parameters()), (x, y),
                        steps=5, lr=0.01, rule=tmg.Binomial(2))
    outer_loss(adapted).backward()   # the rule's meta-gradient lands on .grad
"""

from torchopt_metagrad import diagnostics
from torchopt_metagrad.errors import (
    NonFiniteError,
    ODESolveError,
    SolverWarning,
    VectorizationFallbackWarning,
)
from torchopt_metagrad.flow import adjoint, flow, implicit
from torchopt_metagrad.functional import adapt
from torchopt_metagrad.higher_compat import DifferentiableOptimizer, innerloop_ctx
from torchopt_metagrad.module import MetaAdam, MetaOptimizer, MetaSGD
from torchopt_metagrad.rules import (
    AbstractRule,
    Adjoint,
    Binomial,
    CGInfo,
    Exact,
    FirstOrder,
    ImplicitCG,
    Truncated,
    Unrolled,
    available_rules,
    make_rule,
    register,
    rule_class,
)
from torchopt_metagrad.rules.spec import format_rule, parse_rule, parse_rule_spec, rule_knobs

__version__ = "0.1.0"

__all__ = [
    "AbstractRule",
    "Adjoint",
    "Binomial",
    "CGInfo",
    "DifferentiableOptimizer",
    "Exact",
    "FirstOrder",
    "ImplicitCG",
    "MetaAdam",
    "MetaOptimizer",
    "MetaSGD",
    "NonFiniteError",
    "ODESolveError",
    "SolverWarning",
    "Truncated",
    "Unrolled",
    "VectorizationFallbackWarning",
    "adapt",
    "adjoint",
    "available_rules",
    "diagnostics",
    "flow",
    "format_rule",
    "implicit",
    "innerloop_ctx",
    "make_rule",
    "parse_rule",
    "parse_rule_spec",
    "register",
    "rule_class",
    "rule_knobs",
]
