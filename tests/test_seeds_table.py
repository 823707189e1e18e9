"""recipes.common.seeds: one comparison over several seeds (mean, spread, gap, t)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from recipes.common import seeds as seeds_mod


def _study(folder: Path, seed: int, methods: dict[str, float], untrained: float | None = None,
           interrupted: bool = False) -> Path:  # fmt: skip
    folder.mkdir(parents=True)
    results: dict = {
        "methods": {m: {"method": m.lower(), "acc": v} for m, v in methods.items()},
        "interrupted": interrupted,
    }
    if untrained is not None:
        results["untrained"] = {"acc": untrained}
    (folder / "results.json").write_text(json.dumps(results))
    (folder / "study.json").write_text(json.dumps({"config": {"seed": seed}}))
    return folder


def test_merges_split_studies_and_summarizes(tmp_path: Path, capsys):
    folders = [
        _study(tmp_path / "s0a", 0, {"MAML": 0.90, "FO": 0.80}, untrained=0.7),
        _study(tmp_path / "s0b", 0, {"Binom": 0.91}, untrained=0.7),
        _study(tmp_path / "s1", 1, {"MAML": 0.92, "FO": 0.70, "Binom": 0.90}, untrained=0.6),
        _study(tmp_path / "s2", 2, {"MAML": 0.94, "FO": 0.75, "Binom": 0.96, "Extra": 1.0}),
    ]
    out = tmp_path / "table"
    args = ["--metric", "acc", "--higher-is-better", "--reference", "MAML", "--scale", "100"]
    summary = seeds_mod.main([*map(str, folders), *args, "--out", str(out)])
    assert summary["seeds"] == [0, 1, 2]
    fo = summary["methods"]["FO"]
    assert fo["per_seed"] == [0.80, 0.70, 0.75]
    assert fo["mean"] == pytest.approx(0.75) and fo["sd"] == pytest.approx(0.05)
    gaps = [-0.10, -0.22, -0.19]
    se = math.sqrt(sum((g - sum(gaps) / 3) ** 2 for g in gaps) / 2) / math.sqrt(3)
    assert fo["gap"] == pytest.approx(sum(gaps) / 3) and fo["gap_se"] == pytest.approx(se)
    assert fo["gap_t"] == pytest.approx(fo["gap"] / se) and fo["ahead"] == 0
    binom = summary["methods"]["Binom"]
    assert binom["ahead"] == 2 and binom["ranks"] == [1, 2, 1]
    assert summary["order"][0] == "Binom"
    # the untrained row is on seeds 0 and 1 only, "Extra" on seed 2 only: both left out
    assert summary["left_out"] == ["Extra", "untrained initialization"]
    text = capsys.readouterr().out
    fo_row = next(line for line in text.splitlines() if line.startswith("| FO "))
    assert [c.strip() for c in fo_row.split("|")[1:6]] == ["FO", "80.00", "70.00", "75.00",
                                                           "75.00 ± 5.00"]  # fmt: skip
    assert "4.3" in text and "left out: Extra" in text
    assert json.loads(out.with_suffix(".json").read_text())["reference"] == "MAML"
    assert out.with_suffix(".md").read_text().startswith("| method |")


def test_lower_is_better_flips_ahead_and_order(tmp_path: Path):
    folders = [_study(tmp_path / f"s{s}", s, {"A": 1.0 + s, "B": 0.5 + s}) for s in range(2)]
    summary = seeds_mod.summarize(seeds_mod.collect(folders, "acc"), "A", higher_is_better=False)
    assert summary["order"] == ["B", "A"] and summary["methods"]["B"]["ahead"] == 2
    assert summary["methods"]["B"]["gap_t"] == -math.inf  # identical gaps: no spread


@pytest.mark.parametrize(
    "case, match",
    [
        ("one_seed", "at least two seeds"),
        ("no_metric", "has no 'acc'; it has \\[\\]"),
        ("interrupted", "interrupted"),
        ("missing", "results.json is missing"),
        ("twice", "appears twice on seed 0"),
        ("reference", "reference 'MAML' is not on every seed"),
    ],
)
def test_bad_inputs_name_the_problem(tmp_path: Path, case: str, match: str):
    if case == "one_seed":
        folders = [_study(tmp_path / "a", 0, {"MAML": 1.0})]
    elif case == "no_metric":
        folders = [_study(tmp_path / "a", 0, {"MAML": 1.0})]
        (folders[0] / "results.json").write_text(json.dumps({"methods": {"MAML": {}}}))
    elif case == "interrupted":
        folders = [_study(tmp_path / "a", 0, {"MAML": 1.0}, interrupted=True)]
    elif case == "missing":
        folders = [tmp_path / "nothing"]
    elif case == "twice":
        folders = [
            _study(tmp_path / "a", 0, {"MAML": 1.0}),
            _study(tmp_path / "b", 0, {"MAML": 1.0}),
        ]
    else:
        folders = [_study(tmp_path / "a", 0, {"X": 1.0}), _study(tmp_path / "b", 1, {"X": 2.0})]
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        seeds_mod.summarize(seeds_mod.collect(folders, "acc"), "MAML", True)
