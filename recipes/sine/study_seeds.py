"""The sine estimator study over several seeds: how much of a claim is the seed.

One study (:func:`recipes.sine.study.run_study`) is one network initialization and one set
of tasks. A ratio such as Binomial(1)'s error over Truncated(K-1)'s varies by a factor of
several between initializations (sharper initializations have a larger
``K * lr * max ||H_k||``), so one seed can make a claim look better or worse than it is.
``--study-seeds N`` runs the study for seeds ``seed .. seed+N-1`` (each its own network
initialization and tasks; one folder per seed) and summarizes the ratios by their
geometric mean and range over seeds, with each seed's regime beside its numbers.

Ratios are averaged geometrically: a ratio of 2 in one seed and 0.5 in another is no
gain either way, which the arithmetic mean (1.25) would hide.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

from recipes.common.metrics import write_csv, write_json
from recipes.common.tables import markdown_table
from recipes.sine.study import StudySettings, run_study

__all__ = ["format_seeds", "run_seeds"]


def _spread(values: list[float]) -> dict[str, float]:
    """Geometric mean, minimum and maximum of positive ratios (``inf``/``nan`` kept)."""
    if any(not v > 0 or math.isinf(v) for v in values):
        return {"geomean": math.nan, "min": min(values), "max": max(values)}
    return {
        "geomean": math.exp(sum(math.log(v) for v in values) / len(values)),
        "min": min(values),
        "max": max(values),
    }


def run_seeds(s: StudySettings, seeds: int, out_dir: Path) -> dict[str, Any]:
    """Run the study for ``seeds`` consecutive seeds from ``s.seed``; write
    ``seeds.json`` and ``seeds.csv`` (one row per seed) beside the per-seed folders.

    Returns:
        ``{"settings", "per_seed": [...], "summary": {...}}`` where ``summary`` holds the
        geometric mean and range of each ratio and the count of seeds where the paper's
        claims hold.
    """
    if seeds < 1:
        raise ValueError(f"seeds must be >= 1, got {seeds}")
    K = s.steps
    top = max(K - 1, 1)
    per_seed = []
    for i in range(seeds):
        seed = s.seed + i
        study = run_study(dataclasses.replace(s, seed=seed), out_dir / f"seed-{seed}")
        rules = study["rules"]

        def err(name: str, rules: dict[str, Any] = rules) -> float:
            return float(rules[name]["rel_error"])

        row: dict[str, Any] = {
            "seed": seed,
            "K_lr_max_H_mean": study["regime"]["K_lr_max_H_mean"],
            "K_lr_max_H_max": study["regime"]["K_lr_max_H_max"],
            f"binomial1_over_truncated{top}": err("Binomial(1)") / err(f"Truncated({top})"),
            "binomial1_cos_minus_truncated1_cos": rules["Binomial(1)"]["cosine"]
            - rules["Truncated(1)"]["cosine"],
        }
        for L in range(1, K):
            row[f"truncated{L}_over_binomial{L}"] = err(f"Truncated({L})") / max(
                err(f"Binomial({L})"), 1e-300
            )
        per_seed.append(row)
    ratio_keys = [k for k in per_seed[0] if "_over_" in k]
    summary: dict[str, Any] = {k: _spread([r[k] for r in per_seed]) for k in ratio_keys}
    summary["regime"] = {
        "min": min(r["K_lr_max_H_mean"] for r in per_seed),
        "max": max(r["K_lr_max_H_mean"] for r in per_seed),
    }
    summary["binomial1_at_most_truncated_top"] = sum(
        r[f"binomial1_over_truncated{top}"] <= 1 for r in per_seed
    )
    summary["binomial1_direction_worse_than_truncated1"] = sum(
        r["binomial1_cos_minus_truncated1_cos"] < 0 for r in per_seed
    )
    result = {
        "settings": {**dataclasses.asdict(s), "seeds": seeds, "top": top},
        "per_seed": per_seed,
        "summary": summary,
    }
    write_csv(out_dir / "seeds.csv", per_seed)
    write_json(out_dir / "seeds.json", result)
    return result


def format_seeds(result: dict[str, Any]) -> str:
    """The printed summary: one row per ratio (geometric mean and range), one per seed."""
    st, sm, rows = result["settings"], result["summary"], result["per_seed"]
    K, top, n = st["steps"], st["top"], st["seeds"]
    b1 = f"binomial1_over_truncated{top}"

    def fmt(v: float) -> str:
        return f"{v:.3g}"

    ratios = [
        [
            f"Binomial(1) / Truncated({top})",
            fmt(sm[b1]["geomean"]),
            f"{fmt(sm[b1]['min'])} - {fmt(sm[b1]['max'])}",
        ]
    ]
    for L in range(1, K):
        key = f"truncated{L}_over_binomial{L}"
        ratios.append(
            [
                f"Truncated({L}) / Binomial({L})",
                fmt(sm[key]["geomean"]),
                f"{fmt(sm[key]['min'])} - {fmt(sm[key]['max'])}",
            ]
        )
    seed_rows = [
        [
            r["seed"],
            fmt(r["K_lr_max_H_mean"]),
            fmt(r[b1]),
            fmt(r[f"truncated{top}_over_binomial{top}"]) if K > 1 else "-",
            f"{r['binomial1_cos_minus_truncated1_cos']:+.2e}",
        ]
        for r in rows
    ]
    return "\n".join(
        [
            f"sine estimator study over {n} seeds ({st['seed']}..{st['seed'] + n - 1}; each a "
            f"new initialization and {st['tasks']} new tasks): K={K}, lr={st['lr']}, "
            f"{st['dtype']}; error ratios of mean relative errors against tmg.Exact()",
            f"regime K * lr * max_k ||H_k|| (mean over tasks) ranges {fmt(sm['regime']['min'])} "
            f"- {fmt(sm['regime']['max'])} over seeds",
            "",
            markdown_table(["error ratio", "geometric mean", "range over seeds"], ratios),
            "",
            f"Binomial(1) at most as wrong as Truncated({top}) in "
            f"{sm['binomial1_at_most_truncated_top']} of {n} seeds; Binomial(1)'s direction "
            f"(cosine) worse than Truncated(1)'s in "
            f"{sm['binomial1_direction_worse_than_truncated1']} of {n} seeds",
            "",
            markdown_table(
                [
                    "seed",
                    "K lr max‖H‖",
                    f"B(1)/T({top})",
                    f"T({top})/B({top})",
                    "cos B(1) - cos T(1)",
                ],
                seed_rows,
            ),
        ]
    )
