"""Tasks per second: a meta-batch of sine tasks, the per-task loop vs ``torch.func.vmap``.

One outer gradient = adapt every task (K steps) + query loss + backward. Times the loop
over tasks, ``torch.func.vmap`` over a function that calls ``tmg.adapt`` (per rule), and a
hand-written functional MAML under vmap (``torch.func.grad`` inner steps, plain autograd
outside: the floor for unrolled MAML). Interleaved, median of ``--repeats`` calls, one
CPU thread by default.

Usage: ``python benchmarks/bench_tasks.py [--tasks 1 5 25 100] [--steps 5] [--threads 1]``.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.func import functional_call

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torchopt_metagrad as tmg
from workloads import sine

RULES = {
    "Exact": tmg.Exact,
    "Binomial(2)": lambda: tmg.Binomial(2),
    "FirstOrder": tmg.FirstOrder,
    "Unrolled": tmg.Unrolled,
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, nargs="+", default=[1, 5, 25, 100])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    net = sine.make_mlp()
    params = dict(net.named_parameters())

    def loss(p, b):  # type: ignore[no-untyped-def]
        return torch.nn.functional.mse_loss(functional_call(net, p, (b[0],)), b[1])

    print(
        f"Machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{args.threads} thread(s); sine MLP (d = {sum(t.numel() for t in params.values())}), "
        f"K = {args.steps}, 10 support / 10 query points per task."
    )
    print(
        f"Command: python benchmarks/bench_tasks.py --tasks {' '.join(map(str, args.tasks))} "
        f"--steps {args.steps} --threads {args.threads}\n"
    )
    print("| tasks | rule | loop (ms) | vmap (ms) | loop / vmap | hand-written vmap MAML (ms) |")
    print("|---:|---|---:|---:|---:|---:|")
    for n in args.tasks:
        for name, make in RULES.items():
            times = _times(net, params, loss, make(), n, args)
            print(
                f"| {n} | {name} | {times['loop']:.1f} | {times['vmap']:.1f} | "
                f"{times['loop'] / times['vmap']:.1f} | {times['hand']:.1f} |",
                flush=True,
            )


def _times(net, params, loss, rule, n, args):  # type: ignore[no-untyped-def]
    """Median ms of one outer gradient over ``n`` tasks: loop, vmap, hand-written vmap."""
    leaves = list(params.values())
    x = torch.rand(n, 20, 1) * 10 - 5
    y = torch.sin(x)
    data = (x[:, :10], y[:, :10], x[:, 10:], y[:, 10:])

    def hand_task(xs, ys, xq, yq):  # type: ignore[no-untyped-def]
        p = params
        for _ in range(args.steps):
            g = torch.func.grad(loss)(p, (xs, ys))
            p = {k: p[k] - args.lr * g[k] for k in p}
        return loss(p, (xq, yq))

    def task(xs, ys, xq, yq):  # type: ignore[no-untyped-def]
        out = tmg.adapt(loss, params, (xs, ys), steps=args.steps, lr=args.lr, rule=rule)
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
