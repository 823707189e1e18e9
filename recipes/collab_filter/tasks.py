r"""The A-MAML paper's collaborative-filtering tasks and the meta-learning problem.

Preprocessing (Li et al., AISTATS 2023, section 5.3, after Denevi et al.): keep the
``n_items`` most-rated items (ties broken by first appearance in the file), keep the
users with at least ``min_ratings`` ratings among them, one task per user: input the
one-hot code of the item (``n_items``-dimensional, index = the item's popularity rank),
output the rating.

Split (deterministic from the seed): ``test_tasks`` tasks are held out for the
meta-test, drawn among the tasks with more than ``shots`` ratings (each needs at least
one rating to score); at test time a task trains on ``shots`` of its ratings and is
scored on all the others, as in the paper. The other tasks are the meta-training tasks.

Meta-training draws, for each meta-batch, ``meta_batch`` distinct meta-training tasks;
a drawn task with fewer than ``shots + query`` ratings is *resampled*, i.e. replaced by
another draw. Drawing uniformly and redrawing the too-small ones is the same distribution
as drawing uniformly among the tasks with at least ``shots + query`` ratings, which is
what :meth:`CollabFilterProblem.sample_tasks` does (so the too-small tasks are never
used for meta-training). Each draw splits the task's ratings afresh: a random
``shots`` of them for the inner loop, another ``query`` for the outer (validation) loss.

Metric: the normalized RMSE of a task,
:math:`\mathrm{nRMSE} = \sqrt{\tfrac1m \sum_j (\hat y_j - y_j)^2} / (r_{\max} - r_{\min})`,
the RMSE over its scored ratings divided by the width of the dataset's rating scale
(4 for MovieLens' 1..5 stars, 20 for Jester's -10..10); the paper does not define its
nRMSE for these tables, so this is our choice. The raw RMSE is reported beside it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from recipes.collab_filter.loaders import Ratings
from recipes.common.evaluation import adaptation_curve, mse, mse_loss_fn
from recipes.common.inner import InnerParams
from recipes.common.runner import LossFn

__all__ = ["CollabFilterProblem", "Tasks", "build_tasks", "make_mlp", "masked_rmse"]


@dataclass(frozen=True)
class Tasks:
    """One task per kept user: the item indices (popularity ranks) and the ratings.

    Attributes:
        items: per task, ``(m,)`` long item indices in ``[0, n_items)``.
        ratings: per task, ``(m,)`` float64 ratings.
        users: per task, the user's id in the file.
        item_ids: the kept items' ids, most-rated first (index = one-hot position).
        scale: the rating scale.
    """

    items: list[Tensor]
    ratings: list[Tensor]
    users: list[str]
    item_ids: tuple[str, ...]
    scale: tuple[float, float]

    def __len__(self) -> int:
        return len(self.items)

    def sizes(self) -> Tensor:
        """Ratings per task."""
        return torch.tensor([len(r) for r in self.ratings])


def build_tasks(ratings: Ratings, n_items: int = 100, min_ratings: int = 20) -> Tasks:
    """The paper's preprocessing (see the module docstring).

    Raises:
        ValueError: fewer than ``n_items`` items in the data, or no user left.
    """
    n_all = len(ratings.item_ids)
    if n_items < 1 or n_items > n_all:
        raise ValueError(f"--items {n_items}: the data has {n_all} items")
    counts = torch.bincount(ratings.item, minlength=n_all)
    # most-rated first; ties by first appearance (a stable sort of the item codes)
    order = torch.sort(-counts, stable=True).indices[:n_items]
    rank = torch.full((n_all,), -1, dtype=torch.long)
    rank[order] = torch.arange(n_items)
    keep = rank[ratings.item] >= 0
    user, item, rating = ratings.user[keep], rank[ratings.item[keep]], ratings.rating[keep]
    per_user = torch.bincount(user, minlength=len(ratings.user_ids))
    kept = torch.nonzero(per_user >= min_ratings).flatten()
    if kept.numel() == 0:
        raise ValueError(
            f"no user has >= {min_ratings} ratings among the {n_items} most-rated items"
        )
    by_user = torch.sort(user, stable=True)
    starts = torch.cumsum(per_user, 0) - per_user
    items, values = item[by_user.indices], rating[by_user.indices]
    tasks_items, tasks_ratings = [], []
    for u in kept.tolist():
        s, n = int(starts[u]), int(per_user[u])
        tasks_items.append(items[s : s + n].clone())
        tasks_ratings.append(values[s : s + n].clone())
    return Tasks(
        items=tasks_items,
        ratings=tasks_ratings,
        users=[ratings.user_ids[u] for u in kept.tolist()],
        item_ids=tuple(ratings.item_ids[int(i)] for i in order),
        scale=ratings.scale,
    )


def make_mlp(n_items: int = 100, hidden: int = 40) -> nn.Module:
    """The paper's network: one-hot item -> 40 -> 40 -> rating, tanh."""
    return nn.Sequential(
        nn.Linear(n_items, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(),
        nn.Linear(hidden, 1),
    )  # fmt: skip


def masked_rmse(pred: Tensor, target: Tensor) -> Tensor:
    """RMSE of ``pred`` ``(m, 1)`` against ``target`` ``(m, 2)`` = (rating, weight 0/1):
    the padded rows (weight 0) do not count."""
    weight = target[..., 1:]
    err = ((pred - target[..., :1]) ** 2 * weight).sum() / weight.sum()
    return err.sqrt()


class CollabFilterProblem:
    """The collaborative-filtering meta-learning problem for the shared runner."""

    def __init__(
        self,
        tasks: Tasks,
        *,
        shots: int,
        query: int,
        test_tasks: int,
        inner_lr: float,
        eval_steps: int,
        seed: int,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        self.tasks, self.shots, self.query = tasks, shots, query
        self.inner_lr, self.eval_steps = inner_lr, eval_steps
        self.n_items = len(tasks.item_ids)
        self.cast: dict[str, Any] = {"device": device, "dtype": dtype}
        sizes = tasks.sizes()
        testable = torch.nonzero(sizes > shots).flatten()
        if testable.numel() < test_tasks:
            raise ValueError(
                f"--test-tasks {test_tasks}: only {testable.numel()} tasks have more than "
                f"--shots {shots} ratings"
            )
        split = torch.Generator().manual_seed(seed + 20)
        self.test_index = testable[torch.randperm(testable.numel(), generator=split)][:test_tasks]
        is_test = torch.zeros(len(tasks), dtype=torch.bool)
        is_test[self.test_index] = True
        self.train_index = torch.nonzero(~is_test).flatten()
        self.pool = self.train_index[sizes[self.train_index] >= shots + query]
        if self.pool.numel() == 0:
            raise ValueError(
                f"no meta-training task has --shots + --query-shots = {shots + query} ratings"
            )
        self.test_support, self.test_query = self._test_sets(split)

    def counts(self) -> dict[str, int]:
        """How many tasks there are, are held out, and can be drawn for meta-training."""
        return {
            "tasks": len(self.tasks),
            "test_tasks": int(self.test_index.numel()),
            "train_tasks": int(self.train_index.numel()),
            "train_tasks_drawable": int(self.pool.numel()),
            "train_tasks_too_small": int(self.train_index.numel() - self.pool.numel()),
        }

    def _one_hot(self, items: Tensor) -> Tensor:
        return torch.nn.functional.one_hot(items, self.n_items).to(torch.float64)

    def _test_sets(self, gen: torch.Generator) -> tuple[tuple[Tensor, Tensor], ...]:
        """Support ``(n, shots, items)`` / ``(n, shots, 1)``; scored set padded to the
        longest, its targets ``(n, m, 2)`` = (rating, 1) and (0, 0) for padding."""
        xs, ys, xq, yq = [], [], [], []
        longest = int(self.tasks.sizes()[self.test_index].max()) - self.shots
        for t in self.test_index.tolist():
            items, ratings = self.tasks.items[t], self.tasks.ratings[t]
            perm = torch.randperm(len(items), generator=gen)
            s, q = perm[: self.shots], perm[self.shots :]
            xs.append(self._one_hot(items[s]))
            ys.append(ratings[s, None])
            pad = longest - len(q)
            xq.append(torch.cat([self._one_hot(items[q]), torch.zeros(pad, self.n_items)]))
            target = torch.stack([ratings[q], torch.ones(len(q), dtype=torch.float64)], 1)
            yq.append(torch.cat([target, torch.zeros(pad, 2, dtype=torch.float64)]))
        support = (torch.stack(xs).to(**self.cast), torch.stack(ys).to(**self.cast))
        return support, (torch.stack(xq).to(**self.cast), torch.stack(yq).to(**self.cast))

    def make_model(self) -> nn.Module:
        return make_mlp(self.n_items)

    def loss_fn(self, model: nn.Module) -> LossFn:
        return mse_loss_fn(model)

    def sample_tasks(self, generator: torch.Generator, n: int) -> list[Any]:
        """``n`` distinct drawable meta-training tasks, each split afresh into ``shots``
        support and ``query`` validation ratings."""
        if n > self.pool.numel():
            raise ValueError(
                f"--meta-batch {n}: only {self.pool.numel()} meta-training tasks have "
                f"{self.shots + self.query} ratings"
            )
        chosen = self.pool[torch.randperm(self.pool.numel(), generator=generator)[:n]]
        out = []
        for t in chosen.tolist():
            items, ratings = self.tasks.items[t], self.tasks.ratings[t]
            perm = torch.randperm(len(items), generator=generator)
            s, q = perm[: self.shots], perm[self.shots : self.shots + self.query]
            out.append(
                (
                    (self._one_hot(items[s]), ratings[s, None]),
                    (self._one_hot(items[q]), ratings[q, None]),
                )
            )
        return out

    def test_curve(
        self, model: nn.Module, steps: list[int], inner: InnerParams | None = None
    ) -> Tensor:
        """RMSE of every test task after each number of GD steps: ``(tasks, steps)``."""
        return adaptation_curve(
            model,
            self.test_support,
            self.test_query,
            lr=self.inner_lr if inner is None else inner.lr(detach=True),
            adapt=None if inner is None else inner.adapt,
            optimizer=None if inner is None else inner.optimizer,
            eval_steps=steps,
            metric=masked_rmse,
            train_loss=mse,
        )

    @property
    def scale_width(self) -> float:
        lo, hi = self.tasks.scale
        return hi - lo

    def evaluate(self, model: nn.Module, inner: InnerParams) -> dict[str, float]:
        curve = self.test_curve(model, [self.eval_steps], inner) / self.scale_width
        return {"test_nrmse": float(curve[:, 0].mean())}
