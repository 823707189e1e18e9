"""Line plots as PNG files (matplotlib, headless Agg backend)."""

from __future__ import annotations

import io
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from recipes.common.metrics import write_atomic

__all__ = ["Curve", "plot_curves"]

#: ``(x, y, yerr)``: a line with an optional symmetric band (``yerr`` None: no band).
Curve = tuple[Sequence[float], Sequence[float], Sequence[float] | None]


def plot_curves(
    path: str | os.PathLike[str],
    curves: Mapping[str, Curve],
    *,
    xlabel: str,
    ylabel: str,
    title: str = "",
    logx: bool = False,
    logy: bool = False,
) -> Path:
    """Plot labelled curves (with +-1 std bands where given) into a PNG at ``path``.

    Matplotlib is imported here and forced onto the non-interactive Agg backend, so
    this works without a display and never opens a window. The file is written
    atomically (a kill mid-write leaves the old plot or the new one).
    """
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    try:
        for label, (x, y, err) in curves.items():
            xs, ys = [float(v) for v in x], [float(v) for v in y]
            (line,) = ax.plot(xs, ys, marker="o", markersize=3, label=label)
            if err is not None:
                lo = [a - b for a, b in zip(ys, err, strict=True)]
                hi = [a + b for a, b in zip(ys, err, strict=True)]
                ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.15, linewidth=0)
        if logx:
            ax.set_xscale("symlog", linthresh=1.0)
        if logy:
            ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        if title:
            ax.set_title(title, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = Path(path)
        image = io.BytesIO()
        fig.savefig(image, format="png")
        write_atomic(path, lambda f: f.write(image.getvalue()))  # rank 0 only, never torn
    finally:
        plt.close(fig)
    return path
