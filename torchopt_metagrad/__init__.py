"""torchopt_metagrad: swap the rule that computes a meta-gradient by changing one argument.

Usage::

    import torchopt_metagrad as tmg

    adapted = tmg.adapt(loss_fn, dict(model.named_parameters()), (x, y),
                        steps=5, lr=0.01, rule=tmg.Binomial(2))
    outer_loss(adapted).backward()   # the rule's meta-gradient lands on .grad
"""

from torchopt_metagrad import diagnostics, distributed, rules
from torchopt_metagrad._core.ode import ODE
from torchopt_metagrad.custom_root import custom_root
from torchopt_metagrad.errors import (
    NonFiniteError,
    ODESolveError,
    RegimeWarning,
    SolverWarning,
    VectorizationFallbackWarning,
)
from torchopt_metagrad.flow import adjoint, flow, implicit
from torchopt_metagrad.functional import adapt
from torchopt_metagrad.module import (
    DifferentiableOptimizer,
    MetaAdam,
    MetaOptimizer,
    MetaSGD,
    innerloop_ctx,
)
from torchopt_metagrad.rules import *  # noqa: F403 - every rule and the registry
from torchopt_metagrad.rules.spec import format_rule, parse_rule, parse_rule_spec, rule_knobs

__version__ = "0.1.0"

__all__ = [
    "ODE",
    "DifferentiableOptimizer",
    "MetaAdam",
    "MetaOptimizer",
    "MetaSGD",
    "NonFiniteError",
    "ODESolveError",
    "RegimeWarning",
    "SolverWarning",
    "VectorizationFallbackWarning",
    "adapt",
    "adjoint",
    "custom_root",
    "diagnostics",
    "distributed",
    "flow",
    "format_rule",
    "implicit",
    "innerloop_ctx",
    "parse_rule",
    "parse_rule_spec",
    "rule_knobs",
]
__all__ += rules.__all__
