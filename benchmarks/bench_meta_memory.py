"""What meta-parameters cost in memory: peak live tensor bytes per rule, with and without.

An MLP regression (body 16 -> 128 -> 128, head 128 -> 1, float32) adapted for K inner
steps; the outer gradient is taken w.r.t. every tensor that requires grad. Cases:

* ``plain``: every parameter adapted, float lr (no meta-parameters);
* ``meta-sgd``: a learned per-parameter lr (``lr={name: tensor}``);
* ``per-step lr``: a learned lr per step (``lr=tensor(K)``);
* ``anil fixed``: only the head adapts, the body passed as fixed entries (``adapt=``);
* ``anil closed``: only the head in ``params``, the body closed over by the loss;
* ``weight decay``: every parameter adapted, a closed-over weight-decay coefficient.

For each rule and case it measures the peak live bytes (``LiveMemoryTracker``) of
``tmg.adapt`` + the outer gradient at two horizons and prints the growth per inner step
next to the sizes of the adapted parameters (d) and of the meta-parameters (|w|): a rule
that kept a graph per step would grow by far more than d floats per step.

Usage: ``python benchmarks/bench_meta_memory.py [--steps 10 20] [--out FILE.md]``.
"""

from __future__ import annotations

import argparse
import platform
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torchopt_metagrad as tmg
from torchopt_metagrad.diagnostics import LiveMemoryTracker

RULES: dict[str, Callable[[], tmg.AbstractRule]] = {
    "FirstOrder": tmg.FirstOrder,
    "Truncated(2)": lambda: tmg.Truncated(2),
    "Binomial(2)": lambda: tmg.Binomial(2),
    "Exact": tmg.Exact,
    "Unrolled": tmg.Unrolled,
}
CASES = ("plain", "meta-sgd", "per-step lr", "anil fixed", "anil closed", "weight decay")


def _setup(case: str, steps: int):  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    body = nn.Sequential(nn.Linear(16, 128), nn.Tanh(), nn.Linear(128, 128), nn.Tanh())
    head = nn.Linear(128, 1)
    x, y = torch.randn(64, 16), torch.randn(64, 1)
    xq, yq = torch.randn(64, 16), torch.randn(64, 1)
    body_p = {f"body.{n}": p for n, p in body.named_parameters()}
    head_p = {f"head.{n}": p for n, p in head.named_parameters()}
    params, adapt, lr, meta = {**body_p, **head_p}, None, 0.01, []
    coef = torch.tensor(1e-3, requires_grad=True)

    def net(p: dict[str, torch.Tensor], inputs: torch.Tensor) -> torch.Tensor:
        h = inputs
        for i in (0, 2):
            h = torch.tanh(nn.functional.linear(h, p[f"body.{i}.weight"], p[f"body.{i}.bias"]))
        return nn.functional.linear(h, p["head.weight"], p["head.bias"])

    def loss(p: dict[str, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        full = {**body_p, **p} if case == "anil closed" else p
        value = ((net(full, b[0]) - b[1]) ** 2).mean()
        if case == "weight decay":
            value = value + coef * sum((t**2).sum() for t in p.values())
        return value

    if case == "meta-sgd":
        lr = {n: torch.full_like(t, 0.01).requires_grad_() for n, t in params.items()}
        meta = list(lr.values())
    elif case == "per-step lr":
        lr = torch.full((steps,), 0.01, requires_grad=True)
        meta = [lr]
    elif case == "anil fixed":
        adapt = list(head_p)
        meta = list(body_p.values())
    elif case == "anil closed":
        params = dict(head_p)
        meta = list(body_p.values())
    elif case == "weight decay":
        meta = [coef]
    adapted = [t for n, t in params.items() if adapt is None or n in adapt]
    return params, adapt, lr, meta, adapted, loss, (x, y), (xq, yq), body_p


def peak(rule_name: str, case: str, steps: int) -> tuple[int, int, int]:
    """``(peak live bytes, d, |w|)`` of one adapt + outer gradient."""
    params, adapt, lr, meta, adapted, loss, batch, query, body_p = _setup(case, steps)
    rule = RULES[rule_name]()
    leaves = adapted + meta
    with LiveMemoryTracker() as mem:
        out = tmg.adapt(loss, params, batch, steps=steps, lr=lr, rule=rule, adapt=adapt)
        full = {**body_p, **out} if case == "anil closed" else out
        torch.autograd.grad(loss(full, query), leaves)
    d = sum(t.numel() for t in adapted)
    w = sum(t.numel() for t in meta)
    return mem.peak_bytes, d, w


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, nargs=2, default=(10, 20))
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    k1, k2 = args.steps
    lines = [
        f"Peak live tensor bytes (float32), K = {k1} and {k2}; growth per inner step = "
        f"(peak(K={k2}) - peak(K={k1})) / {k2 - k1}, in units of 4 bytes (one float).",
        f"Machine: {platform.processor() or platform.machine()}, torch {torch.__version__}. "
        f"Command: python benchmarks/bench_meta_memory.py --steps {k1} {k2}",
        "",
        f"| case | d | \\|w\\| | rule | peak K={k1} (MB) | peak K={k2} (MB) | floats / step |",
        "|---|---:|---:|---|---:|---:|---:|",
    ]
    for case in CASES:
        for rule_name in RULES:
            p1, d, w = peak(rule_name, case, k1)
            p2, _, _ = peak(rule_name, case, k2)
            per_step = (p2 - p1) / (k2 - k1) / 4
            lines.append(
                f"| {case} | {d} | {w} | {rule_name} | {p1 / 2**20:.2f} | {p2 / 2**20:.2f} "
                f"| {per_step:,.0f} |"
            )
            print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    if args.out is not None:
        args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
