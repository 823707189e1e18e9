"""One comparison over several seeds: how much of a ranking is the seed.

    python -m recipes.common.seeds runs/fewshot/glyphs-seed0 runs/fewshot/glyphs-seed1 \\
        --metric test_accuracy --higher-is-better --reference MAML --scale 100

A comparison (:func:`recipes.common.compare.compare`) ranks methods on one seed: one
initialization, one stream of meta-training tasks, one set of test tasks. Its paired test
over test tasks says which gaps those test tasks can tell apart, not whether another seed
would give the same ranking: on the glyph set one method moved by 10 points between two
seeds of the same protocol. This module reads the ``results.json`` of comparison folders
run with different ``--seed`` (several folders of one seed are merged: a study split over
processes), and writes, per method, its score on each seed, the mean and the sample
standard deviation over seeds, and its gap to a reference method: the mean gap, its
standard error over seeds, ``t = mean / se`` (``n - 1`` degrees of freedom; with 3 seeds
|t| must pass 4.3 for the two-sided 5% level) and on how many seeds it was ahead.

The seed of a folder is read from its ``study.json`` (``config.seed``); a method must
appear on every seed (a method missing on one is reported and left out).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from recipes.common.metrics import write_json, write_text_atomic
from recipes.common.tables import markdown_table

__all__ = ["collect", "seed_table", "summarize"]

#: Two-sided 5% critical values of Student's t by degrees of freedom (n seeds - 1).
T_CRITICAL = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26}


def _read(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{path} is missing: give comparison folders (written by a recipe's --methods run)"
        ) from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from None


def collect(folders: Sequence[Path], metric: str) -> dict[int, dict[str, float]]:
    """``{seed: {method label: metric}}`` from the comparison ``folders`` (merged by seed).

    Raises:
        FileNotFoundError: a folder without ``results.json`` / ``study.json``.
        ValueError: an interrupted study, a method without ``metric``, one method twice on
            the same seed, or fewer than two seeds.
    """
    per_seed: dict[int, dict[str, float]] = {}
    for folder in folders:
        results = _read(Path(folder) / "results.json")
        seed = int(_read(Path(folder) / "study.json")["config"]["seed"])
        if results.get("interrupted"):
            raise ValueError(f"{folder}: the study was interrupted; finish it with --resume")
        scores = per_seed.setdefault(seed, {})
        for label, entry in results["methods"].items():
            if metric not in entry:
                have = sorted(k for k, v in entry.items() if isinstance(v, (int, float)))
                raise ValueError(f"{folder}: {label} has no {metric!r}; it has {have}")
            if label in scores:
                raise ValueError(f"{folder}: {label} appears twice on seed {seed}")
            scores[label] = float(entry[metric])
        if "untrained" in results and metric in results["untrained"]:
            scores.setdefault("untrained initialization", float(results["untrained"][metric]))
    if len(per_seed) < 2:
        raise ValueError(f"need folders of at least two seeds, got seeds {sorted(per_seed)}")
    return per_seed


def summarize(
    per_seed: dict[int, dict[str, float]], reference: str, higher_is_better: bool
) -> dict[str, Any]:
    """Mean, spread and gap to ``reference`` per method present on every seed."""
    seeds = sorted(per_seed)
    everywhere = [m for m in per_seed[seeds[0]] if all(m in per_seed[s] for s in seeds)]
    missing = sorted({m for s in seeds for m in per_seed[s]} - set(everywhere))
    if reference not in everywhere:
        raise ValueError(f"reference {reference!r} is not on every seed; methods: {everywhere}")
    sign = 1.0 if higher_is_better else -1.0
    methods: dict[str, Any] = {}
    for m in everywhere:
        values = [per_seed[s][m] for s in seeds]
        gaps = [per_seed[s][m] - per_seed[s][reference] for s in seeds]
        entry: dict[str, Any] = {
            "per_seed": values,
            "mean": statistics.fmean(values),
            "sd": statistics.stdev(values),
            "ranks": [
                1 + sum(sign * per_seed[s][o] > sign * per_seed[s][m] for o in everywhere)
                for s in seeds
            ],
        }
        if m != reference:
            se = statistics.stdev(gaps) / math.sqrt(len(gaps))
            mean_gap = statistics.fmean(gaps)
            entry.update(
                gap=mean_gap,
                gap_se=se,
                gap_t=mean_gap / se if se > 0 else math.copysign(math.inf, mean_gap),
                ahead=sum(sign * g > 0 for g in gaps),
            )
        methods[m] = entry
    order = sorted(methods, key=lambda m: -sign * methods[m]["mean"])
    return {"seeds": seeds, "reference": reference, "methods": methods, "order": order,
            "left_out": missing}  # fmt: skip


def seed_table(summary: dict[str, Any], scale: float = 1.0, digits: int = 2) -> str:
    """The markdown table of :func:`summarize` (scores times ``scale``)."""
    seeds, ref = summary["seeds"], summary["reference"]
    n = len(seeds)

    def f(x: float) -> str:
        return f"{scale * x:.{digits}f}"

    rows = []
    for m in summary["order"]:
        e = summary["methods"][m]
        gap = "—"
        if "gap" in e:
            gap = f"{scale * e['gap']:+.{digits}f} ± {scale * e['gap_se']:.{digits}f} (t = {e['gap_t']:.2f}; ahead on {e['ahead']}/{n})"  # noqa: E501
        rows.append([m, *(f(v) for v in e["per_seed"]), f"{f(e['mean'])} ± {f(e['sd'])}", gap,
                     " / ".join(str(r) for r in e["ranks"])])  # fmt: skip
    crit = T_CRITICAL.get(n - 1, 2.0)
    table = markdown_table(
        ["method", *(f"seed {s}" for s in seeds), "mean ± sd", f"gap to {ref} ± se", "ranks"],
        rows,
    )
    note = (
        f"\n\nGap: mean over {n} seeds of (method - {ref}) on the same seed, ± its standard "
        f"error; |t| >= {crit} is the two-sided 5% level with {n - 1} degrees of freedom."
    )
    if summary["left_out"]:
        note += f" Not on every seed, left out: {', '.join(summary['left_out'])}."
    return table + note


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m recipes.common.seeds", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("folders", nargs="+", type=Path, help="comparison folders (any seeds)")
    p.add_argument("--metric", required=True, help="the key of results.json's method entries")
    p.add_argument("--higher-is-better", action="store_true", help="e.g. accuracy")
    p.add_argument("--reference", required=True, help="the method gaps are measured from")
    p.add_argument("--scale", type=float, default=1.0, help="multiply scores (100: percent)")
    p.add_argument("--out", type=Path, default=None, help="write OUT.md and OUT.json")
    args = p.parse_args(argv)
    summary = summarize(collect(args.folders, args.metric), args.reference, args.higher_is_better)
    text = seed_table(summary, args.scale)
    print(text, flush=True)
    if args.out is not None:
        write_text_atomic(args.out.with_suffix(".md"), text + "\n")
        write_json(args.out.with_suffix(".json"), summary)
    return summary


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError) as err:
        sys.exit(f"recipes.common.seeds: error: {err}")
