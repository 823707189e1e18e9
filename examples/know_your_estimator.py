"""Know your estimator: every rule against the exact meta-gradient, with its cost.

One sine task (the shared ``workloads.sine``: MLP 1-40-40-1, ReLU), K inner steps of
gradient descent at step size lr; ``tmg.diagnostics.compare`` prints each rule's relative
error and cosine against ``tmg.Exact()``, its Hessian-vector products, time and peak live
memory, what it reported (Binomial's regime estimate, the order ``Binomial("auto")``
chose), and ``K * lr * max_k ||H_k||``. Then the regime warning, as a user sees it.

    python examples/know_your_estimator.py [--steps 10] [--lr 0.003] [--dtype float32]
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import torch

import torchopt_metagrad as tmg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the shared workloads/

from workloads import sine


def main(argv: list[str] | None = None) -> tmg.diagnostics.EstimatorTable:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="inner steps K")
    parser.add_argument("--lr", type=float, default=0.003, help="inner step size")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per rule")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # tiny model: steady timings on a shared CPU

    torch.manual_seed(args.seed)
    dtype = getattr(torch, args.dtype)
    net = sine.make_mlp().to(dtype)
    params = dict(net.named_parameters())

    def loss_fn(p: dict[str, torch.Tensor], batch: tuple[torch.Tensor, torch.Tensor]):
        x, y = batch
        return torch.nn.functional.mse_loss(torch.func.functional_call(net, p, (x,)), y)

    gen = torch.Generator().manual_seed(args.seed + 1)
    support, query = (tuple(t.to(dtype) for t in b) for b in sine.sample_task(gen))
    rules = [tmg.FirstOrder(), tmg.Truncated(2), tmg.Binomial(1), tmg.Binomial(2),
             tmg.Binomial("auto"), tmg.Unrolled()]  # fmt: skip
    table = tmg.diagnostics.compare(
        loss_fn, params, support, query=query, steps=args.steps, lr=args.lr, rules=rules,
        repeats=args.repeats,
    )  # fmt: skip
    print(f"sine task, {args.dtype}, lr = {args.lr}: ", end="")
    print(table)

    # What a user of Binomial(2) sees (the warning shows once per line of code):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", tmg.RegimeWarning)
        adapted = tmg.adapt(loss_fn, params, support, steps=args.steps, lr=args.lr,
                            rule=tmg.Binomial(2))  # fmt: skip
        loss_fn(adapted, query).backward()
    messages = [str(w.message) for w in caught] or ["silent (the expansion looks reliable here)"]
    print("\nBinomial(2)'s regime check:", *messages)
    return table


if __name__ == "__main__":
    main()
