"""Diagnostics: what a rule reported (``collect``), how good and costly it is (``compare``),
the curvature regime, and memory measurement."""

from torchopt_metagrad._core.callsite import reset_call_site_warnings
from torchopt_metagrad._core.engine import reset_fallback_warnings
from torchopt_metagrad._core.link import RuleReport, collect
from torchopt_metagrad.diagnostics.compare import EstimatorTable, RuleRow, compare, compare_run
from torchopt_metagrad.diagnostics.estimators import (
    Comparison,
    compare_to_exact,
    curvature_regime,
    hessian_norm,
    inner_iterates,
    meta_gradient,
    step_norms,
)
from torchopt_metagrad.diagnostics.memory import (
    LiveMemoryTracker,
    peak_cuda_bytes,
    peak_live_bytes,
    peak_rss_bytes,
    reset_peak_rss,
    track_live_memory,
    unwrap_functorch,
)

__all__ = [
    "Comparison",
    "EstimatorTable",
    "LiveMemoryTracker",
    "RuleReport",
    "RuleRow",
    "collect",
    "compare",
    "compare_run",
    "compare_to_exact",
    "curvature_regime",
    "hessian_norm",
    "inner_iterates",
    "meta_gradient",
    "peak_cuda_bytes",
    "peak_live_bytes",
    "peak_rss_bytes",
    "reset_call_site_warnings",
    "reset_fallback_warnings",
    "reset_peak_rss",
    "step_norms",
    "track_live_memory",
    "unwrap_functorch",
]
