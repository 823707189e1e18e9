"""``Exact(snapshots=n)`` at long horizons: peak live memory and time against storing every
state, on the sine MLP and the 4-conv few-shot net.

For each model and each ``n`` (every state, ``sqrt(K)``, a fixed small count) it runs one
``tmg.adapt`` of K steps + the outer gradient, once under the live-tensor tracker (peak
bytes) and once timed (wall seconds; separate passes: the tracker slows every op), and
checks that the meta-gradient equals the store-everything one.

Usage: ``python benchmarks/bench_checkpoints.py [--steps 1000] [--models sine conv]``.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.func import functional_call

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torchopt_metagrad as tmg
from torchopt_metagrad.diagnostics import LiveMemoryTracker
from workloads import fewshot, sine


def _problem(name: str):  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    if name == "sine":
        net = sine.make_mlp()
        x = torch.linspace(-5, 5, 10).reshape(-1, 1)
        batch, lr = (x, torch.sin(x)), 1e-3

        def loss(p, b):  # type: ignore[no-untyped-def]
            return F.mse_loss(functional_call(net, p, (b[0],)), b[1])

        return net, loss, batch, batch, lr
    net = fewshot.conv4(hidden=32)
    (xs, ys), (xq, yq) = fewshot.sample_episode(torch.Generator().manual_seed(0), query_per_class=2)

    def loss(p, b):  # type: ignore[no-untyped-def]
        return F.cross_entropy(functional_call(net, p, (b[0],)), b[1])

    return net, loss, (xs, ys), (xq, yq), 1e-3


def _run(name: str, steps: int, snapshots: int | None, track: bool):  # type: ignore[no-untyped-def]
    net, loss, batch, query, lr = _problem(name)
    params = dict(net.named_parameters())
    rule = tmg.Exact(snapshots=snapshots)
    mem = LiveMemoryTracker()
    t0 = time.perf_counter()
    with mem if track else contextlib.nullcontext():
        out = tmg.adapt(loss, params, batch, steps=steps, lr=lr, rule=rule)
        grads = torch.autograd.grad(loss(out, query), list(params.values()))
    seconds = time.perf_counter() - t0
    d = sum(p.numel() for p in params.values())
    return grads, mem.peak_bytes if track else 0, seconds, d


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--models", nargs="+", default=["sine", "conv"])
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    K = args.steps
    print(
        f"Machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"1 thread. Command: python benchmarks/bench_checkpoints.py --steps {K} "
        f"--models {' '.join(args.models)}\n"
    )
    print(
        "| model | d | K | snapshots | peak live (MiB) | in snapshots | time (s) | max rel. diff |"
    )
    print("|---|---:|---:|---|---:|---:|---:|---:|")
    for name in args.models:
        _run(name, min(K, 20), None, track=False)  # warm-up
        ref = None
        for n in (None, round(math.sqrt(K)), 10):
            grads, _, seconds, d = _run(name, K, n, track=False)
            _, peak, _, _ = _run(name, K, n, track=True)
            if ref is None:
                ref, diff = grads, 0.0
            else:
                diff = max(
                    float((a - b).norm() / b.norm()) for a, b in zip(grads, ref, strict=True)
                )
            print(
                f"| {name} | {d} | {K} | {'all' if n is None else n} | {peak / 2**20:.1f} | "
                f"{peak / (4 * d):.0f} | {seconds:.1f} | {diff:.1e} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
