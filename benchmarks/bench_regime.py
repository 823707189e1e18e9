"""Binomial's regime check and automatic order on the sine grid: threshold, cost, table.

The sine MLP 1-40-40-1 (``workloads/sine.py``, seed 0; tasks from ``sample_tasks`` with
generator seed 1, 10 support / 10 query points) at lr in {0.001, 0.003, 0.01, 0.03} and K
in {5, 10, 20}, float64 by default. Three sections:

* ``threshold``: per setting, the mean relative errors of ``Truncated(1)``,
  ``Binomial(1)``, ``Truncated(2)``, ``Binomial(2)`` against ``Exact`` and, per task,
  the regime estimate ``BinomialInfo.dropped`` of ``Binomial(1)`` and ``Binomial(2)``
  (min..max over tasks). The settings where the warning must fire (B1 worse than T1) and
  must not (B2 below a tenth of T2) are marked: ``REGIME_THRESHOLD`` must separate the
  "must not" maxima from the "must" maxima.
* ``overhead``: the check's cost, ``Binomial(L)`` vs ``Binomial(L, check=False)``
  (inner loop + backward, interleaved, best of ``--repeats``), float32.
* ``table``: ``tmg.diagnostics.compare`` per task: errors, the order ``Binomial("auto")``
  chose (or its fallback), and its time against ``Exact`` and against the fixed-order
  ``Binomial(L)`` of the order it chose (same interleaved runs).

Usage: ``python benchmarks/bench_regime.py [--sections threshold overhead table]
[--tasks 4] [--repeats 5] [--dtype float64] [--threads 1]``. Prints Markdown.
"""

from __future__ import annotations

import argparse
import math
import platform
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torchopt_metagrad as tmg
from torchopt_metagrad.rules.binomial_series import REGIME_THRESHOLD, _ratios, regime
from workloads import sine

LRS = (0.001, 0.003, 0.01, 0.03)
KS = (5, 10, 20)


def problem(tasks: int, dtype: torch.dtype):  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    net = sine.make_mlp().to(dtype)

    def loss_fn(params, batch):  # type: ignore[no-untyped-def]
        x, y = batch
        return torch.nn.functional.mse_loss(torch.func.functional_call(net, params, (x,)), y)

    gen = torch.Generator().manual_seed(1)
    data = [
        tuple(tuple(t.to(dtype) for t in b) for b in task)
        for task in sine.unstack(sine.sample_tasks(gen, tasks))
    ]
    return loss_fn, dict(net.named_parameters()), data


def grad(loss_fn, params, task, K, lr, rule):  # type: ignore[no-untyped-def]
    support, query = task
    with tmg.diagnostics.collect() as reports:
        adapted = tmg.adapt(loss_fn, params, support, steps=K, lr=lr, rule=rule)
        out = torch.autograd.grad(loss_fn(adapted, query), list(params.values()))
    return torch.cat([o.reshape(-1) for o in out]), (reports[-1] if reports else None)


def span(values: list[float]) -> str:
    return f"{min(values):.2g}..{max(values):.2g}"


def threshold(args: argparse.Namespace) -> None:
    loss_fn, params, tasks = problem(args.tasks, args.dtype)
    print(f"## Threshold: errors and regime estimates ({len(tasks)} tasks)\n")
    print(
        "| lr | K | T1 err | B1 err | T2 err | B2 err | must | B1 dropped (tasks) "
        "| B2 dropped (tasks) | B1 warns | B2 warns |"
    )
    print("|---:|---:|---:|---:|---:|---:|:---|---:|---:|---:|---:|")
    quiet, loud = [], []
    for lr in LRS:
        for K in KS:
            err = {n: 0.0 for n in ("T1", "B1", "T2", "B2")}
            dropped: dict[str, list[float]] = {"B1": [], "B2": []}
            for task in tasks:
                exact, _ = grad(loss_fn, params, task, K, lr, tmg.Exact())
                for name, rule in [("T1", tmg.Truncated(1)), ("B1", tmg.Binomial(1)),
                                   ("T2", tmg.Truncated(2)), ("B2", tmg.Binomial(2))]:  # fmt: skip
                    g, report = grad(loss_fn, params, task, K, lr, rule)
                    err[name] += float((g - exact).norm() / exact.norm()) / len(tasks)
                    if name in dropped:
                        dropped[name].append(report.info.dropped)
            must = []
            if err["B1"] > err["T1"]:
                must.append("fire")
                loud.append(max(dropped["B1"]))
            if err["B2"] < err["T2"] / 10:
                must.append("not")
                quiet.append(max(dropped["B2"]))
            warns = {n: sum(d > REGIME_THRESHOLD for d in v) for n, v in dropped.items()}
            print(
                f"| {lr} | {K} | {err['T1']:.3g} | {err['B1']:.3g} | {err['T2']:.3g} "
                f"| {err['B2']:.3g} | {'/'.join(must)} | {span(dropped['B1'])} "
                f"| {span(dropped['B2'])} | {warns['B1']}/{len(tasks)} "
                f"| {warns['B2']}/{len(tasks)} |",
                flush=True,
            )
    print(
        f"\nmust not fire: largest B2 estimate {max(quiet):.3g}; must fire: smallest "
        f"per-setting largest B1 estimate {min(loud):.3g}; threshold {REGIME_THRESHOLD:g} "
        f"(geometric middle {math.sqrt(max(quiet) * min(loud)):.3g})\n"
    )


def timed(fn, repeats: int) -> list[float]:  # type: ignore[no-untyped-def]
    fn()
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def _check_alone(K: int, L: int, d: int, repeats: int) -> float:
    """Best time of the check's own work for ``Binomial(L)`` at K steps, d parameters: two
    norms per product row per stage, the running maximum, and the regime number."""
    gen = torch.Generator().manual_seed(0)
    n = K - L + 1
    w = [torch.randn(n, d, generator=gen) for _ in range(L)]
    v = [torch.randn(n, d, generator=gen) for _ in range(L)]
    g, est = torch.randn(d, generator=gen), torch.randn(d, generator=gen)

    def work() -> None:
        rho = g.new_zeros(K)
        for m in range(L):
            rows = slice(L - 1 - m, L - 1 - m + n)
            rho[rows] = torch.maximum(rho[rows], _ratios(w[m], v[m]))
        regime(rho, L, g, est)

    return min(timed(work, 20 * repeats))


def overhead(args: argparse.Namespace) -> None:
    loss_fn, params, tasks = problem(1, torch.float32)
    support, query = tasks[0]
    d = sum(p.numel() for p in params.values())
    print("## Cost of the regime check (float32, inner loop + backward, best of repeats)\n")
    print(
        "| K | order | check=True (ms) | check=False (ms) | end to end | the check alone (ms) "
        "| alone / check=False |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for K in KS:
        for L in (1, 2, 4):
            best = {True: math.inf, False: math.inf}

            def call(check: bool, K: int = K, L: int = L) -> None:
                rule = tmg.Binomial(L, check=check)
                adapted = tmg.adapt(loss_fn, params, support, steps=K, lr=0.01, rule=rule)
                torch.autograd.grad(loss_fn(adapted, query), list(params.values()))

            for _ in range(args.repeats):
                for check in (True, False):  # interleaved
                    best[check] = min(best[check], min(timed(lambda c=check: call(c), 3)))
            alone = _check_alone(K, L, d, args.repeats)
            print(
                f"| {K} | {L} | {1e3 * best[True]:.2f} | {1e3 * best[False]:.2f} "
                f"| {100 * (best[True] / best[False] - 1):+.1f}% | {1e3 * alone:.3f} "
                f"| {100 * alone / best[False]:.1f}% |",
                flush=True,
            )
    print(
        "\nEnd to end: the difference of two noisy best times (the machine is shared); the "
        "check alone: its operations timed on tensors of the same shapes.\n"
    )


def table(args: argparse.Namespace) -> None:
    loss_fn, params, tasks = problem(args.tasks, args.dtype)
    print(
        f"## Diagnostics on the sine grid ({len(tasks)} tasks; means over tasks; times are "
        "ratios to Exact in the same interleaved runs)\n"
    )
    print(
        "| lr | K | K lr max‖H‖ | FirstOrder | T1 | B1 | T2 | B2 | B1/B2 warn "
        "| auto order | auto err | auto HVPs / Exact's | auto / Exact | auto / B(order) "
        "| B(order) / Exact |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|:---:|:---|---:|---:|---:|---:|---:|")
    for lr in LRS:
        for K in KS:
            fixed = {f"B{L}": tmg.Binomial(L) for L in range(1, min(6, K) + 1)}
            rules = {
                "FO": tmg.FirstOrder(), "T1": tmg.Truncated(1), "T2": tmg.Truncated(2),
                **fixed, "auto": tmg.Binomial("auto"),
            }  # fmt: skip
            sums = dict.fromkeys(["FO", "T1", "B1", "T2", "B2", "auto", "regime"], 0.0)
            orders, warn, ratios = [], [0, 0], {"auto": [], "auto/B": [], "B": []}
            products = 0.0
            for support, query in tasks:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", tmg.RegimeWarning)
                    t = tmg.diagnostics.compare(
                        loss_fn, params, support, query=query, steps=K, lr=lr, rules=rules,
                        repeats=args.repeats, memory=False,
                    )  # fmt: skip
                for name in sums:
                    if name != "regime":
                        sums[name] += t[name].rel_error / len(tasks)
                sums["regime"] += t.k_lr_max_h / len(tasks)
                warn[0] += t["B1"].info.reliable is False
                warn[1] += t["B2"].info.reliable is False
                info = t["auto"].info
                orders.append(f"{info.tried}→E" if info.fell_back else str(info.order))
                products += t["auto"].products / t["exact"].products / len(tasks)
                exact_time = t["exact"].time_s
                ratios["auto"].append(t["auto"].time_s / exact_time)
                if not info.fell_back and f"B{info.order}" in fixed:
                    ratios["auto/B"].append(t["auto"].time_s / t[f"B{info.order}"].time_s)
                    ratios["B"].append(t[f"B{info.order}"].time_s / exact_time)

            def gm(xs: list[float]) -> str:
                return f"{math.exp(sum(map(math.log, xs)) / len(xs)):.2f}" if xs else "-"

            print(
                f"| {lr} | {K} | {sums['regime']:.2g} | {sums['FO']:.2g} | {sums['T1']:.2g} "
                f"| {sums['B1']:.2g} | {sums['T2']:.2g} | {sums['B2']:.2g} "
                f"| {warn[0]}/{warn[1]} | {' '.join(orders)} | {sums['auto']:.1e} "
                f"| {products:.2f} | {gm(ratios['auto'])} | {gm(ratios['auto/B'])} "
                f"| {gm(ratios['B'])} |",
                flush=True,
            )
    print(
        "\nB1/B2 warn: on how many tasks Binomial(1) / Binomial(2) warned. auto order: the "
        "order chosen per task (`n→E`: gave up at order n and returned the exact product). "
        "auto HVPs / Exact's: Hessian-vector products (RuleReport.products), mean over tasks. "
        "Time ratios: geometric means over tasks (auto / B(order) over the tasks that did "
        "not fall back).\n"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", nargs="+", default=["threshold", "overhead", "table"],
                        choices=["threshold", "overhead", "table"])  # fmt: skip
    parser.add_argument("--tasks", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtype", default="float64", choices=["float32", "float64"])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    if args.tasks < 1 or args.repeats < 1 or args.threads < 1:
        parser.error("--tasks, --repeats and --threads must be >= 1")
    args.dtype = getattr(torch, args.dtype)
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore", tmg.RegimeWarning)  # the tables report the regime
    print(
        f"# bench_regime: sine MLP, {platform.processor() or platform.machine()}, "
        f"torch {torch.__version__}, {args.threads} thread(s), {args.dtype}\n"
    )
    for section in args.sections:
        {"threshold": threshold, "overhead": overhead, "table": table}[section](args)


if __name__ == "__main__":
    main()
