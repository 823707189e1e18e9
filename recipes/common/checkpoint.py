"""Checkpoints written atomically and read back with a clear error when they are bad.

A checkpoint is one ``torch.save`` file holding plain values and tensors only (no
pickled classes), so it loads with ``torch.load(weights_only=True)``. It is written
to a temporary file in the same folder, flushed to disk, then moved over the old
one with ``os.replace``: a run killed at any moment leaves either the previous
checkpoint or the new one, never a torn file.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from recipes.common.metrics import write_atomic

__all__ = ["FORMAT", "CheckpointError", "load_checkpoint", "save_checkpoint"]

#: Format tag stored in every checkpoint; bump on incompatible changes.
FORMAT = "recipes-checkpoint/1"
_REQUIRED = ("format", "recipe", "config", "method", "step", "model", "optimizer", "rng", "records")


class CheckpointError(ValueError):
    """A checkpoint cannot be used: corrupted, not a checkpoint, or from another run."""


def save_checkpoint(path: str | os.PathLike[str], state: dict[str, Any]) -> None:
    """Write ``state`` (plus the format tag) to ``path`` atomically."""
    payload = {"format": FORMAT, **state}
    write_atomic(path, lambda f: torch.save(payload, f))


def load_checkpoint(path: str | os.PathLike[str], *, map_location: Any = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`.

    Raises:
        FileNotFoundError: there is no file at ``path`` (the message names it).
        CheckpointError: (a ``ValueError``) the file is not a readable checkpoint of this
            format: truncated, overwritten with other bytes, or written by something else.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"no checkpoint to resume from at {path} (run without --resume to start afresh)"
        )
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except (
        pickle.UnpicklingError,
        zipfile.BadZipFile,
        RuntimeError,
        EOFError,
        ValueError,
        OSError,
        KeyError,
        AttributeError,
        IndexError,
        TypeError,
    ) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CheckpointError(
            f"checkpoint {path} is corrupted or not a checkpoint ({type(err).__name__}: "
            f"{first}); delete it to start afresh"
        ) from err
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(
            f"{path} is not a recipes checkpoint (format {found!r}, want {FORMAT!r})"
        )
    missing = [k for k in _REQUIRED if k not in state]
    if missing:
        raise CheckpointError(f"checkpoint {path} is incomplete: missing {', '.join(missing)}")
    return state
