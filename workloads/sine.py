r"""Sine regression (Finn et al., 2017, "Model-Agnostic Meta-Learning", section 5.1).

A task is :math:`y = A \sin(x + b)` with amplitude :math:`A \sim U[0.1, 5]`, phase
:math:`b \sim U[0, \pi]` and inputs :math:`x \sim U[-5, 5]`; the model is an MLP
1-40-40-1 with ReLU at PyTorch's default initialization (d = 1,761 parameters),
trained with the mean squared error.

Two sampling orders, both kept because published numbers depend on them:
:func:`sample_task` draws one task at a time (amplitude, phase, support inputs, query
inputs), :func:`sample_tasks` draws a stacked batch (all amplitudes, then all phases,
then all support inputs, then all query inputs).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = [
    "AMPLITUDE",
    "INPUT",
    "PHASE",
    "Batch",
    "Task",
    "make_mlp",
    "sample_task",
    "sample_tasks",
    "unstack",
]

AMPLITUDE = (0.1, 5.0)
PHASE = (0.0, math.pi)
INPUT = (-5.0, 5.0)

#: ``(x, y)``: inputs and targets.
Batch = tuple[Tensor, Tensor]
#: ``(support, query)``: the batch the inner loop trains on, the one the outer loss uses.
Task = tuple[Batch, Batch]


def make_mlp() -> nn.Module:
    """MLP 1-40-40-1 with ReLU, PyTorch's default initialization (seed torch first)."""
    return nn.Sequential(
        nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 1)
    )


def _uniform(gen: torch.Generator, shape: tuple[int, ...], lo: float, hi: float) -> Tensor:
    return lo + (hi - lo) * torch.rand(shape, generator=gen)


def sample_task(gen: torch.Generator, shots: int = 10, query_shots: int = 10) -> Task:
    """One task ``((xs, ys), (xq, yq))``, shapes ``(shots, 1)`` and ``(query_shots, 1)``.

    Draws, in this order: the amplitude, the phase, the support inputs, the query inputs.
    """
    amplitude = _uniform(gen, (), *AMPLITUDE)
    phase = _uniform(gen, (), *PHASE)
    xs = _uniform(gen, (shots, 1), *INPUT)
    xq = _uniform(gen, (query_shots, 1), *INPUT)
    return (xs, amplitude * torch.sin(xs + phase)), (xq, amplitude * torch.sin(xq + phase))


def sample_tasks(
    gen: torch.Generator, n_tasks: int, shots: int = 10, query_shots: int = 10
) -> tuple[Batch, Batch]:
    """``n_tasks`` tasks stacked: ``((xs, ys), (xq, yq))``, shapes ``(n_tasks, shots, 1)``.

    Draws, in this order: all amplitudes, all phases, all support inputs, all query
    inputs (not the tasks of :func:`sample_task` one after another).
    """
    amplitude = _uniform(gen, (n_tasks, 1, 1), *AMPLITUDE)
    phase = _uniform(gen, (n_tasks, 1, 1), *PHASE)
    xs = _uniform(gen, (n_tasks, shots, 1), *INPUT)
    xq = _uniform(gen, (n_tasks, query_shots, 1), *INPUT)
    return (xs, amplitude * torch.sin(xs + phase)), (xq, amplitude * torch.sin(xq + phase))


def unstack(tasks: tuple[Batch, Batch]) -> list[Task]:
    """Stacked ``((xs, ys), (xq, yq))`` -> the list of per-task ``((x, y), (x, y))``."""
    (xs, ys), (xq, yq) = tasks
    return [((xs[i], ys[i]), (xq[i], yq[i])) for i in range(xs.shape[0])]
