"""The two meta-learning workloads of the benchmark: sine regression and 5-way 1-shot conv.

* ``sine``: MLP 1-40-40-1 with ReLU (MAML's sinusoid regression). A task is
  ``A sin(x + phase)`` with ``A ~ U[0.1, 5]``, ``phase ~ U[0, pi]``, ``x ~ U[-5, 5]``;
  10 support points for the inner loss, 10 query points for the outer loss; MSE.
* ``conv``: the standard 4-conv few-shot net (4 x [Conv2d(3x3, 64, padding 1),
  BatchNorm2d(64, track_running_stats=False), ReLU, MaxPool2d(2)], then Linear(64, 5))
  on 28x28x1 inputs, 5-way 1-shot: 5 support images, 75 query images (15 per class);
  cross-entropy. The images are random (Omniglot-shaped synthetic data): timing and
  memory do not depend on the pixel values.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F


@dataclass(frozen=True)
class Task:
    """One task: support set for the inner loss, query set for the outer loss."""

    x_support: torch.Tensor
    y_support: torch.Tensor
    x_query: torch.Tensor
    y_query: torch.Tensor


@dataclass(frozen=True)
class Workload:
    """A network family, its task distribution, its loss and its inner learning rate."""

    name: str
    description: str
    make_net: Callable[[], nn.Module]
    sample_tasks: Callable[[int, torch.Generator], list[Task]]
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    inner_lr: float


def sine_mlp() -> nn.Module:
    """MLP 1-40-40-1 with ReLU."""
    return nn.Sequential(
        nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 1)
    )


def sample_sine_tasks(
    num_tasks: int, gen: torch.Generator, n_support: int = 10, n_query: int = 10
) -> list[Task]:
    """Sample sinusoid regression tasks."""
    tasks = []
    for _ in range(num_tasks):
        amp = 0.1 + 4.9 * torch.rand((), generator=gen)
        phase = math.pi * torch.rand((), generator=gen)
        xs = -5.0 + 10.0 * torch.rand(n_support, 1, generator=gen)
        xq = -5.0 + 10.0 * torch.rand(n_query, 1, generator=gen)
        tasks.append(Task(xs, amp * torch.sin(xs + phase), xq, amp * torch.sin(xq + phase)))
    return tasks


def _conv_block(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1),
        nn.BatchNorm2d(out_channels, track_running_stats=False),
        nn.ReLU(),
        nn.MaxPool2d(2),
    )


def conv4(n_way: int = 5, in_channels: int = 1, hidden: int = 64) -> nn.Module:
    """The 4-conv few-shot net for 28x28 inputs (28 -> 14 -> 7 -> 3 -> 1)."""
    return nn.Sequential(
        _conv_block(in_channels, hidden),
        _conv_block(hidden, hidden),
        _conv_block(hidden, hidden),
        _conv_block(hidden, hidden),
        nn.Flatten(),
        nn.Linear(hidden, n_way),
    )


def sample_conv_tasks(
    num_tasks: int,
    gen: torch.Generator,
    n_way: int = 5,
    k_shot: int = 1,
    n_query_per_class: int = 15,
    image_size: int = 28,
) -> list[Task]:
    """Sample synthetic N-way K-shot image tasks (random pixels, balanced labels)."""
    tasks = []
    for _ in range(num_tasks):
        xs = torch.randn(n_way * k_shot, 1, image_size, image_size, generator=gen)
        xq = torch.randn(n_way * n_query_per_class, 1, image_size, image_size, generator=gen)
        ys = torch.arange(n_way).repeat_interleave(k_shot)
        yq = torch.arange(n_way).repeat_interleave(n_query_per_class)
        tasks.append(Task(xs, ys, xq, yq))
    return tasks


WORKLOADS: dict[str, Workload] = {
    "sine": Workload(
        name="sine",
        description="sine MLP 1-40-40-1 ReLU, 10 support / 10 query points, MSE",
        make_net=sine_mlp,
        sample_tasks=sample_sine_tasks,
        loss=F.mse_loss,
        inner_lr=0.01,
    ),
    "conv": Workload(
        name="conv",
        description=(
            "4-conv (64 filters, BN w/o running stats) 28x28x1, 5-way 1-shot, "
            "5 support / 75 query images, cross-entropy"
        ),
        make_net=conv4,
        sample_tasks=sample_conv_tasks,
        loss=F.cross_entropy,
        inner_lr=0.1,
    ),
}
