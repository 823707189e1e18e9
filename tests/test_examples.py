"""The README's main command runs, and shows what the README says it shows."""

from __future__ import annotations

import importlib.util
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sine_rule_errors_demo(capsys):
    stats = load("sine_rule_errors").main(["--tasks", "3", "--steps", "4"])
    out = capsys.readouterr().out
    assert "Binomial(3)" in out and "Truncated(3)" in out
    assert stats["Unrolled"]["rel_error"] < 1e-5  # float32 round-off only
    # The binomial estimate of order L is closer to the exact one than truncation at order L.
    for order in (1, 2, 3):
        assert stats[f"Binomial({order})"]["rel_error"] < stats[f"Truncated({order})"]["rel_error"]
    assert stats["FirstOrder"]["rel_error"] > stats["Binomial(1)"]["rel_error"]


def test_decorators_example_agrees_with_the_functional_front_end(capsys):
    result = load("decorators").main()
    assert "CG took" in capsys.readouterr().out
    assert result["implicit_vs_adapt"] < 1e-8
    assert result["adjoint_vs_exact"] < 1e-2
