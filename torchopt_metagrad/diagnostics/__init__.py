"""Diagnostics: what a rule reported (``collect``), and what it costs (memory, ...)."""

from torchopt_metagrad._core.engine import reset_fallback_warnings
from torchopt_metagrad._core.link import RuleReport, collect
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
    "LiveMemoryTracker",
    "RuleReport",
    "collect",
    "peak_cuda_bytes",
    "peak_live_bytes",
    "peak_rss_bytes",
    "reset_fallback_warnings",
    "reset_peak_rss",
    "track_live_memory",
    "unwrap_functorch",
]
