"""Checkpoints written atomically and read back with a clear error when they are bad.

A checkpoint is one ``torch.save`` file holding plain values and tensors only (no
pickled classes), so it loads with ``torch.load(weights_only=True)``. It is written
to a temporary file in the same folder, flushed to disk, then moved over the old
one with ``os.replace``: a run killed at any moment leaves either the previous
checkpoint or the new one, never a torn file. It carries a SHA-256 digest of its contents
(every tensor's dtype, shape and bytes, every other value's ``repr``), checked on load: a
file whose bytes were altered (torch's zip reader does not check them) is refused instead
of resuming with other numbers.

Format 2 (this one) comes with the runner's task draws keyed by ``(seed, step, task
index)``; a format-1 checkpoint (one carried task stream) would resume with other tasks,
so it is refused.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from recipes.common.metrics import write_atomic

__all__ = ["FORMAT", "CheckpointError", "load_checkpoint", "save_checkpoint"]

#: Format tag stored in every checkpoint; bump on incompatible changes.
FORMAT = "recipes-checkpoint/2"
_REQUIRED = ("format", "recipe", "config", "method", "step", "model", "optimizer", "rng", "records")


class CheckpointError(ValueError):
    """A checkpoint cannot be used: corrupted, not a checkpoint, or from another run."""


def save_checkpoint(path: str | os.PathLike[str], state: dict[str, Any]) -> None:
    """Write ``state`` (plus the format tag) to ``path`` atomically."""
    payload = {"format": FORMAT, **state}
    payload["sha256"] = digest(payload)
    write_atomic(path, lambda f: torch.save(payload, f))


def digest(state: Mapping[str, Any]) -> str:
    """SHA-256 of ``state`` without its ``sha256`` entry (tensors by dtype, shape, bytes)."""
    h = hashlib.sha256()
    _feed(h, {k: v for k, v in state.items() if k != "sha256"})
    return h.hexdigest()


def _feed(h: Any, value: Any) -> None:
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous().reshape(-1)
        h.update(f"T{t.dtype}{tuple(value.shape)}:".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    elif isinstance(value, Mapping):
        h.update(b"{")
        for key, item in value.items():
            h.update(repr(key).encode() + b":")
            _feed(h, item)
            h.update(b",")
        h.update(b"}")
    elif isinstance(value, (list, tuple)):  # a tuple may load back as a list
        h.update(b"[")
        for item in value:
            _feed(h, item)
            h.update(b",")
        h.update(b"]")
    else:
        h.update(f"{type(value).__name__}:{value!r}".encode())


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
    found = state.get("format") if isinstance(state, dict) else type(state).__name__
    if found == "recipes-checkpoint/1":
        raise CheckpointError(
            f"checkpoint {path} was written by an older version of the recipes (format 1: "
            "one task stream carried from step to step); it cannot resume with the same "
            "tasks: start afresh with --overwrite"
        )
    if not isinstance(state, dict) or found != FORMAT:
        raise CheckpointError(
            f"{path} is not a recipes checkpoint (format {found!r}, want {FORMAT!r})"
        )
    if state.get("sha256") != digest(state):
        raise CheckpointError(
            f"checkpoint {path} is corrupted: its contents do not match the checksum stored "
            "with them (bytes altered after it was written); delete it to start afresh"
        )
    missing = [k for k in _REQUIRED if k not in state]
    if missing:
        raise CheckpointError(f"checkpoint {path} is incomplete: missing {', '.join(missing)}")
    return state
