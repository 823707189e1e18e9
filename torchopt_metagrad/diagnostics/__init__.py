"""Diagnostics: measuring what a meta-gradient rule costs (memory, ...)."""

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
    "peak_cuda_bytes",
    "peak_live_bytes",
    "peak_rss_bytes",
    "reset_peak_rss",
    "track_live_memory",
    "unwrap_functorch",
]
