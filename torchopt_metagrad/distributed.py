"""Task-parallel meta-training with ``torch.distributed`` (launched with ``torchrun``).

Meta-gradients land on ``.grad`` of the initial parameters, so data parallelism over tasks
needs no wrapper: each rank adapts its share of the meta-batch with any rule, calls
``outer_loss.backward()``, then :func:`average_meta_gradients` averages the ``.grad`` of the
meta-parameters across ranks with one all-reduce of one flat buffer (per dtype and device),
and every rank takes the same outer step, so the meta-parameters stay identical::

    info = tmg.distributed.setup()                      # reads torchrun's environment
    for step in range(meta_steps):
        tasks = sample_tasks(seed=tmg.distributed.task_seed(base_seed, step, info.rank),
                             n=tmg.distributed.share(global_batch, info))
        # (or draw the global meta-batch from one seed and take task_range(global_batch, info))
        meta_opt.zero_grad()
        sum(task_loss(t) for t in tasks).div(global_batch).backward()
        tmg.distributed.average_meta_gradients(model, scale="sum")   # sum of the shares
        meta_opt.step()
    tmg.distributed.teardown()                          # every rank: barrier, then leave

Why not ``DistributedDataParallel``: DDP's reducer hooks fire during the backward of the
graph it wraps and do not mix with the double backward and the reentrant backward of the
inner loop (pytorch#63929, higher#98, learn2learn#170); here nothing needs to be reduced
during the backward — only the final meta-gradients, once per outer step. An outer model
that is itself large can still be wrapped in DDP/FSDP for the *outer* forward; do not
wrap the module whose parameters the inner loop adapts.
"""

from __future__ import annotations

import hashlib
import numbers
import os
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = [
    "RankInfo",
    "average_meta_gradients",
    "meta_batch_seeds",
    "setup",
    "share",
    "task_range",
    "task_seed",
    "teardown",
]


@dataclass(frozen=True)
class RankInfo:
    """This process's place in the job.

    Attributes:
        rank: global rank (0 in a single-process run).
        world_size: number of processes (1 without torch.distributed).
        local_rank: rank on this machine (selects the CUDA device).
        device: the device this rank computes on.
    """

    rank: int
    world_size: int
    local_rank: int
    device: torch.device


def setup(backend: str | None = None, *, timeout: timedelta = timedelta(minutes=10)) -> RankInfo:
    """Join the process group described by torchrun's environment (or run alone).

    Without ``WORLD_SIZE`` in the environment (a plain ``python`` run) nothing is
    initialized and rank 0 of 1 is returned. ``backend``: ``"nccl"`` with CUDA, else
    ``"gloo"`` (default: chosen from ``torch.cuda.is_available()``). ``timeout`` bounds
    every collective: a rank that died makes the others fail with an error after it
    instead of hanging.
    """
    if backend not in (None, "nccl", "gloo"):  # checked alone too: the same call runs both
        raise ValueError(f"backend must be 'nccl' or 'gloo', got {backend!r}")
    if "WORLD_SIZE" not in os.environ:
        device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
        return RankInfo(0, 1, 0, device)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    backend = backend or ("nccl" if cuda else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=timeout)
    device = torch.device("cuda", local_rank) if backend == "nccl" else torch.device("cpu")
    return RankInfo(dist.get_rank(), dist.get_world_size(), local_rank, device)


def teardown(group: object = None) -> None:
    """Leave the process group cleanly at the end of a job (a no-op alone).

    Waits at a barrier until every rank is done with its collectives, then destroys the
    group. Without the barrier, a rank that finishes first and tears gloo down while a peer
    is still in (or just past) the last all-reduce can die with ``terminate called without
    an active exception`` (SIGABRT) at exit: seen about once in 15 two-process runs on
    torch 2.13. Call it on the success path only: after a rank has failed, the barrier
    would wait for the collective timeout.
    """
    if not dist.is_available() or not dist.is_initialized():
        return
    dist.barrier(group=group)  # type: ignore[arg-type]
    dist.destroy_process_group(group)  # type: ignore[arg-type]


def share(global_batch: int, info: RankInfo) -> int:
    """How many of ``global_batch`` tasks this rank takes (the first ranks take one more
    when it does not divide evenly)."""
    if isinstance(global_batch, bool) or not isinstance(global_batch, numbers.Integral):
        raise TypeError(f"global_batch must be an int, got {global_batch!r}")
    if global_batch < info.world_size:
        raise ValueError(
            f"the global meta-batch ({global_batch}) is smaller than the number of ranks "
            f"({info.world_size}): every rank needs at least one task"
        )
    base, extra = divmod(global_batch, info.world_size)
    return base + (info.rank < extra)


def task_range(global_batch: int, info: RankInfo) -> range:
    """The indices in ``0..global_batch-1`` of the tasks this rank takes (contiguous;
    the ranks' ranges cover the meta-batch once)."""
    count = share(global_batch, info)  # checks global_batch first
    base, extra = divmod(global_batch, info.world_size)
    start = info.rank * base + min(info.rank, extra)
    return range(start, start + count)


def task_seed(seed: int, step: int, rank: int) -> int:
    """A seed for the tasks of ``rank`` at outer step ``step``: distinct across ranks and
    steps, the same in every rerun (a 63-bit hash of the three numbers). Pass a global
    task index instead of the rank (:func:`meta_batch_seeds`) for draws that do not depend
    on the number of ranks."""
    digest = hashlib.sha256(f"{seed}/{step}/{rank}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def meta_batch_seeds(seed: int, step: int, global_batch: int, info: RankInfo) -> list[int]:
    """Seeds of this rank's tasks at outer step ``step``: ``task_seed(seed, step, i)`` for
    each global task index ``i`` in :func:`task_range`.

    Task ``i`` of step ``step`` is drawn from its own seed, so the global meta-batch is the
    same for every world size (the union over ranks; one process draws all of it), a run
    checkpointed on N ranks resumes on M with the same tasks, and no random stream has to
    be carried from step to step.
    """
    return [task_seed(seed, step, i) for i in task_range(global_batch, info)]


def average_meta_gradients(
    params: nn.Module | Iterable[Tensor], *, scale: str = "mean", group: object = None
) -> None:
    """Reduce the ``.grad`` of ``params`` across ranks, in place (a no-op alone).

    One all-reduce per (dtype, device) of one flat buffer holding every gradient and,
    per parameter, whether any rank had one (a parameter without a gradient on every
    rank keeps ``.grad = None``; one that has it on some ranks gets zeros elsewhere).

    Args:
        params: a module (its parameters that require grad) or tensors.
        scale: ``"mean"`` divides the sum by the world size (each rank's loss a mean over
            equally many tasks); ``"sum"`` keeps the sum (each rank's loss already divided
            by the global meta-batch, which handles uneven shares exactly).
        group: a process group (default: the world).
    """
    if scale not in ("mean", "sum"):
        raise ValueError(f"scale must be 'mean' or 'sum', got {scale!r}")
    if isinstance(params, Tensor) or not isinstance(params, (nn.Module, Iterable)):
        # a lone tensor would be iterated row by row: views without .grad, nothing reduced
        what = "one tensor (wrap it in a list)" if isinstance(params, Tensor) else repr(params)
        raise TypeError(f"params must be a module or an iterable of tensors, got {what}")
    tensors = (
        [p for p in params.parameters() if p.requires_grad]
        if isinstance(params, nn.Module)
        else list(params)
    )
    if not all(isinstance(t, Tensor) for t in tensors):
        raise TypeError("params must be a module or an iterable of tensors")
    if not dist.is_available() or not dist.is_initialized():
        return
    world = dist.get_world_size(group)  # type: ignore[arg-type]
    buckets: dict[tuple[torch.dtype, torch.device], list[Tensor]] = {}
    for t in tensors:
        buckets.setdefault((t.dtype, t.device), []).append(t)
    for (dtype, device), group_tensors in buckets.items():
        flags = torch.tensor(
            [t.grad is not None for t in group_tensors], dtype=dtype, device=device
        )
        parts = [
            (t.grad if t.grad is not None else torch.zeros_like(t)).reshape(-1)
            for t in group_tensors
        ]
        flat = torch.cat([*parts, flags])
        dist.all_reduce(flat, group=group)
        if scale == "mean":
            flat[: -len(group_tensors)] /= world
        offset = 0
        for t, had in zip(group_tensors, flat[-len(group_tensors) :].tolist(), strict=True):
            n = t.numel()
            if had > 0:
                t.grad = flat[offset : offset + n].view_as(t).clone()
            offset += n
