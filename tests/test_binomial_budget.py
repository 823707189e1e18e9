"""Binomial's memory budget (how many products a batched call holds) and its
``hessian_scale="code"`` estimator, against float64 oracles."""

from __future__ import annotations

import pytest
import torch
from conftest import TinyRegression
from torch import nn

import torchopt_metagrad as tmg
from torchopt_metagrad._core.budget import AUTO_FLOOR, PeakLiveBytes, rows_per_call
from torchopt_metagrad.diagnostics import LiveMemoryTracker

try:
    from tests import oracles
except ImportError:  # tests/ is not a package: pytest puts tests/ itself on sys.path
    import oracles  # type: ignore[no-redef]

LR = 0.2


def meta_grad(p: TinyRegression, rule: tmg.AbstractRule, steps: int = 8, lr=0.1) -> torch.Tensor:
    params = p.params
    adapted = tmg.adapt(p.loss, params, p.inner, steps=steps, lr=lr, rule=rule)
    grads = torch.autograd.grad(p.loss(adapted, p.outer), list(params.values()))
    return torch.cat([g.reshape(-1) for g in grads])


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_rows_per_call_follows_the_documented_rule():
    mib = 2**20
    assert rows_per_call(10 * mib, 3 * mib, 100) == 3
    assert rows_per_call(1, 3 * mib, 100) == 1  # at least one row
    assert rows_per_call("auto", 16 * mib, 100) == 25  # K / 4 products
    assert rows_per_call("auto", 16 * mib, 5) == 1
    assert rows_per_call("auto", 40 * 1024, 5) == AUTO_FLOOR // (40 * 1024)  # the floor


@pytest.mark.parametrize("order", [2, "auto"])
@pytest.mark.parametrize(
    "knobs",
    [{"memory": "auto"}, {"memory": 1}, {"memory": 3 * 30_000}, {"chunk_size": 3}, {}],
    ids=["auto", "one-row", "bytes", "chunk3", "default"],
)
def test_the_budget_does_not_change_the_meta_gradient(problem, order, knobs):
    whole = meta_grad(problem, tmg.Binomial(order, memory=None))
    looped = meta_grad(problem, tmg.Binomial(order, vectorize=False))
    assert rel(meta_grad(problem, tmg.Binomial(order, **knobs)), whole) < 1e-13
    assert rel(looped, whole) < 1e-13


@pytest.mark.parametrize("memory", [None, 1, "auto"])
def test_the_budget_does_not_change_meta_parameter_gradients(problem, memory):
    log_lr = torch.tensor(-2.0, dtype=torch.float64, requires_grad=True)
    params = problem.params

    def grads(rule):
        out = tmg.adapt(problem.loss, params, problem.inner, steps=6, lr=log_lr.exp(), rule=rule)
        return torch.autograd.grad(problem.loss(out, problem.outer), [*params.values(), log_lr])

    ref = grads(tmg.Binomial(2, vectorize=False))
    for a, b in zip(grads(tmg.Binomial(2, memory=memory)), ref, strict=True):
        assert rel(a, b) < 1e-12


def _wide_problem() -> tuple[nn.Module, tuple, tuple]:
    """Activations (2048 points x 64 units) dominate: the products' graphs are what counts."""
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 64), nn.Tanh(), nn.Linear(64, 1))
    x = torch.randn(2048, 8, generator=gen)
    return net, (x, x.sum(1, keepdim=True).sin()), (x[:16], x[:16].sum(1, keepdim=True))


def _peak(rule: tmg.AbstractRule, steps: int = 16) -> int:
    net, inner, outer = _wide_problem()
    params = dict(net.named_parameters())

    def loss(p, b):
        return ((torch.func.functional_call(net, p, (b[0],)) - b[1]) ** 2).mean()

    with LiveMemoryTracker() as mem:
        adapted = tmg.adapt(loss, params, inner, steps=steps, lr=0.05, rule=rule)
        loss(adapted, outer).backward()
    return mem.peak_bytes


def test_a_budget_bounds_the_peak_memory():
    whole, one, auto = (_peak(tmg.Binomial(2, memory=m)) for m in (None, 1, "auto"))
    looped = _peak(tmg.Binomial(2, vectorize=False))
    # 15 products at once without a budget; one at a time with a 1-byte budget
    assert one < 0.3 * whole
    assert abs(one - looped) <= 0.05 * looped
    # "auto" at K = 16: 4 products per call (about 3.5 MB each: 2 fit in the floor)
    assert one < auto < 0.5 * whole


def test_the_probe_counts_what_the_live_memory_tracker_counts():
    x = torch.randn(256, 32, requires_grad=True)

    def product():
        (g,) = torch.autograd.grad((x.tanh() ** 3).sum(), x, create_graph=True)
        return torch.autograd.grad((g * g).sum(), x)[0]

    with PeakLiveBytes() as probe:
        product()
    with LiveMemoryTracker() as mem:
        product()
    assert probe.peak == mem.peak_bytes > 0


@pytest.mark.parametrize("bad", [0, -5, 1.5, True, "big"])
def test_bad_memory_is_refused_naming_it(bad):
    with pytest.raises(ValueError, match="memory"):
        tmg.Binomial(2, memory=bad)


# ----------------------------------------------------------------- hessian_scale="code"
@pytest.mark.parametrize(("steps", "order"), [(4, 1), (5, 2), (5, 3), (4, 4)])
@pytest.mark.parametrize("mode", ["same_batch", "per_step_batches"])
def test_code_scale_is_the_expansion_with_lr_times_order_over_steps(steps, order, mode):
    """Brute force: every subset of <= L steps, explicit Hessians, factor -lr L/K H_k."""
    prob = oracles.make_problem(steps, per_step_batches=mode == "per_step_batches", seed=steps)
    orc = oracles.build_oracle(prob, oracles.gd_map(LR))
    scaled = [(order / steps) * A for A in orc.As]
    expected = oracles.binomial_by_enumeration(scaled, orc.v, order)[: orc.d]
    params = prob.fresh_params()
    batches = prob.inner_batches
    adapted = tmg.adapt(
        prob.inner_loss,
        params,
        batches=list(batches),
        steps=steps,
        lr=LR,
        rule=tmg.Binomial(order, hessian_scale="code"),
    )
    est = prob.flatten(torch.autograd.grad(prob.outer_loss(adapted), list(params.values())))
    assert oracles.rel_err(est, expected) <= 1e-10
    if order < steps:  # a different estimator from the paper's expansion
        assert oracles.rel_err(est, orc.binomial(order)) > 1e-6
    else:
        assert oracles.rel_err(est, orc.exact()) <= 1e-10


def test_code_scale_from_a_spec_and_its_errors():
    rule = tmg.parse_rule("binomial:order=2,hessian_scale=code")
    assert rule == tmg.Binomial(2, hessian_scale="code")
    assert tmg.format_rule(rule) == "binomial:order=2,hessian_scale=code"
    assert tmg.parse_rule("binomial:order=2,memory=1000000").memory == 1_000_000
    assert tmg.parse_rule("binomial:order=2,memory=none").memory is None
    with pytest.raises(ValueError, match="hessian_scale"):
        tmg.Binomial(2, hessian_scale="repo")
    with pytest.raises(ValueError, match="hessian_scale='code' needs a fixed order"):
        tmg.Binomial("auto", hessian_scale="code")


@pytest.mark.parametrize("rule", [tmg.Exact(), tmg.Binomial(2)], ids=repr)
def test_vmap_over_one_task_equals_the_task_alone(problem, rule):
    """One task under vmap runs its own inner loop (no batched loop inside): same result."""
    params = problem.params
    x, y = problem.inner

    def task(xs, ys):
        out = tmg.adapt(problem.loss, params, (xs, ys), steps=4, lr=0.1, rule=rule)
        return problem.loss(out, problem.outer)

    batched = torch.autograd.grad(
        torch.func.vmap(task)(x[None], y[None]).sum(), list(params.values())
    )
    alone = torch.autograd.grad(task(x, y), list(params.values()))
    for a, b in zip(batched, alone, strict=True):
        assert rel(a, b) < 1e-13


def test_the_cheap_finiteness_check_is_exact():
    from torchopt_metagrad._core.checks import all_finite

    assert all_finite(torch.tensor([3e38, 3e38]))  # the sum overflows, the entries are finite
    assert not all_finite(torch.tensor([1.0, float("nan")]))
    assert not all_finite(torch.tensor([float("inf"), float("-inf")]))
    assert not all_finite(torch.tensor([1.0, float("inf")]))
