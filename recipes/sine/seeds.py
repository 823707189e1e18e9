"""Mean and spread over seeds of finished sine meta-training runs.

    python -m recipes.sine.seeds --steps 0,1,5,10 \\
        MAML=runs/sine/maml-s0,runs/sine/maml-s1,runs/sine/maml-s2 \\
        Meta-SGD=runs/sine/metasgd-s0,runs/sine/metasgd-s1,runs/sine/metasgd-s2

Each ``LABEL=DIR,DIR,...`` names the output folders (``--out`` / ``runs/sine/<name>``) of
one method's runs, one per seed. From each run's ``train/result.json`` it reads the
meta-test curve (mean query MSE over the held-out tasks after each number of adaptation
steps) and prints two Markdown tables: per method, the mean ± sample standard deviation
over the runs (or how many runs diverged: a NaN or inf value), and each run's value.
Nothing is trained or evaluated here.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from recipes.common.tables import markdown_table

__all__ = ["main", "summarize"]


def _load(run: str) -> dict[str, Any]:
    path = Path(run) / "train" / "result.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: is {run} a finished sine training run?")
    result = json.loads(path.read_text())
    if "test_curve" not in result:
        raise ValueError(f"{path} has no meta-test curve (the run did not finish)")
    return result


def summarize(methods: dict[str, list[str]], steps: Sequence[int]) -> str:
    """The two tables for ``{label: [run folders]}`` at the given adaptation steps."""
    head = ["method", "runs", *[f"{s} step{'s' if s != 1 else ''}" for s in steps], "train s"]
    rows, seeds = [], []
    for label, runs in methods.items():
        results = [_load(r) for r in runs]
        per_step = []
        for s in steps:
            values = []
            for run, res in zip(runs, results, strict=True):
                curve = res["test_curve"]
                if s not in curve["steps"]:
                    raise ValueError(f"{run} has no meta-test value at {s} steps: {curve['steps']}")
                values.append(float(curve["mean"][curve["steps"].index(s)]))  # "nan" -> nan
            per_step.append(values)
        spread = [_spread(v) for v in per_step]
        train_s = statistics.mean(r["train_time_s"] for r in results)
        rows.append([label, len(runs), *spread, f"{train_s:.0f}"])
        for i, run in enumerate(runs):
            seed = json.loads((Path(run) / "config.json").read_text()).get("seed", "?")
            inner = results[i].get("inner", {})
            lr = (
                f"{inner['inner/lr_mean']:.4g} [{inner['inner/lr_min']:.3g}, "
                f"{inner['inner/lr_max']:.3g}]"
                if "inner/lr_mean" in inner
                else "fixed"
            )
            seeds.append([label, seed, *[f"{v[i]:.3f}" for v in per_step], lr])
    return (
        "mean ± std over runs (each run: mean query MSE over its held-out tasks)\n\n"
        + markdown_table(head, rows)
        + "\n\nper run\n\n"
        + markdown_table(["method", "seed", *head[2:-1], "learned lr: mean [min, max]"], seeds)
    )


def _spread(values: list[float]) -> str:
    """``mean ± std`` (sample std), or how many runs diverged (NaN / inf)."""
    bad = sum(not math.isfinite(v) for v in values)
    if bad:
        return f"non-finite in {bad}/{len(values)} runs"
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {std:.3f}"


def main(argv: Sequence[str] | None = None) -> str:
    """Parse ``argv``, print the tables and return them."""
    parser = argparse.ArgumentParser(prog="python -m recipes.sine.seeds", description=__doc__)
    parser.add_argument(
        "--steps",
        type=lambda text: [int(s) for s in text.split(",")],
        default=[0, 1, 5, 10],
        help="adaptation steps to report, comma-separated (default: 0,1,5,10)",
    )
    parser.add_argument("methods", nargs="+", metavar="LABEL=DIR,DIR,...")
    args = parser.parse_args(argv)
    methods: dict[str, list[str]] = {}
    for item in args.methods:
        label, sep, dirs = item.partition("=")
        if not sep or not dirs:
            parser.error(f"expected LABEL=DIR,DIR,..., got {item!r}")
        methods[label] = dirs.split(",")
    try:
        text = summarize(methods, args.steps)
    except (FileNotFoundError, ValueError) as err:
        parser.error(str(err))
    print(text, flush=True)
    return text


if __name__ == "__main__":
    main()
