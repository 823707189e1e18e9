"""Warnings attributed to the user's line of code, shown once per call site.

A rule runs inside autograd's backward, many frames below the user's code. Python's
``stacklevel`` cannot reach past frames of unknown depth (torch's backward, autograd's
engine, the library), so :func:`warn_at_call_site` walks the stack to the first frame
outside ``torchopt_metagrad`` and ``torch`` (the line that called ``backward()``,
``torch.autograd.grad`` or a diagnostics function) and issues the warning there with
:func:`warnings.warn_explicit`, so the user's warning filters apply as usual.

Once per call site: the message carries a number that changes from call to call, so
Python's own "once per location" registry (keyed by the text) would repeat it. This
module keeps its own set of ``(category, file, line)`` already warned about;
:func:`reset_call_site_warnings` forgets them. A backward run on another thread (CUDA's
autograd device threads) has no user frame on its stack: it warns once per process.
"""

from __future__ import annotations

import os
import sys
import threading
import warnings
from types import FrameType

import torch

__all__ = ["reset_call_site_warnings", "warn_at_call_site"]

_PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_INTERNAL = tuple(
    d + os.sep for d in (_PACKAGE, os.path.dirname(os.path.abspath(torch.__file__ or _PACKAGE)))
)
_seen: set[tuple[str, str, int]] = set()
_lock = threading.Lock()


def _user_frame(frame: FrameType | None) -> FrameType | None:
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_INTERNAL):
        frame = frame.f_back
    return frame


def warn_at_call_site(message: str, category: type[Warning]) -> bool:
    """Warn ``message`` at the user's line that led here, once per (category, line).

    Returns whether the warning was issued (``False``: that line was warned about before).
    """
    frame = _user_frame(sys._getframe(1))
    if frame is None:
        filename, lineno, module, globs = "<autograd thread>", 0, "torchopt_metagrad", None
    else:
        globs = frame.f_globals
        filename, lineno = frame.f_code.co_filename, frame.f_lineno
        module = globs.get("__name__", "<unknown>")
    key = (category.__qualname__, filename, lineno)
    with _lock:
        if key in _seen:
            return False
        _seen.add(key)
    # registry=None: the "once per location" bookkeeping is ours (the text varies).
    warnings.warn_explicit(message, category, filename, lineno, module, module_globals=globs)
    return True


def reset_call_site_warnings() -> None:
    """Forget which call sites were warned about (each warns again, once)."""
    with _lock:
        _seen.clear()
