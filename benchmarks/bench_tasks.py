"""Tasks per second: a meta-batch of tasks, the per-task loop vs ``torch.func.vmap``.

One outer gradient = adapt every task (K steps) + query loss + backward. Times the loop
over tasks, ``torch.func.vmap`` over a function that calls ``tmg.adapt`` (per rule), and a
hand-written functional MAML under vmap (``torch.func.grad`` inner steps, plain autograd
outside: the floor for unrolled MAML). Interleaved, median of ``--repeats`` calls, one
CPU thread by default. Models (``--models``):

* ``sine``: the sine MLP 1-40-40-1 ReLU, 10 support / 10 query points, lr 0.01;
* ``cf``: the collaborative-filtering MLP 100-40-40-1 tanh on one-hot items (100 items),
  a user's ratings from a rank-5 model, 10 support / 10 query items, lr 0.01;
* ``conv``: the 4-conv net (64 filters, batch statistics), 5-way 1-shot 28x28, 5 support
  and ``--conv-query`` query images per class (default 5: 100 tasks' query batch stays
  within memory here), lr 0.1.

Usage: ``python benchmarks/bench_tasks.py [--models sine cf conv] [--tasks 1 5 25 100]``.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torchopt_metagrad as tmg
from workloads import fewshot, sine

DEFAULT_RULES = ["exact", "binomial:order=2", "first_order", "unrolled"]


def cf_mlp() -> nn.Module:
    """The collaborative-filtering MLP: 100 one-hot items -> 40 -> 40 -> 1, tanh."""
    return nn.Sequential(
        nn.Linear(100, 40), nn.Tanh(), nn.Linear(40, 40), nn.Tanh(), nn.Linear(40, 1)
    )


def cf_data(n: int, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    """``n`` users' 10 support / 10 query (item one-hot, rating) pairs, rank-5 ratings."""
    items = torch.randn(100, 5, generator=gen)
    users = torch.randn(n, 5, generator=gen)
    idx = torch.stack([torch.randperm(100, generator=gen)[:20] for _ in range(n)])
    x = torch.nn.functional.one_hot(idx, 100).float()
    y = (users[:, None, :] * items[idx]).sum(-1, keepdim=True) / 5**0.5
    return x[:, :10], y[:, :10], x[:, 10:], y[:, 10:]


def sine_data(n: int, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    x = torch.rand(n, 20, 1, generator=gen) * 10 - 5
    y = torch.sin(x)
    return x[:, :10], y[:, :10], x[:, 10:], y[:, 10:]


def conv_data(n: int, gen: torch.Generator, query: int) -> tuple[torch.Tensor, ...]:
    eps = fewshot.sample_episodes(gen, n, n_way=5, k_shot=1, query_per_class=query)
    return tuple(torch.stack([e[i][j] for e in eps]) for i in (0, 1) for j in (0, 1))


def models(args: argparse.Namespace) -> dict[str, tuple[Callable[[], nn.Module], Any, Any, float]]:
    """name -> (make net, loss, data(n, gen), inner lr)."""
    mse, ce = torch.nn.functional.mse_loss, torch.nn.functional.cross_entropy
    return {
        "sine": (sine.make_mlp, mse, sine_data, 0.01),
        "cf": (cf_mlp, mse, cf_data, 0.01),
        "conv": (fewshot.conv4, ce, lambda n, g: conv_data(n, g, args.conv_query), 0.1),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["sine"], choices=["sine", "cf", "conv"])
    parser.add_argument("--tasks", type=int, nargs="+", default=[1, 5, 25, 100])
    parser.add_argument("--rules", nargs="+", default=DEFAULT_RULES, help="tmg.parse_rule specs")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--conv-query", type=int, default=5, help="query images per class")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs shared with other jobs, "
        f"torch {torch.__version__}, {args.threads} thread(s); K = {args.steps}; median of "
        f"{args.repeats} interleaved calls.\n"
        f"Command: `python benchmarks/bench_tasks.py {' '.join(sys.argv[1:])}`\n"
    )
    print(
        "| model | tasks | rule | loop (tasks/s) | vmap (tasks/s) | vmap / loop "
        "| hand-written vmap MAML (tasks/s) |"
    )
    print("|:---|---:|:---|---:|---:|---:|---:|")
    for name in args.models:
        make, loss_of, data_of, lr = models(args)[name]
        torch.manual_seed(0)
        net = make()
        params = dict(net.named_parameters())

        def loss(p, b, net=net, loss_of=loss_of):  # type: ignore[no-untyped-def]
            return loss_of(functional_call(net, p, (b[0],)), b[1])

        for n in args.tasks:
            data = data_of(n, torch.Generator().manual_seed(n))
            for spec in args.rules:
                rule = tmg.parse_rule(spec)
                ms = _times(params, loss, rule, data, n, lr, args)
                tps = {k: 1e3 * n / v for k, v in ms.items()}
                print(
                    f"| {name} | {n} | {tmg.format_rule(rule)} | {tps['loop']:.1f} "
                    f"| {tps['vmap']:.1f} | {tps['vmap'] / tps['loop']:.2f} | {tps['hand']:.1f} |",
                    flush=True,
                )


def _times(params, loss, rule, data, n, lr, args):  # type: ignore[no-untyped-def]
    """Median ms of one outer gradient over ``n`` tasks: loop, vmap, hand-written vmap."""
    leaves = list(params.values())

    def hand_task(xs, ys, xq, yq):  # type: ignore[no-untyped-def]
        p = params
        for _ in range(args.steps):
            g = torch.func.grad(loss)(p, (xs, ys))
            p = {k: p[k] - lr * g[k] for k in p}
        return loss(p, (xq, yq))

    def task(xs, ys, xq, yq):  # type: ignore[no-untyped-def]
        out = tmg.adapt(loss, params, (xs, ys), steps=args.steps, lr=lr, rule=rule)
        return loss(out, (xq, yq))

    def hand() -> None:
        torch.autograd.grad(torch.func.vmap(hand_task)(*data).sum(), leaves)

    def loop() -> None:
        total = sum(task(*(t[b] for t in data)) for b in range(n))
        torch.autograd.grad(total, leaves)

    def vm() -> None:
        torch.autograd.grad(torch.func.vmap(task)(*data).sum(), leaves)

    return _interleaved({"loop": loop, "vmap": vm, "hand": hand}, args.repeats)


def _interleaved(fns: dict[str, Callable[[], None]], repeats: int) -> dict[str, float]:
    for fn in fns.values():
        fn()  # warm-up
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append((time.perf_counter() - t0) * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


if __name__ == "__main__":
    main()
