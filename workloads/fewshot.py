"""Few-shot image classification: the 4-conv network and random N-way K-shot episodes.

The network is the standard one of the few-shot literature (Vinyals et al., 2016; Finn
et al., 2017) for 28x28x1 Omniglot-shaped inputs: 4 x [Conv2d(3x3, 64, padding 1),
BatchNorm2d(64, track_running_stats=False), ReLU, MaxPool2d(2)] (28 -> 14 -> 7 -> 3 -> 1),
then Linear(64, n_way); d = 112,261 parameters for 5 ways.

The episodes are synthetic: random pixels with balanced labels, so they measure what a
meta-gradient costs (time and memory do not depend on the pixel values), not accuracy.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["Batch", "Task", "conv4", "sample_episode", "sample_episodes"]

#: ``(images, labels)``.
Batch = tuple[Tensor, Tensor]
#: ``(support, query)``.
Task = tuple[Batch, Batch]


def _conv_block(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1),
        nn.BatchNorm2d(out_channels, track_running_stats=False),
        nn.ReLU(),
        nn.MaxPool2d(2),
    )


def conv4(
    n_way: int = 5, in_channels: int = 1, hidden: int = 64, image_size: int = 28
) -> nn.Sequential:
    """The 4-conv few-shot net (seed torch first for its initialization).

    Four poolings take ``image_size`` to ``image_size // 16`` (28 -> 1, 84 -> 5), so the
    head is ``Linear(hidden * (image_size // 16) ** 2, n_way)``.
    """
    side = image_size // 16
    if side < 1:
        raise ValueError(f"conv4 needs images of at least 16x16, got {image_size}")
    return nn.Sequential(
        _conv_block(in_channels, hidden),
        _conv_block(hidden, hidden),
        _conv_block(hidden, hidden),
        _conv_block(hidden, hidden),
        nn.Flatten(),
        nn.Linear(hidden * side * side, n_way),
    )


def sample_episode(
    gen: torch.Generator,
    n_way: int = 5,
    k_shot: int = 1,
    query_per_class: int = 15,
    image_size: int = 28,
) -> Task:
    """One episode ``((xs, ys), (xq, yq))`` of random images, classes in blocks.

    ``xs``: ``(n_way * k_shot, 1, image_size, image_size)`` standard normal pixels, labels
    ``0, .., 0, 1, ..`` (``k_shot`` each); ``xq`` likewise with ``query_per_class`` per
    class. Draws the support images, then the query images.
    """
    xs = torch.randn(n_way * k_shot, 1, image_size, image_size, generator=gen)
    xq = torch.randn(n_way * query_per_class, 1, image_size, image_size, generator=gen)
    ys = torch.arange(n_way).repeat_interleave(k_shot)
    yq = torch.arange(n_way).repeat_interleave(query_per_class)
    return (xs, ys), (xq, yq)


def sample_episodes(
    gen: torch.Generator,
    n_episodes: int,
    n_way: int = 5,
    k_shot: int = 1,
    query_per_class: int = 15,
    image_size: int = 28,
) -> list[Task]:
    """``n_episodes`` episodes of :func:`sample_episode`, one after another."""
    return [
        sample_episode(gen, n_way, k_shot, query_per_class, image_size) for _ in range(n_episodes)
    ]
