"""The sine estimator study over several seeds (``--study-seeds``): one folder per seed, each
seed's row equal to a standalone study with that seed, ratios summarized by geometric mean
and range; a bad count is a usage error."""

from __future__ import annotations

import json
import math

import pytest

from recipes.sine import main as sine_main
from recipes.sine.study_seeds import _spread

TINY = ["--mode", "study", "--study-steps", "3", "--study-tasks", "2", "--power-iters", "2",
        "--no-progress", "--no-plots"]  # fmt: skip


def test_seeds_summary_matches_standalone_studies(tmp_path):
    result = sine_main([*TINY, "--study-seeds", "2", "--seed", "4", "--out", str(tmp_path / "s")])
    rows = result["study"]["per_seed"]
    assert [r["seed"] for r in rows] == [4, 5]
    for seed in (4, 5):
        assert (tmp_path / "s" / "study" / f"seed-{seed}" / "study.json").is_file()
    assert json.loads((tmp_path / "s" / "study" / "seeds.json").read_text())["per_seed"] == rows
    # seed 5's row is what a single study with --seed 5 reports
    alone = sine_main([*TINY, "--seed", "5", "--out", str(tmp_path / "one")])["study"]
    rules = alone["rules"]
    ratio = rules["Binomial(1)"]["rel_error"] / rules["Truncated(2)"]["rel_error"]
    assert math.isclose(rows[1]["binomial1_over_truncated2"], ratio, rel_tol=1e-12)
    assert math.isclose(rows[1]["K_lr_max_H_mean"], alone["regime"]["K_lr_max_H_mean"])
    summary = result["study"]["summary"]["binomial1_over_truncated2"]
    values = [r["binomial1_over_truncated2"] for r in rows]
    assert math.isclose(summary["geomean"], math.sqrt(values[0] * values[1]), rel_tol=1e-12)
    assert summary["min"] == min(values) and summary["max"] == max(values)


def test_spread_is_geometric_and_keeps_non_finite_visible():
    s = _spread([2.0, 0.5])
    assert math.isclose(s["geomean"], 1.0) and (s["min"], s["max"]) == (0.5, 2.0)
    assert math.isnan(_spread([1.0, math.inf])["geomean"])


def test_study_seeds_below_one_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit):
        sine_main([*TINY, "--study-seeds", "0", "--out", str(tmp_path)])
    assert "--study-seeds" in capsys.readouterr().err


def test_paired_comparison_separates_shared_task_difficulty_from_the_gap():
    from recipes.common.compare import _ranking_text, paired

    # task difficulty varies a lot, the gap is small but the same on every task
    a = [float(i) for i in range(30)]
    b = [x + 0.01 + 1e-4 * (i % 3) for i, x in enumerate(a)]
    test = paired(a, b)
    assert test["n"] == 30 and math.isclose(test["mean_diff"], -0.01 - 1e-4, rel_tol=1e-6)
    assert abs(test["t"]) > 100
    tie = paired([1.0, 2.0, 3.0, 4.0], [1.1, 1.9, 3.1, 3.9])
    assert abs(tie["t"]) < 2
    text = _ranking_text(["A", "B", "C"], [
        {"better": "A", "worse": "B", **test}, {"better": "B", "worse": "C", **tie}])  # fmt: skip
    assert "A > B (paired t" in text and ") ~ C (paired t = 0)" in text
    with pytest.raises(ValueError, match="paired"):
        paired([1.0], [2.0])
