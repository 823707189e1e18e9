"""How far each meta-gradient rule is from the exact one, on sine regression.

Samples sine tasks (amplitude U[0.1, 5], phase U[0, pi], x U[-5, 5]; the shared
``workloads.sine``), adapts the MLP 1-40-40-1 (ReLU, PyTorch's default
initialization) for K inner steps of gradient descent with every rule, and prints the
mean relative error and cosine similarity of each rule's meta-gradient against
``tmg.Exact()`` (``tmg.diagnostics.compare_to_exact``). Runs in well
under a minute on a 2-core CPU. For time and memory, see benchmarks/bench_rules.py.

    python examples/sine_rule_errors.py [--steps 5] [--lr 0.003] [--tasks 20]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

import torchopt_metagrad as tmg
from torchopt_metagrad.diagnostics import compare_to_exact, meta_gradient

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the shared workloads/

from workloads import sine


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5, help="inner steps K")
    parser.add_argument("--lr", type=float, default=0.003, help="inner step size")
    parser.add_argument("--tasks", type=int, default=20, help="tasks to average over")
    parser.add_argument("--shots", type=int, default=10, help="points per inner/outer batch")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    net = sine.make_mlp()
    params = dict(net.named_parameters())

    def loss_fn(p: dict[str, torch.Tensor], batch: tuple[torch.Tensor, torch.Tensor]):
        x, y = batch
        return nn.functional.mse_loss(torch.func.functional_call(net, p, (x,)), y)

    K = args.steps
    rules: dict[str, tmg.AbstractRule] = {"FirstOrder": tmg.FirstOrder()}
    for order in range(1, K):
        rules[f"Truncated({order})"] = tmg.Truncated(order)
        rules[f"Binomial({order})"] = tmg.Binomial(order)
    rules["Unrolled"] = tmg.Unrolled()

    gen = torch.Generator().manual_seed(args.seed)
    tasks = [sine.sample_task(gen, args.shots, args.shots) for _ in range(args.tasks)]
    stats = {name: {"rel_error": 0.0, "cosine": 0.0} for name in rules}
    for task in tasks:
        exact = meta_gradient(loss_fn, params, task, steps=K, lr=args.lr, rule=tmg.Exact())
        for name, rule in rules.items():
            error = compare_to_exact(
                loss_fn, params, task, steps=K, lr=args.lr, rule=rule, exact=exact
            )
            stats[name]["rel_error"] += error.rel_error / len(tasks)
            stats[name]["cosine"] += error.cosine / len(tasks)

    print(
        f"sine regression, MLP 1-40-40-1, K={K}, lr={args.lr}, {args.tasks} tasks, "
        f"{args.shots} shots; error of each rule against tmg.Exact()"
    )
    print(f"| {'rule':<13} | {'mean rel. error':>15} | {'mean cosine':>11} |")
    print(f"|{'-' * 15}|{'-' * 17}|{'-' * 13}|")
    for name, s in stats.items():
        print(f"| {name:<13} | {s['rel_error']:>15.3e} | {s['cosine']:>11.6f} |")
    return stats


if __name__ == "__main__":
    main()
