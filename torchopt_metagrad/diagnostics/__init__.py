"""Diagnostics: what a rule reported (``collect``), and what it costs (memory, ...)."""

from torchopt_metagrad._core.engine import reset_fallback_warnings
from torchopt_metagrad._core.link import RuleReport, collect
from torchopt_metagrad.diagnostics.estimators import (
    Comparison,
    compare,
    compare_to_exact,
    curvature_regime,
    hessian_norm,
    inner_iterates,
    meta_gradient,
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
    "LiveMemoryTracker",
    "RuleReport",
    "collect",
    "compare",
    "compare_to_exact",
    "curvature_regime",
    "hessian_norm",
    "inner_iterates",
    "meta_gradient",
    "peak_cuda_bytes",
    "peak_live_bytes",
    "peak_rss_bytes",
    "reset_fallback_warnings",
    "reset_peak_rss",
    "track_live_memory",
    "unwrap_functorch",
]
