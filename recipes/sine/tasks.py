"""The sine problem for the shared runner (Finn et al., 2017; BinomMAML's estimator study).

The tasks and the network are :mod:`workloads.sine`'s (``y = A sin(x + b)``, the MLP
1-40-40-1 with ReLU); the loss is the mean squared error.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from recipes.common.evaluation import adaptation_curve, mse_loss_fn
from recipes.common.inner import InnerParams
from recipes.common.runner import LossFn
from workloads.sine import make_mlp, sample_tasks, unstack

__all__ = ["SineProblem"]


class SineProblem:
    """The sine meta-learning problem for the shared runner.

    Args:
        shots: support points per task.
        query_shots: query points per task.
        test_tasks: number of held-out tasks for evaluation (drawn once from ``seed``).
        eval_steps: adaptation steps at which the periodic evaluation measures the loss.
        seed: seed of the held-out tasks (independent of the training task stream).
    """

    def __init__(
        self,
        *,
        shots: int,
        query_shots: int,
        test_tasks: int,
        eval_steps: int,
        seed: int,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        self.shots, self.query_shots = shots, query_shots
        self.eval_steps = eval_steps
        gen = torch.Generator().manual_seed(seed + 2)
        (xs, ys), (xq, yq) = sample_tasks(gen, test_tasks, shots, query_shots)
        cast: dict[str, Any] = {"device": device, "dtype": dtype}
        self.test_support = (xs.to(**cast), ys.to(**cast))
        self.test_query = (xq.to(**cast), yq.to(**cast))

    def make_model(self) -> nn.Module:
        return make_mlp()

    def loss_fn(self, model: nn.Module) -> LossFn:
        return mse_loss_fn(model)

    def sample_tasks(self, generator: torch.Generator, n: int) -> list[Any]:
        return unstack(sample_tasks(generator, n, self.shots, self.query_shots))

    def test_curve(self, model: nn.Module, steps: list[int], inner: InnerParams) -> Tensor:
        """Query MSE of every held-out task after each number of steps: ``(tasks, steps)``.

        Adaptation is plain gradient descent with ``inner``'s step size (the fixed one,
        or the learned rates) on ``inner``'s adapted parameters (all, or ANIL's last layer).
        """
        return adaptation_curve(
            model,
            self.test_support,
            self.test_query,
            lr=inner.lr(detach=True),
            adapt=inner.adapt,
            optimizer=inner.optimizer,
            eval_steps=steps,
        )

    def evaluate(self, model: nn.Module, inner: InnerParams) -> dict[str, float]:
        losses = self.test_curve(model, [self.eval_steps], inner)[:, 0]
        return {"meta_test_loss": float(losses.mean())}
