"""Few-shot classification as a meta-learning problem for the shared runner, and its
evaluation: accuracy after test-time adaptation, mean and 95% confidence interval.

Training tasks are drawn from meta-train with the runner's generator; the periodic
validation uses ``val_tasks`` fixed meta-val episodes and the final test ``test_tasks``
fixed meta-test episodes (each set drawn from its own seed, in chunks, so large images
never sit in memory all at once). Test-time adaptation is the inner loop without a
meta-gradient: ``test_steps`` steps of the inner optimizer (plain GD at the inner lr,
the learned rates, or the torchopt optimizer) on each task, or on every task of a chunk
at once under ``torch.func.vmap`` with ``--vmap-tasks``
(:func:`recipes.common.evaluation.adaptation_curve`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from recipes.common.evaluation import adaptation_curve
from recipes.common.inner import InnerParams
from recipes.common.methods import MetricFn
from recipes.common.runner import LossFn
from recipes.fewshot.datasets import Splits
from recipes.fewshot.episodes import ClassPool, Episode, sample_episode, stack_episodes
from recipes.fewshot.models import make_model

__all__ = ["FewshotProblem", "accuracy", "mean_ci95"]


def accuracy(logits: Tensor, labels: Tensor) -> Tensor:
    """Fraction of correct argmax predictions."""
    return (logits.argmax(-1) == labels).float().mean()


def mean_ci95(values: Tensor) -> tuple[float, float]:
    """Mean and the half-width of its 95% normal confidence interval, ``1.96 s / sqrt(n)``."""
    values = values.double()
    n = values.numel()
    std = float(values.std()) if n > 1 else 0.0
    return float(values.mean()), 1.96 * std / math.sqrt(n)


class FewshotProblem:
    """N-way K-shot classification on ``splits`` (see the module docstring).

    Args:
        splits: the class pools.
        model: ``conv4`` or ``resnet12``; ``hidden``: its width.
        ways, shots, query: the episodes (``query`` images per class in the query set).
        eval_steps: adaptation steps of the periodic validation (the inner K).
        test_steps: adaptation steps at meta-test.
        val_tasks, test_tasks: how many fixed episodes each evaluation uses.
        chunk: episodes drawn (and, with ``vectorize``, adapted) together in evaluation.
        vectorize: adapt a chunk's episodes together under ``torch.func.vmap``.
        seed: seeds the fixed validation and test episodes (not the training stream).
    """

    def __init__(
        self,
        splits: Splits,
        *,
        model: str,
        hidden: int,
        ways: int,
        shots: int,
        query: int,
        eval_steps: int,
        test_steps: int,
        val_tasks: int,
        test_tasks: int,
        chunk: int,
        seed: int,
        device: torch.device,
        dtype: torch.dtype,
        vectorize: bool = False,
    ) -> None:
        self.splits, self.model_name, self.hidden = splits, model, hidden
        self.ways, self.shots, self.query = ways, shots, query
        self.eval_steps, self.test_steps = eval_steps, test_steps
        self.val_tasks, self.test_tasks, self.chunk = val_tasks, test_tasks, chunk
        self.seed, self.device, self.dtype = seed, device, dtype
        self.vectorize = vectorize

    def make_model(self) -> nn.Module:
        return make_model(
            self.model_name,
            ways=self.ways,
            channels=self.splits.channels,
            image_size=self.splits.size,
            hidden=self.hidden,
        )

    def loss_fn(self, model: nn.Module) -> LossFn:
        def loss(params: dict[str, Tensor], batch: tuple[Tensor, Tensor]) -> Tensor:
            x, y = batch
            return F.cross_entropy(torch.func.functional_call(model, params, (x,)), y)

        return loss

    def metric_fn(self, model: nn.Module) -> MetricFn:
        def metrics(params: dict[str, Tensor], batch: tuple[Tensor, Tensor]) -> dict[str, Tensor]:
            x, y = batch
            return {"accuracy": accuracy(torch.func.functional_call(model, params, (x,)), y)}

        return metrics

    def episode(self, pool: ClassPool, gen: torch.Generator) -> Episode:
        return sample_episode(pool, gen, ways=self.ways, shots=self.shots, query=self.query)

    def sample_tasks(self, generator: torch.Generator, n: int) -> list[Any]:
        return [self.episode(self.splits.train, generator) for _ in range(n)]

    def _chunks(self, pool: ClassPool, n: int, seed: int) -> Iterator[Episode]:
        gen = torch.Generator().manual_seed(seed)
        for start in range(0, n, self.chunk):
            yield stack_episodes(
                [self.episode(pool, gen) for _ in range(min(self.chunk, n - start))]
            )

    def accuracies(
        self, model: nn.Module, inner: InnerParams, split: str, steps: list[int]
    ) -> Tensor:
        """Query accuracy of every fixed episode of ``split`` (``val`` / ``test``) after each
        number of adaptation steps: ``(tasks, len(steps))``."""
        pool = getattr(self.splits, split)
        n, seed = (self.val_tasks, self.seed + 2) if split == "val" else (
            self.test_tasks, self.seed + 3)  # fmt: skip
        rows = []
        for (xs, ys), (xq, yq) in self._chunks(pool, n, seed):
            cast: dict[str, Any] = {"device": self.device}
            rows.append(
                adaptation_curve(
                    model,
                    (xs.to(dtype=self.dtype, **cast), ys.to(**cast)),
                    (xq.to(dtype=self.dtype, **cast), yq.to(**cast)),
                    lr=inner.lr(detach=True),
                    adapt=inner.adapt,
                    optimizer=inner.optimizer,
                    eval_steps=steps,
                    metric=accuracy,
                    train_loss=F.cross_entropy,
                    vectorize=self.vectorize,
                ).cpu()
            )
        return torch.cat(rows)

    def evaluate(self, model: nn.Module, inner: InnerParams) -> dict[str, float]:
        acc = self.accuracies(model, inner, "val", [self.eval_steps])[:, 0]
        return {"val_accuracy": float(acc.mean())}
