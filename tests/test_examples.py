"""The examples run and show what the README says; the shared workloads draw in their
documented orders; the benchmark reads rule specs (and the older call form)."""

from __future__ import annotations

import argparse
import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

import torchopt_metagrad as tmg
from workloads import fewshot, sine

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


def test_omniglot_example_takes_rule_specs():
    with pytest.raises(SystemExit):  # argparse's error, naming the knobs, before any training
        load("maml_omniglot_pattern").main(["--rules", "binomial:1"])


# --- the shared workloads (examples, benchmarks and recipes draw from them) ----------------


def test_sine_workload_draws_in_the_documented_orders():
    def uniform(gen, shape, lo, hi):
        return lo + (hi - lo) * torch.rand(shape, generator=gen)

    gen, ref = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    for _ in range(2):  # one task at a time: amplitude, phase, support x, query x
        (xs, ys), (xq, yq) = sine.sample_task(gen, shots=4, query_shots=6)
        amp, phase = uniform(ref, (), 0.1, 5.0), uniform(ref, (), 0.0, math.pi)
        assert torch.equal(xs, uniform(ref, (4, 1), -5.0, 5.0))
        assert torch.equal(xq, uniform(ref, (6, 1), -5.0, 5.0))
        assert torch.equal(ys, amp * torch.sin(xs + phase))
        assert torch.equal(yq, amp * torch.sin(xq + phase))
    # stacked: all amplitudes, all phases, all support x, all query x
    gen, ref = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    (xs, ys), (xq, yq) = sine.sample_tasks(gen, 3, shots=5, query_shots=2)
    amp, phase = uniform(ref, (3, 1, 1), 0.1, 5.0), uniform(ref, (3, 1, 1), 0.0, math.pi)
    assert torch.equal(xs, uniform(ref, (3, 5, 1), -5.0, 5.0))
    assert torch.equal(xq, uniform(ref, (3, 2, 1), -5.0, 5.0))
    assert torch.equal(ys, amp * torch.sin(xs + phase)) and yq.shape == (3, 2, 1)
    assert amp.min() >= 0.1 and amp.max() <= 5.0 and xs.abs().max() <= 5.0
    tasks = sine.unstack(((xs, ys), (xq, yq)))
    assert len(tasks) == 3 and torch.equal(tasks[1][0][0], xs[1])
    torch.manual_seed(0)
    net = sine.make_mlp()
    assert sum(p.numel() for p in net.parameters()) == 1761
    assert net(xs[0]).shape == (5, 1)


def test_fewshot_workload():
    net = fewshot.conv4()
    assert sum(p.numel() for p in net.parameters()) == 112_261  # the README's d
    episodes = fewshot.sample_episodes(torch.Generator().manual_seed(0), 2, n_way=3, k_shot=2)
    (xs, ys), (xq, yq) = episodes[0]
    assert xs.shape == (6, 1, 28, 28) and xq.shape == (45, 1, 28, 28)
    assert ys.tolist() == [0, 0, 1, 1, 2, 2] and yq.bincount().tolist() == [15, 15, 15]
    assert fewshot.conv4(n_way=3)(xq).shape == (45, 3)
    again = fewshot.sample_episodes(torch.Generator().manual_seed(0), 2, n_way=3, k_shot=2)
    assert torch.equal(again[1][1][0], episodes[1][1][0])
    assert not torch.equal(episodes[0][0][0][:1], episodes[1][0][0][:1])


# --- the benchmark's rule arguments ------------------------------------------------------


def load_benchmark():
    path = EXAMPLES.parent / "benchmarks" / "bench_rules.py"
    spec = importlib.util.spec_from_file_location("bench_rules", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_rules"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_benchmark_reads_rule_specs_and_the_older_call_form():
    bench = load_benchmark()
    same = [
        ("binomial:order=2", "Binomial(2)", "Binomial(2)"),
        ("exact", "Exact", "Exact"),
        ("first_order", "FirstOrder", "FirstOrder"),
        ("implicit_cg:reg=1", "ImplicitCG(1.0)", "ImplicitCG(1.0)"),
        ("implicit_cg:reg=1,maxiter=10", "ImplicitCG(1.0, maxiter=10)",
         "ImplicitCG(1.0, maxiter=10)"),
        ("binomial:order=1,vectorize=false", "binomial(1, vectorize=False)",
         "Binomial(1, vectorize=False)"),
        ("adjoint:solver=heun", "Adjoint(solver='heun')", "Adjoint(solver='heun')"),
    ]  # fmt: skip
    for spec, call, label in same:
        rule = bench.parse_rule(spec)
        assert rule == bench.parse_rule(call) and rule.rule == tmg.parse_rule(spec)
        assert rule.label == label
    looped = bench.parse_rule("binomial:order=2").looped()
    assert looped.rule == tmg.Binomial(2, vectorize=False) and looped.label == "Binomial(2) loop"
    assert bench.parse_rule("exact").looped() is None
    # the default rows keep the labels of the committed results
    labels = [r.label for r in bench.parse_args([]).rules]
    assert labels == [
        "FirstOrder",
        "Truncated(2)",
        "Binomial(1)",
        "Binomial(2)",
        "Exact",
        "Unrolled",
    ]
    for bad, message in [("binomial:oder=2", "no knob 'oder'"),
                         ("Binomial(1, 2, 3, 4)", "at most 3"),
                         ("Binomial", "needs knob 'order'"),
                         ("nope", "unknown rule 'nope'")]:  # fmt: skip
        with pytest.raises(argparse.ArgumentTypeError, match=message):
            bench.parse_rule(bad)
