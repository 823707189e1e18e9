"""A-MAML's synthetic 2D regression families (Li et al., AISTATS 2023, section 5.1).

* CosMixture: :math:`f(x) = -0.1 \\sum_i A \\cos(\\omega x_i + \\phi) - \\sum_i x_i^2` on
  :math:`[-1, 1]^2`, with :math:`A \\in [0.1, 1]`, :math:`\\omega \\in [0.5\\pi, 2\\pi]`,
  :math:`\\phi \\in [3, 6]`;
* Alpine: :math:`f(x) = \\sum_i |x_i \\sin(x_i + \\phi_i) + 0.1 x_i|` on :math:`[-10, 10]^2`,
  with :math:`\\phi_i \\in [-5\\pi/12, 5\\pi/12]`.

Task parameters and inputs are uniform on their ranges. The model is an MLP
2-32-32-1 with tanh, trained with the mean squared error; evaluation reports the
normalized RMSE :math:`\\|\\hat y - y\\|_2 / \\|y\\|_2` of each task.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree

from recipes.common.evaluation import adaptation_curve, mse_loss_fn, nrmse
from recipes.common.inner import InnerParams
from recipes.common.runner import LossFn

__all__ = ["FAMILIES", "Family", "RegressionProblem", "make_mlp"]


@dataclass(frozen=True)
class Family:
    """A task family: input box, parameter sampler, and the function itself."""

    name: str
    box: tuple[float, float]
    sample_params: Callable[[torch.Generator, int], Tensor]  # (n, p)
    evaluate: Callable[[Tensor, Tensor], Tensor]  # (n, p), (n, m, 2) -> (n, m, 1)


def _u(gen: torch.Generator, n: int, lo: float, hi: float) -> Tensor:
    return lo + (hi - lo) * torch.rand(n, 1, generator=gen)


def _cosmixture_params(gen: torch.Generator, n: int) -> Tensor:
    return torch.cat(
        [_u(gen, n, 0.1, 1.0), _u(gen, n, 0.5 * math.pi, 2.0 * math.pi), _u(gen, n, 3.0, 6.0)], 1
    )


def _cosmixture(p: Tensor, x: Tensor) -> Tensor:
    A, w, phi = (p[:, i, None, None] for i in range(3))
    return (-0.1 * A * torch.cos(w * x + phi) - x**2).sum(-1, keepdim=True)


def _alpine_params(gen: torch.Generator, n: int) -> Tensor:
    bound = 5 * math.pi / 12
    return torch.cat([_u(gen, n, -bound, bound), _u(gen, n, -bound, bound)], 1)


def _alpine(p: Tensor, x: Tensor) -> Tensor:
    phi = p[:, None, :]
    return (x * torch.sin(x + phi) + 0.1 * x).abs().sum(-1, keepdim=True)


FAMILIES = {
    "cosmixture": Family("cosmixture", (-1.0, 1.0), _cosmixture_params, _cosmixture),
    "alpine": Family("alpine", (-10.0, 10.0), _alpine_params, _alpine),
}


def make_mlp() -> nn.Module:
    """MLP 2-32-32-1 with tanh (A-MAML's network), PyTorch's default initialization."""
    return nn.Sequential(
        nn.Linear(2, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 1)
    )


def sample_tasks(
    family: Family, gen: torch.Generator, n: int, sizes: tuple[int, ...]
) -> list[tuple[Tensor, Tensor]]:
    """``n`` tasks of ``family``; for each size in ``sizes`` a stacked ``(x, y)`` set."""
    params = family.sample_params(gen, n)
    lo, hi = family.box
    sets = []
    for m in sizes:
        x = lo + (hi - lo) * torch.rand(n, m, 2, generator=gen)
        sets.append((x, family.evaluate(params, x)))
    return sets


class RegressionProblem:
    """A-MAML's 2D regression meta-learning problem for the shared runner.

    Meta-training draws meta-batches from a fixed pool of ``train_tasks`` tasks (each
    with ``shots`` training and ``val_shots`` validation examples); evaluation adapts
    to ``test_tasks`` new tasks (``shots`` training examples, ``test_query`` held-out
    examples) by gradient descent and reports the nRMSE.
    """

    def __init__(
        self,
        family: Family,
        *,
        train_tasks: int,
        shots: int,
        val_shots: int,
        test_tasks: int,
        test_query: int,
        inner_lr: float,
        eval_steps: int,
        seed: int,
        device: torch.device,
        dtype: torch.dtype,
        eval_dtype: torch.dtype | None = None,
    ) -> None:
        self.family, self.inner_lr, self.eval_steps = family, inner_lr, eval_steps
        self.eval_dtype = eval_dtype or dtype
        cast: dict[str, Any] = {"device": device, "dtype": self.eval_dtype}
        pool_gen = torch.Generator().manual_seed(seed + 10)
        support, val = sample_tasks(family, pool_gen, train_tasks, (shots, val_shots))
        self.pool = [
            ((support[0][i], support[1][i]), (val[0][i], val[1][i])) for i in range(train_tasks)
        ]
        test_gen = torch.Generator().manual_seed(seed + 20)
        (xs, ys), (xq, yq) = sample_tasks(family, test_gen, test_tasks, (shots, test_query))
        self.test_support = (xs.to(**cast), ys.to(**cast))
        self.test_query = (xq.to(**cast), yq.to(**cast))

    def make_model(self) -> nn.Module:
        return make_mlp()

    def loss_fn(self, model: nn.Module) -> LossFn:
        return mse_loss_fn(model)

    def sample_tasks(self, generator: torch.Generator, n: int) -> list[Any]:
        index = torch.randperm(len(self.pool), generator=generator)[:n]
        return [self.pool[int(i)] for i in index]

    def test_curve(
        self, model: nn.Module, steps: list[int], inner: InnerParams | None = None
    ) -> Tensor:
        """nRMSE of every test task after each number of GD steps: ``(tasks, steps)``.

        GD with ``inner``'s step size and adapt list (default: ``inner_lr``, all), in
        ``eval_dtype`` (a float64 copy of a float32 model: hundreds of test-time steps
        on Alpine amplify float32 round-off into nRMSE differences of up to 0.24).
        """
        lr: Any = self.inner_lr if inner is None else inner.lr(detach=True)
        if next(model.parameters()).dtype != self.eval_dtype:
            model = copy.deepcopy(model).to(self.eval_dtype)
            lr = pytree.tree_map(
                lambda t: t.to(self.eval_dtype) if isinstance(t, Tensor) else t, lr
            )
        return adaptation_curve(
            model,
            self.test_support,
            self.test_query,
            lr=lr,
            adapt=None if inner is None else inner.adapt,
            optimizer=None if inner is None else inner.optimizer,
            eval_steps=steps,
            metric=nrmse,
        )

    def evaluate(self, model: nn.Module, inner: InnerParams) -> dict[str, float]:
        curve = self.test_curve(model, [self.eval_steps], inner)
        return {"test_nrmse": float(curve[:, 0].mean())}
