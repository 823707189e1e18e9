"""Progress bars: tqdm on stderr, or nothing."""

from __future__ import annotations

import sys
from typing import Any

from recipes.common.parallel import is_writer

__all__ = ["NullBar", "progress_bar"]


class NullBar:
    """Stands in for a tqdm bar when progress display is off."""

    def update(self, n: int = 1) -> None:
        """Do nothing."""

    def set_postfix(self, *args: Any, **kwargs: Any) -> None:
        """Do nothing."""

    def close(self) -> None:
        """Do nothing."""

    def __enter__(self) -> NullBar:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


def progress_bar(enabled: bool, *, total: int, initial: int = 0, desc: str = "") -> Any:
    """A tqdm bar on stderr (``enabled``), else a :class:`NullBar`.

    tqdm is imported only when a bar is shown, so quiet runs (tests) do not need it. Under
    ``torchrun`` only rank 0 shows bars.
    """
    if not enabled or not is_writer():
        return NullBar()
    from tqdm.auto import tqdm

    return tqdm(
        total=total, initial=initial, desc=desc, file=sys.stderr, dynamic_ncols=True, leave=False
    )
