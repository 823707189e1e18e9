"""The recipes under ``torchrun``: one process per rank, tasks split across ranks.

``torchrun --nproc_per_node=N -m recipes.<name> ...`` runs every recipe unchanged. The
runner (:func:`recipes.common.runner.train`) joins the process group torchrun describes
(``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``; gloo on CPU, nccl on CUDA with the device
``cuda:LOCAL_RANK``, through :func:`torchopt_metagrad.distributed.setup`), and each rank
adapts its share of the global meta-batch (``--meta-batch`` is global). The meta-gradients
are summed once per outer step (one flat all-reduce), so every rank takes the same outer
step and keeps the same meta-parameters.

What runs where:

* Rank 0 alone writes files (checkpoints, metrics, summaries, plots: :func:`is_writer`),
  prints to stdout (:func:`quiet_other_ranks`) and shows progress bars. The other ranks
  compute the same evaluations (so nobody waits on rank 0) and discard them.
* Whether a run may start or resume is decided by rank 0 and the answer (or the error)
  broadcast (:func:`on_rank0`), so every rank stops with the same message and resuming
  needs the checkpoint only where rank 0 runs.
* A stop (SIGTERM, Ctrl-C, ``--stop-after``) seen by any rank stops all of them after the
  same meta-step (:func:`gather_stats` carries the flag).
* A rank that fails ends the job: its error names it (``rank R of N failed at meta-step
  S``); the others' next collective fails at once (gloo: the peer closed its connection),
  or after ``--dist-timeout`` seconds when the rank hangs, and says so; torchrun then stops
  the remaining processes and names the first failure ("Root Cause: rank R").
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

import torchopt_metagrad as tmg
from torchopt_metagrad.distributed import RankInfo

__all__ = [
    "DistributedError",
    "gather_stats",
    "is_writer",
    "join",
    "on_rank0",
    "quiet_other_ranks",
    "rank_context",
]

T = TypeVar("T")


class DistributedError(RuntimeError):
    """Another rank failed, or a collective timed out."""


def launched() -> bool:
    """This process was started by torchrun (or another launcher setting ``WORLD_SIZE``)."""
    return "WORLD_SIZE" in os.environ


def env_rank() -> int:
    """This process's global rank from the launcher's environment (0 without one)."""
    return int(os.environ.get("RANK", "0"))


def is_writer() -> bool:
    """Whether this process writes files and prints: rank 0 (or a plain single process)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return env_rank() == 0


def quiet_other_ranks() -> None:
    """Under a launcher, send stdout of every rank but 0 to ``os.devnull`` (stderr, where
    errors and warnings go, stays)."""
    if launched() and env_rank() != 0 and sys.stdout is not None:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - lives as long as the process


def join(device: torch.device, timeout_s: float) -> RankInfo:
    """Join torchrun's process group (once), or rank 0 of 1 without a launcher.

    The backend follows ``device`` (nccl for CUDA, gloo for CPU); ``timeout_s`` bounds
    every collective: a rank that hangs makes the others fail after it.
    """
    if not launched():
        return RankInfo(0, 1, 0, device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    info = tmg.distributed.setup(backend, timeout=timedelta(seconds=timeout_s))
    return RankInfo(info.rank, info.world_size, info.local_rank, device)


def on_rank0(info: RankInfo, fn: Callable[[], T]) -> T:
    """Run ``fn`` on rank 0 and give every rank its result, or raise its error everywhere."""
    if info.world_size == 1:
        return fn()
    box: list[Any] = [None]
    if info.rank == 0:
        try:
            box[0] = ("ok", fn())
        except Exception as err:  # sent to every rank, raised there and here
            box[0] = ("error", err)
    _collective(lambda: dist.broadcast_object_list(box, src=0), info, "start")
    kind, value = box[0]
    if kind == "error":
        raise value
    return value  # type: ignore[no-any-return]


def gather_stats(
    info: RankInfo, sums: Mapping[str, float], count: int, stop: bool, step: int
) -> tuple[dict[str, float], bool]:
    """Combine per-rank statistics: ``sums`` maps a name to its sum over this rank's
    ``count`` tasks; returns the means over every rank's tasks (a name missing on a rank
    counts as 0 there, as it does for a task without it) and whether any rank asked to stop.
    """
    parts = [(dict(sums), count, stop)]
    if info.world_size > 1:
        gathered: list[Any] = [None] * info.world_size
        _collective(lambda: dist.all_gather_object(gathered, parts[0]), info, f"meta-step {step}")
        parts = gathered
    totals: dict[str, float] = {}
    for values, _, _ in parts:
        for key, value in values.items():
            totals[key] = totals.get(key, 0.0) + value
    n = sum(c for _, c, _ in parts)
    return {k: v / n for k, v in totals.items()}, any(flag for _, _, flag in parts)


def _collective(call: Callable[[], Any], info: RankInfo, where: str) -> None:
    try:
        call()
    except DistributedError:
        raise
    except RuntimeError as err:  # gloo / nccl: a peer closed its connection, or a timeout
        first = str(err).splitlines()[0][:300]
        raise DistributedError(
            f"rank {info.rank} of {info.world_size}: a collective at {where} failed, so "
            f"another rank failed (see its error and torchrun's 'Root Cause') or did not "
            f"answer within --dist-timeout: {first}"
        ) from err


@contextmanager
def rank_context(info: RankInfo, step: Callable[[], int]) -> Iterator[None]:
    """Name the rank and the meta-step in an error raised inside (a multi-process job only)."""
    try:
        yield
    except (DistributedError, KeyboardInterrupt):
        raise
    except Exception as err:
        if info.world_size == 1:
            raise
        raise RuntimeError(
            f"rank {info.rank} of {info.world_size} failed at meta-step {step()}: "
            f"{type(err).__name__}: {err}"
        ) from err


def reduce_meta_gradients(info: RankInfo, params: list[Any], step: int) -> None:
    """Sum the ranks' ``.grad`` (each already scaled by ``1 / global meta-batch``)."""
    if info.world_size > 1:
        _collective(
            lambda: tmg.distributed.average_meta_gradients(params, scale="sum"),
            info,
            f"meta-step {step}",
        )
