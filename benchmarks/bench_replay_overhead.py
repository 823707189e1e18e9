"""What the replay bookkeeping costs: the first-step write detector, on the sine MLP.

Times ``tmg.adapt`` + the outer gradient (``Exact``, K steps, one task) with the core as is
and with the buffer-write detector switched off, interleaved call by call after a warm-up,
and prints the medians. Usage: ``python benchmarks/bench_replay_overhead.py [--steps 10]``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torchopt_metagrad as tmg
from torchopt_metagrad._core import replay
from workloads import sine


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--calls", type=int, default=300)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    net = sine.make_mlp()
    params = dict(net.named_parameters())
    x = torch.linspace(-5, 5, 10).reshape(-1, 1)
    batch = (x, torch.sin(x))

    def loss(p, b):
        return torch.nn.functional.mse_loss(torch.func.functional_call(net, p, (b[0],)), b[1])

    def call() -> None:
        adapted = tmg.adapt(loss, params, batch, steps=args.steps, lr=0.01, rule=tmg.Exact())
        torch.autograd.grad(loss(adapted, batch), list(params.values()))

    with_detector = replay.StepLoss.evaluate

    def without_detector(self, params, *, record, watch, meta=None):  # type: ignore[no-untyped-def]
        return with_detector(self, params, record=record, watch=False, meta=meta)

    sides = {"with the write detector": with_detector, "without": without_detector}
    times: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(20):
        call()
    for _ in range(args.calls):
        for name, evaluate in sides.items():
            replay.StepLoss.evaluate = evaluate  # type: ignore[method-assign]
            start = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - start)
    replay.StepLoss.evaluate = with_detector  # type: ignore[method-assign]
    for name, values in times.items():
        print(f"{name:24s} median {statistics.median(values) * 1e3:.2f} ms per call")


if __name__ == "__main__":
    main()
