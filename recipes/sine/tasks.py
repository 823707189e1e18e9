"""Sine regression tasks and the network (Finn et al., 2017; BinomMAML's estimator study).

A task is ``y = A sin(x + b)`` with amplitude ``A ~ U[0.1, 5]``, phase ``b ~ U[0, pi]``
and inputs ``x ~ U[-5, 5]``; the model is an MLP 1-40-40-1 with ReLU at PyTorch's
default initialization, trained with the mean squared error.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from recipes.common.evaluation import adaptation_curve, mse_loss_fn
from recipes.common.runner import LossFn

__all__ = ["SineProblem", "make_mlp", "mse_loss_fn", "sample_sine"]

AMPLITUDE = (0.1, 5.0)
PHASE = (0.0, math.pi)
INPUT = (-5.0, 5.0)


def _uniform(gen: torch.Generator, shape: tuple[int, ...], lo: float, hi: float) -> Tensor:
    return lo + (hi - lo) * torch.rand(shape, generator=gen)


def sample_sine(
    gen: torch.Generator, n_tasks: int, shots: int, query_shots: int
) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """``n_tasks`` sine tasks, stacked: ``((xs, ys), (xq, yq))``, shapes ``(n, shots, 1)``."""
    amplitude = _uniform(gen, (n_tasks, 1, 1), *AMPLITUDE)
    phase = _uniform(gen, (n_tasks, 1, 1), *PHASE)
    xs = _uniform(gen, (n_tasks, shots, 1), *INPUT)
    xq = _uniform(gen, (n_tasks, query_shots, 1), *INPUT)
    return (xs, amplitude * torch.sin(xs + phase)), (xq, amplitude * torch.sin(xq + phase))


def make_mlp() -> nn.Module:
    """MLP 1-40-40-1, ReLU, PyTorch's default initialization."""
    return nn.Sequential(
        nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 1)
    )


def unstack(tasks: tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]) -> list[Any]:
    """Stacked ``((xs, ys), (xq, yq))`` -> a list of per-task ``((x, y), (x, y))``."""
    (xs, ys), (xq, yq) = tasks
    return [((xs[i], ys[i]), (xq[i], yq[i])) for i in range(xs.shape[0])]


class SineProblem:
    """The sine meta-learning problem for the shared runner.

    Args:
        shots: support points per task.
        query_shots: query points per task.
        test_tasks: number of held-out tasks for evaluation (drawn once from ``seed``).
        eval_steps: adaptation steps at which the periodic evaluation measures the loss.
        inner_lr: test-time gradient-descent step size.
        seed: seed of the held-out tasks (independent of the training task stream).
    """

    def __init__(
        self,
        *,
        shots: int,
        query_shots: int,
        test_tasks: int,
        eval_steps: int,
        inner_lr: float,
        seed: int,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        self.shots, self.query_shots = shots, query_shots
        self.eval_steps, self.inner_lr = eval_steps, inner_lr
        gen = torch.Generator().manual_seed(seed + 2)
        (xs, ys), (xq, yq) = sample_sine(gen, test_tasks, shots, query_shots)
        cast: dict[str, Any] = {"device": device, "dtype": dtype}
        self.test_support = (xs.to(**cast), ys.to(**cast))
        self.test_query = (xq.to(**cast), yq.to(**cast))

    def make_model(self) -> nn.Module:
        return make_mlp()

    def loss_fn(self, model: nn.Module) -> LossFn:
        return mse_loss_fn(model)

    def sample_tasks(self, generator: torch.Generator, n: int) -> list[Any]:
        return unstack(sample_sine(generator, n, self.shots, self.query_shots))

    def test_curve(self, model: nn.Module, steps: list[int]) -> Tensor:
        """Query MSE of every held-out task after each number of steps: ``(tasks, steps)``."""
        return adaptation_curve(
            model, self.test_support, self.test_query, lr=self.inner_lr, eval_steps=steps
        )

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        losses = self.test_curve(model, [self.eval_steps])[:, 0]
        return {"meta_test_loss": float(losses.mean())}
