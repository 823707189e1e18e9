"""Residuals of the implicit rules' linear solvers at iMAML's few iterations, 4-conv net.

The system is iMAML's :math:`(I + H/r) x = g` at the end of a short proximal inner loop
(``--inner-steps`` SGD steps of ``--inner-lr`` on ``CE + r/2 ||phi - theta||^2``) on the
benchmark's 4-conv 5-way 1-shot net (``workloads.fewshot.conv4``, 28x28x1 random
images, 15 query images per class for ``g``), float64. There ``I + H/r`` can be
indefinite (the inner loop is not at a minimum). For each solver, at ``--iters``
iterations, the relative residual ``||g - M x|| / ||g||`` (1 is what ``x = 0`` gives):

* ``torchopt normal_cg``: ``torchopt.linear_solve.solve_normal_cg(maxiter=iters, atol=0)``
  as torchopt's iMAML example calls it (from zero; two products per iteration);
* ``cg, x0=rhs``: this library's former default (``torchopt.linalg.cg`` from ``x0 = g``);
* ``cg``, ``minres``, ``normal_cg`` from zero (``tmg.ImplicitCG(solver=...)``'s solvers);
* ``minres (2x)``: MINRES with twice the iterations, i.e. the HVPs of normal CG.

``min v'Mv/v'v`` is the smallest Rayleigh quotient the solvers met (< 0: indefinite).

Usage: ``python benchmarks/bench_implicit_solvers.py [--regs 0.5 2] [--tasks 3]
[--iters 5] [--inner-steps 16] [--inner-lr 0.1] [--threads 1]``. Prints Markdown.
"""

from __future__ import annotations

import argparse
import platform
import sys
import warnings
from pathlib import Path

import torch
import torchopt
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from torchopt_metagrad.rules.linear_solvers import solve
from workloads import fewshot

warnings.filterwarnings("ignore", message=".*functorch.*", category=UserWarning)
warnings.filterwarnings("ignore", message=".*functorch.*", category=FutureWarning)


def system(reg: float, task: int, inner_steps: int, inner_lr: float):
    """``v -> (I + H/reg) v`` (``torch.func``-traceable) and ``g`` for one task."""
    torch.manual_seed(0)
    net = fewshot.conv4().double()
    names = [n for n, _ in net.named_parameters()]
    theta = [p.detach().clone() for p in net.parameters()]
    gen = torch.Generator().manual_seed(100 + task)
    (xs, ys), (xq, yq) = fewshot.sample_episode(gen)
    xs, xq = xs.double(), xq.double()
    sizes = [t.numel() for t in theta]

    def unflat(v):
        return {n: t.view_as(p) for n, t, p in zip(names, v.split(sizes), theta)}

    def loss(v, x, y):
        return F.cross_entropy(torch.func.functional_call(net, unflat(v), (x,)), y)

    th = torch.cat([t.reshape(-1) for t in theta])
    phi = th.clone()
    grad = torch.func.grad(lambda v: loss(v, xs, ys))
    for _ in range(inner_steps):
        phi = phi - inner_lr * (grad(phi) + reg * (phi - th))
    g = torch.func.grad(lambda v: loss(v, xq, yq))(phi)
    _, hvp_fn = torch.func.vjp(grad, phi)
    stationarity = float((grad(phi) + reg * (phi - th)).norm() / grad(th).norm())
    return (lambda v: v + hvp_fn(v)[0] / reg), g, stationarity


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--regs", type=float, nargs="+", default=[0.5, 2.0])
    p.add_argument("--tasks", type=int, default=3)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--inner-steps", type=int, default=16)
    p.add_argument("--inner-lr", type=float, default=0.1)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    n = a.iters
    cols = ["torchopt normal_cg", "cg, x0=rhs", "cg", "normal_cg", "minres", "minres (2x)"]
    print(f"torch {torch.__version__}, torchopt {torchopt.__version__}, {platform.machine()}, "
          f"{a.threads} thread(s); {n} iterations, {a.inner_steps} inner steps of lr "
          f"{a.inner_lr}, float64\n")  # fmt: skip
    print("| reg | task | stationarity | min v'Mv/v'v | " + " | ".join(cols) + " |")
    print("|---|---|---|---|" + "---|" * len(cols))
    for reg in a.regs:
        for task in range(a.tasks):
            matvec, g, stat = system(reg, task, a.inner_steps, a.inner_lr)

            def rel(x, matvec=matvec, g=g):
                return float((g - matvec(x)).norm() / g.norm())

            x_to = torchopt.linear_solve.solve_normal_cg(maxiter=n, atol=0)(matvec, g)
            runs = [
                solve(matvec, g, solver="cg", x0="rhs", maxiter=n, tol=1e-12),
                solve(matvec, g, solver="cg", x0="zero", maxiter=n, tol=1e-12),
                solve(matvec, g, solver="normal_cg", x0="zero", maxiter=n, tol=1e-12),
                solve(matvec, g, solver="minres", x0="zero", maxiter=n, tol=1e-12),
                solve(matvec, g, solver="minres", x0="zero", maxiter=2 * n, tol=1e-12),
            ]
            curvature = min(r.min_curvature for r in runs)
            cells = [rel(x_to)] + [rel(r.x) for r in runs]
            print(f"| {reg:g} | {task} | {stat:.3f} | {curvature:.3g} | "
                  + " | ".join(f"{c:.3g}" for c in cells) + " |")  # fmt: skip


if __name__ == "__main__":
    main()
