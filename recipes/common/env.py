"""Seeding, device choice and the random-number state a checkpoint carries."""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

__all__ = [
    "cpu_threads",
    "get_rng_state",
    "resolve_device",
    "resolve_dtype",
    "seed_everything",
    "set_rng_state",
]


def seed_everything(seed: int) -> None:
    """Seed Python's ``random`` and torch's global generators (CPU and CUDA).

    The recipes draw tasks from their own ``torch.Generator`` objects (see
    :func:`recipes.common.runner.train`); the global generators only seed the model's
    initialization. NumPy is not used for anything random.
    """
    random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(device: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cuda`` without a GPU is an error.

    Under torchrun (``LOCAL_RANK`` set) CUDA means ``cuda:LOCAL_RANK``, one GPU per process.

    Raises:
        ValueError: an unknown name, or ``cuda`` on a machine without CUDA.
    """
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"--device must be auto, cpu or cuda, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: torch sees no CUDA device on this machine")
    if device == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


def resolve_dtype(dtype: str) -> torch.dtype:
    """``float32`` / ``float64`` -> the torch dtype."""
    try:
        return {"float32": torch.float32, "float64": torch.float64}[dtype]
    except KeyError:
        raise ValueError(f"--dtype must be float32 or float64, got {dtype!r}") from None


def get_rng_state(generators: dict[str, torch.Generator]) -> dict[str, Any]:
    """Every random state a run depends on, as ``weights_only``-loadable values."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "torch": torch.get_rng_state(),
        "generators": {name: g.get_state() for name, g in generators.items()},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any], generators: dict[str, torch.Generator]) -> None:
    """Restore what :func:`get_rng_state` saved."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    for name, g in generators.items():
        g.set_state(state["generators"][name])


@contextmanager
def cpu_threads(threads: int) -> Iterator[None]:
    """Use ``threads`` torch CPU threads inside the block (0: leave torch's setting).

    The recipes' networks are tiny, so one thread is as fast as several on an idle
    machine and much faster on a busy shared one (measured 2 threads up to 40x
    slower than 1 on a loaded 2-core machine). The previous setting is restored.
    """
    previous = torch.get_num_threads()
    if threads > 0:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
