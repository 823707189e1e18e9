r"""Synthetic stand-ins for MovieLens-1M and Jester-1 (the real files are not on this machine).

These are **synthetic data**, not the datasets: they only share the published shape of
each dataset (users, items, ratings per user, rating scale and, for MovieLens-1M, the
histogram of the stars), so the recipe's pipeline and the methods' ranking can be
exercised at the same scale. Numbers measured on them say nothing about the real data.

Generator (deterministic from ``seed``, one ``torch.Generator``):

* item popularity :math:`w_i = \exp(\sigma_{pop} z_i)`, :math:`z_i \sim N(0, 1)`; every
  user rates :math:`n_u` distinct items drawn with probabilities :math:`\propto w_i`;
* :math:`n_u = n_{\min} + \lfloor \exp(\mu + s\, z_u) \rfloor`, capped at the item count;
* a low-rank score :math:`s_{ui} = a_i + b_u + p_u^\top q_i / \sqrt r + \epsilon_{ui}`,
  every term standard normal times its scale (``SPREAD``), rank :math:`r = 5`;
* ratings from the scores: MovieLens, the stars 1..5 by the score's quantiles so that the
  star histogram is the published one exactly; Jester, the standardized score times the
  target std plus the target mean, clipped to [-10, 10].

Published statistics used (MovieLens-1M: GroupLens' README and the file itself; Jester-1:
Goldberg et al. 2001 and the dataset page): MovieLens-1M 6,040 users, 3,706 rated movies,
1,000,209 ratings, at least 20 per user, stars 1-5 with counts 56,174 / 107,557 /
261,197 / 348,971 / 226,310. Jester-1 24,983 users, 100 jokes, at least 36 ratings per
user, ratings in [-10, 10], about 1.81 million ratings (72.5 per user on average).
Assumed (not published figures we could check here): the per-user count's log-normal
spread, the popularity spread, Jester's rating mean 1.0 and std 5.3, and ``SPREAD``.
``python -m recipes.collab_filter --dataset synthetic-ml-1m ...`` prints the generated
data's statistics.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from recipes.collab_filter.loaders import JESTER_SCALE, MOVIELENS_SCALE, Ratings

__all__ = ["SYNTHETIC", "SyntheticSpec", "generate", "stats"]

#: Scales of the score's terms: item bias, user bias, user x item factors, noise.
SPREAD = {"item": 0.6, "user": 0.5, "factors": 0.5, "noise": 0.4}
RANK = 5


@dataclass(frozen=True)
class SyntheticSpec:
    """The shape of a synthetic ratings set (see the module docstring)."""

    name: str
    users: int
    items: int
    min_per_user: int
    mean_per_user: float  # mean of n_u before the cap at ``items``
    spread_per_user: float  # s of the log-normal part of n_u
    popularity: float  # sigma_pop
    scale: tuple[float, float]
    star_counts: tuple[int, ...] = ()  # discrete stars lo..hi, their published counts
    mean: float = 0.0  # continuous ratings: target mean and std
    std: float = 1.0


SYNTHETIC = {
    "synthetic-ml-1m": SyntheticSpec(
        "synthetic-ml-1m", users=6040, items=3706, min_per_user=20,
        mean_per_user=1_000_209 / 6040, spread_per_user=1.1, popularity=1.3,
        scale=MOVIELENS_SCALE, star_counts=(56_174, 107_557, 261_197, 348_971, 226_310),
    ),
    "synthetic-jester-1": SyntheticSpec(
        "synthetic-jester-1", users=24_983, items=100, min_per_user=36,
        mean_per_user=72.5, spread_per_user=0.8, popularity=0.6,
        scale=JESTER_SCALE, mean=1.0, std=5.3,
    ),
}  # fmt: skip


def generate(spec: SyntheticSpec, seed: int = 0) -> Ratings:
    """The synthetic ratings of ``spec``, the same for the same ``seed``."""
    gen = torch.Generator().manual_seed(seed)

    def normal(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    weights = torch.exp(spec.popularity * normal(spec.items))
    extra = spec.mean_per_user - spec.min_per_user
    s = spec.spread_per_user
    mu = math.log(extra) - s * s / 2  # E[exp(mu + s z)] = extra
    per_user = spec.min_per_user + torch.exp(mu + s * normal(spec.users)).floor().long()
    per_user = per_user.clamp(max=spec.items)
    items = [torch.multinomial(weights, int(n), generator=gen) for n in per_user]
    user = torch.repeat_interleave(torch.arange(spec.users), per_user)
    item = torch.cat(items)
    a, b = SPREAD["item"] * normal(spec.items), SPREAD["user"] * normal(spec.users)
    p, q = normal(spec.users, RANK), normal(spec.items, RANK)
    score = (
        a[item]
        + b[user]
        + SPREAD["factors"] * (p[user] * q[item]).sum(1) / math.sqrt(RANK)
        + SPREAD["noise"] * normal(item.numel())
    )
    if spec.star_counts:
        rating = _stars(score, spec.star_counts, spec.scale[0])
    else:
        z = (score - score.mean()) / score.std()
        rating = (spec.mean + spec.std * z).clamp(*spec.scale)
    return Ratings(
        user=user,
        item=item,
        rating=rating,
        user_ids=tuple(str(u) for u in range(spec.users)),
        item_ids=tuple(str(i) for i in range(spec.items)),
        scale=spec.scale,
        source=f"{spec.name} (synthetic, seed {seed})",
    )


def _stars(score: torch.Tensor, counts: tuple[int, ...], lowest: float) -> torch.Tensor:
    """Stars ``lowest, lowest+1, ...`` by the score's quantiles, in the ratio of ``counts``."""
    share = torch.tensor(counts, dtype=torch.float64)
    bounds = (torch.cumsum(share, 0)[:-1] / share.sum() * score.numel()).round().long()
    rank = torch.empty_like(score, dtype=torch.long)
    rank[torch.argsort(score, stable=True)] = torch.arange(score.numel())
    return lowest + torch.bucketize(rank, bounds, right=True).to(torch.float64)


def stats(r: Ratings) -> dict[str, float]:
    """Summary statistics of a ratings set (to compare with the published ones)."""
    per_user = torch.bincount(r.user).double()
    per_item = torch.bincount(r.item).double()
    return {
        "users": len(r.user_ids),
        "items": len(r.item_ids),
        "ratings": len(r),
        "ratings_per_user_min": float(per_user.min()),
        "ratings_per_user_median": float(per_user.median()),
        "ratings_per_user_mean": float(per_user.mean()),
        "most_rated_item": float(per_item.max()),
        "rating_mean": float(r.rating.mean()),
        "rating_std": float(r.rating.std()),
    }


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    """``python -m recipes.collab_filter.synthetic [--seed N]``: every stand-in's statistics
    and its task count under the paper's preprocessing (100 items, >= 20 ratings)."""
    import argparse

    from recipes.collab_filter.tasks import build_tasks

    parser = argparse.ArgumentParser(prog="python -m recipes.collab_filter.synthetic")
    parser.add_argument("--seed", type=int, default=0, help="the data seed (default 0)")
    seed = parser.parse_args(argv).seed
    found = {}
    for name, spec in SYNTHETIC.items():
        ratings = generate(spec, seed)
        sizes = build_tasks(ratings).sizes()
        found[name] = {
            **stats(ratings),
            "tasks": float(len(sizes)),
            "tasks_25": float((sizes >= 25).sum()),
            "tasks_50": float((sizes >= 50).sum()),
        }
        print(name, ", ".join(f"{k} {v:g}" for k, v in found[name].items()), flush=True)
    return found


if __name__ == "__main__":
    main()
