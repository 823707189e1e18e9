#!/usr/bin/env python
"""``Exact`` against the fastest snapshot-only exact meta-gradient written by hand.

The hand-written floor: a graph-free forward that snapshots the parameters before each
step (one gradient per step), the outer gradient, then a reverse pass that rebuilds each
step's gradient from its snapshot (``create_graph=True``) and does one VJP with it
(``v <- v - lr * H_k v``): one extra gradient per step over unrolled backprop, nothing
kept but the snapshots. Sides, interleaved (rotating order) for ``--repeats`` rounds:
torchopt's unrolled ``MetaSGD`` (the reference), the floor, and ``tmg.adapt`` with each
rule of ``--rules`` (default ``exact``). Reported: median time per call and its ratio to
torchopt and to the floor; peak live tensor bytes (``LiveMemoryTracker``, one extra call)
at each K, and the growth per extra inner step against torchopt's.

    python benchmarks/bench_exact_floor.py --models conv --ks 10 20 --repeats 7
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torchopt
from torch import nn
from torch.func import functional_call

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torchopt_metagrad as tmg
from benchmarks.models import WORKLOADS, Task, Workload
from torchopt_metagrad.diagnostics import LiveMemoryTracker

Run = Callable[[list[Task], int], None]


def make_floor(net: nn.Module, wl: Workload) -> Run:
    """The hand-written snapshot-only exact meta-gradient (module docstring)."""
    names = [n for n, _ in net.named_parameters()]
    leaves = list(net.parameters())
    lr = wl.inner_lr

    def loss(ps: list[torch.Tensor], batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return wl.loss(
            functional_call(net, dict(zip(names, ps, strict=True)), (batch[0],)), batch[1]
        )

    def run(tasks: list[Task], steps: int) -> None:
        net.zero_grad(set_to_none=True)
        for support, query in tasks:
            p = [t.detach() for t in leaves]
            snaps = []
            for _ in range(steps):
                snaps.append(p)
                z = [t.requires_grad_() for t in (t.detach() for t in p)]
                g = torch.autograd.grad(loss(z, support), z)
                p = [a - lr * b for a, b in zip(p, g, strict=True)]
            z = [t.requires_grad_() for t in p]
            v = torch.autograd.grad(loss(z, query) / len(tasks), z)
            for s in reversed(snaps):
                z = [t.requires_grad_() for t in (t.detach() for t in s)]
                g = torch.autograd.grad(loss(z, support), z, create_graph=True)
                hv = torch.autograd.grad(g, z, v)
                v = tuple(a - lr * b for a, b in zip(v, hv, strict=True))
            for leaf, grad in zip(leaves, v, strict=True):
                leaf.grad = grad if leaf.grad is None else leaf.grad + grad

    return run


def make_ours(net: nn.Module, wl: Workload, rule: tmg.AbstractRule) -> Run:
    params = dict(net.named_parameters())

    def loss(p: dict[str, torch.Tensor], batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return wl.loss(functional_call(net, p, (batch[0],)), batch[1])

    def run(tasks: list[Task], steps: int) -> None:
        net.zero_grad(set_to_none=True)
        for support, query in tasks:
            out = tmg.adapt(loss, params, support, steps=steps, lr=wl.inner_lr, rule=rule)
            (loss(out, query) / len(tasks)).backward()

    return run


def make_torchopt(net: nn.Module, wl: Workload) -> Run:
    inner = torchopt.MetaSGD(net, lr=wl.inner_lr)

    def run(tasks: list[Task], steps: int) -> None:
        net.zero_grad(set_to_none=True)
        net_state = torchopt.extract_state_dict(net, by="reference", detach_buffers=True)
        opt_state = torchopt.extract_state_dict(inner)
        for (xs, ys), (xq, yq) in tasks:
            for _ in range(steps):
                inner.step(wl.loss(net(xs), ys))
            (wl.loss(net(xq), yq) / len(tasks)).backward()
            torchopt.recover_state_dict(net, net_state)
            torchopt.recover_state_dict(inner, opt_state)

    return run


def grads(net: nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in net.parameters()])  # type: ignore[union-attr]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", choices=sorted(WORKLOADS), default=["conv"])
    p.add_argument("--ks", nargs="+", type=int, default=[10, 20])
    p.add_argument("--rules", nargs="+", default=["exact"], help="tmg.parse_rule specs")
    p.add_argument("--meta-batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    cmd = " ".join(["python benchmarks/bench_exact_floor.py", *sys.argv[1:]])
    print(
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs (shared with other jobs), "
        f"{args.threads} thread(s), torch {torch.__version__}, torchopt {torchopt.__version__}; "
        f"meta-batch {args.meta_batch}, median of {args.repeats} interleaved calls.\n"
        f"Command: `{cmd}`\n"
    )
    for name in args.models:
        wl = WORKLOADS[name]
        torch.manual_seed(0)
        base = wl.make_net()
        sides: dict[str, tuple[nn.Module, Run]] = {}
        net = copy.deepcopy(base)
        sides["torchopt.MetaSGD"] = (net, make_torchopt(net, wl))
        net = copy.deepcopy(base)
        sides["hand-written floor"] = (net, make_floor(net, wl))
        for spec in args.rules:
            net = copy.deepcopy(base)
            rule = tmg.parse_rule(spec)
            sides[tmg.format_rule(rule)] = (net, make_ours(net, wl, rule))
        tasks = wl.sample_tasks(args.meta_batch, torch.Generator().manual_seed(0))
        print(f"## {name}: {wl.description}\n")
        print(
            "| K | side | median time / call (s) | × torchopt | × floor | peak live (MiB) "
            "| rel. error vs torchopt |"
        )
        print("|---:|:---|---:|---:|---:|---:|---:|")
        peaks: dict[str, list[tuple[int, int]]] = {s: [] for s in sides}
        for steps in args.ks:
            times: dict[str, list[float]] = {s: [] for s in sides}
            ref = None
            errors = {}
            for label, (net, run) in sides.items():  # warm-up, agreement
                run(tasks, steps)
                g = grads(net)
                ref = g if ref is None else ref
                errors[label] = float((g - ref).norm() / ref.norm())
            labels = list(sides)
            for rep in range(args.repeats):
                for label in labels[rep % len(labels) :] + labels[: rep % len(labels)]:
                    gc.collect()
                    t0 = time.perf_counter()
                    sides[label][1](tasks, steps)
                    times[label].append(time.perf_counter() - t0)
            for label, (_, run) in sides.items():
                gc.collect()
                with LiveMemoryTracker() as mem:
                    run(tasks, steps)
                peaks[label].append((steps, mem.peak_bytes))
            med = {s: statistics.median(t) for s, t in times.items()}
            for label in sides:
                print(
                    f"| {steps} | {label} | {med[label]:.3f} "
                    f"| {med[label] / med['torchopt.MetaSGD']:.3f} "
                    f"| {med[label] / med['hand-written floor']:.3f} "
                    f"| {peaks[label][-1][1] / 2**20:.2f} | {errors[label]:.1e} |",
                    flush=True,
                )
        if len(args.ks) > 1:
            print("\nMemory growth per extra inner step (peak live, first to last K):\n")
            print("| side | KiB / step | × torchopt |")
            print("|:---|---:|---:|")

            growth = {
                label: (pts[-1][1] - pts[0][1]) / (pts[-1][0] - pts[0][0])
                for label, pts in peaks.items()
            }
            for label in sides:
                print(
                    f"| {label} | {growth[label] / 1024:.1f} "
                    f"| {growth[label] / growth['torchopt.MetaSGD']:.3f} |"
                )
        print()


if __name__ == "__main__":
    main()
