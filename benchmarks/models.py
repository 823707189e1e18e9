"""The two meta-learning workloads of the benchmark: sine regression and 5-way 1-shot conv.

The networks and task samplers are the shared ones of :mod:`workloads`; this module
only fixes the benchmark's sizes, losses and inner learning rates.

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

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from workloads import fewshot, sine

#: ``((x_support, y_support), (x_query, y_query))``.
Task = tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class Workload:
    """A network family, its task distribution, its loss and its inner learning rate."""

    name: str
    description: str
    make_net: Callable[[], nn.Module]
    sample_tasks: Callable[[int, torch.Generator], list[Task]]
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    inner_lr: float


def sample_sine_tasks(num_tasks: int, gen: torch.Generator) -> list[Task]:
    """Sine tasks with 10 support and 10 query points, drawn one task after another."""
    return [sine.sample_task(gen, shots=10, query_shots=10) for _ in range(num_tasks)]


def sample_conv_tasks(num_tasks: int, gen: torch.Generator) -> list[Task]:
    """5-way 1-shot episodes of random 28x28 images, 15 query images per class."""
    return fewshot.sample_episodes(gen, num_tasks, n_way=5, k_shot=1, query_per_class=15)


WORKLOADS: dict[str, Workload] = {
    "sine": Workload(
        name="sine",
        description="sine MLP 1-40-40-1 ReLU, 10 support / 10 query points, MSE",
        make_net=sine.make_mlp,
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
        make_net=fewshot.conv4,
        sample_tasks=sample_conv_tasks,
        loss=F.cross_entropy,
        inner_lr=0.1,
    ),
}
