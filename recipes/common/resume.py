"""Whether and from what a run starts: an existing run is not overwritten without
``--overwrite``; ``--resume`` needs an intact checkpoint written with the same settings;
a checkpoint that does not fit the model is a clear error. Used by :func:`recipes.common.
runner.train` and, before they write anything, by the recipes and the comparison module
(so a refused command leaves the folder as it was).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from torch import nn

from recipes.common.checkpoint import CheckpointError, load_checkpoint
from recipes.common.config import TrainConfig, stable_fields
from recipes.common.env import resolve_device, set_rng_state
from recipes.common.inner import InnerParams
from recipes.common.methods import Method

__all__ = ["RunExistsError", "check_start", "identity", "restore"]


class RunExistsError(CheckpointError):
    """The output folder already holds a run, and neither ``--resume`` nor
    ``--overwrite`` was given."""


def check_start(
    recipe: str, method: Method, config: TrainConfig, run_dir: str | Path
) -> dict[str, Any] | None:
    """What :func:`train` checks before it writes anything: a run already in ``run_dir``
    is refused without ``--resume`` / ``--overwrite``; with ``--resume`` the checkpoint
    must exist, be intact and come from the same settings. Returns that checkpoint (or
    ``None`` for a fresh start). Recipes call it before writing their own files, so a
    refused command leaves the folder as it was.

    Raises:
        RunExistsError, FileNotFoundError, CheckpointError: as :func:`train`.
    """
    ckpt_path = Path(run_dir) / "checkpoint.pt"
    if not config.resume:
        _refuse_existing(ckpt_path, config)
        return None
    # On CPU: RNG states must stay CPU tensors; load_state_dict moves the rest.
    state = load_checkpoint(ckpt_path, map_location="cpu")
    _check_same_run(state, identity(recipe, method, config), ckpt_path, _defaults(config))
    return state


def identity(recipe: str, method: Method, config: TrainConfig) -> dict[str, Any]:
    return {"recipe": recipe, "config": _identity_config(config), "method": method.spec}


def _refuse_existing(ckpt_path: Path, config: TrainConfig) -> None:
    """A folder that holds a run is not silently overwritten."""
    if not ckpt_path.is_file() or config.overwrite:
        return
    try:
        step = f"at meta-step {int(load_checkpoint(ckpt_path)['step'])}"
    except (CheckpointError, KeyError, ValueError):
        step = "unreadable"
    raise RunExistsError(
        f"{ckpt_path.parent} already holds a run ({step}): add --resume to continue it, "
        "--overwrite to start it afresh, or choose another --out / --name"
    )


def _identity_config(config: TrainConfig) -> dict[str, Any]:
    """The fields that fix a run's numbers, with the device as the kind it resolves to
    (``--device auto`` on a CPU machine is ``cpu``)."""
    return {**stable_fields(config), "device": resolve_device(config.device).type}


def _defaults(config: TrainConfig) -> dict[str, Any]:
    return {
        f.name: list(f.default) if isinstance(f.default, tuple) else f.default
        for f in dataclasses.fields(config)
        if f.default is not dataclasses.MISSING
    }


def _check_same_run(
    state: dict[str, Any], identity: dict[str, Any], path: Path, defaults: dict[str, Any]
) -> None:
    """Refuse a checkpoint written with other settings. An option the checkpoint does not
    record (added to the recipe after it was written) matches its default value."""
    diffs = []
    for key in ("recipe", "method"):
        if state[key] != identity[key]:
            diffs.append(f"{key}: checkpoint {state[key]!r}, now {identity[key]!r}")
    old, new = state["config"], identity["config"]
    old = {**{k: v for k, v in defaults.items() if k in new and k not in old}, **old}
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            diffs.append(
                f"--{key.replace('_', '-')}: checkpoint {old.get(key)!r}, now {new.get(key)!r}"
            )
    if diffs:
        raise CheckpointError(
            f"checkpoint {path} was written by a run with other settings; resume with the "
            "same settings or use another --out:\n  " + "\n  ".join(diffs)
        )


def restore(
    state: dict[str, Any],
    model: nn.Module,
    inner: InnerParams,
    optimizer: torch.optim.Optimizer,
    path: Path,
) -> None:
    """Load a checkpoint's model, rates, optimizer and random states; a mismatch (other
    shapes, missing entries) is a :class:`CheckpointError` naming the file."""
    try:
        model.load_state_dict(state["model"])
        inner.load_state_dict(state.get("inner", {}))
        optimizer.load_state_dict(state["optimizer"])
        set_rng_state(state["rng"], {})
    except (RuntimeError, ValueError, KeyError, TypeError) as err:
        text = " ".join(str(err).split())[:400] or type(err).__name__
        raise CheckpointError(
            f"checkpoint {path} does not fit this run's model or optimizer ({text}); "
            "use another --out or --overwrite"
        ) from None
