"""Binomial's regime check and its automatic order, on the sine problem and tiny oracles.

The acceptance grid of issue 10: the sine MLP (``workloads/sine.py``, float64, three
tasks) at lr in {0.001, 0.003, 0.01, 0.03} and K in {5, 10, 20}. The regime warning must
fire in every setting where ``Binomial(1)``'s mean error exceeds ``Truncated(1)``'s and in
none where ``Binomial(2)``'s is below a tenth of ``Truncated(2)``'s (threshold:
``REGIME_THRESHOLD``, derived in ``benchmarks/bench_regime.py``); ``order="auto"`` with
``tol=1e-3`` must be within 1e-3 of ``Exact`` wherever it does not fall back.
"""

from __future__ import annotations

import functools
import warnings

import pytest
import torch

import torchopt_metagrad as tmg
from torchopt_metagrad.diagnostics import collect, reset_call_site_warnings
from torchopt_metagrad.rules.binomial_series import REGIME_THRESHOLD, elementary_symmetric
from workloads import sine

pytestmark = pytest.mark.filterwarnings("error::torchopt_metagrad.RegimeWarning")

DT = torch.float64
GRID = [(lr, K) for lr in (0.001, 0.003, 0.01, 0.03) for K in (5, 10, 20)]


@pytest.fixture(autouse=True)
def _fresh_call_sites():
    reset_call_site_warnings()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: one thread is faster, and steady on a shared CPU
    yield
    torch.set_num_threads(threads)
    reset_call_site_warnings()


@functools.lru_cache(maxsize=1)
def sine_problem(tasks: int = 3):
    torch.manual_seed(0)
    net = sine.make_mlp().to(DT)

    def loss_fn(params, batch):
        x, y = batch
        return torch.nn.functional.mse_loss(torch.func.functional_call(net, params, (x,)), y)

    gen = torch.Generator().manual_seed(1)
    stacked = sine.sample_tasks(gen, tasks)
    data = [tuple(tuple(t.to(DT) for t in b) for b in task) for task in sine.unstack(stacked)]
    return loss_fn, dict(net.named_parameters()), data


def meta_grad(rule, lr, K, task):
    """(flat meta-gradient, the rule's report, the RegimeWarnings it emitted)."""
    loss_fn, params, (support, query) = *sine_problem()[:2], task
    with collect() as reports, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", tmg.RegimeWarning)
        reset_call_site_warnings()
        adapted = tmg.adapt(loss_fn, params, support, steps=K, lr=lr, rule=rule)
        grads = torch.autograd.grad(loss_fn(adapted, query), list(params.values()))
    regime = [w for w in caught if issubclass(w.category, tmg.RegimeWarning)]
    return torch.cat([g.reshape(-1) for g in grads]), reports[-1], regime


def rel(a, b):
    return float((a - b).norm() / b.norm())


@functools.cache
def grid_setting(lr, K):
    """Mean errors of T1, B1, T2, B2; per task whether B1 / B2 warned; auto's outcomes."""
    tasks = sine_problem()[2]
    errors = {name: 0.0 for name in ("T1", "B1", "T2", "B2")}
    warned = {"B1": [], "B2": []}
    auto = []
    for task in tasks:
        exact, _, _ = meta_grad(tmg.Exact(), lr, K, task)
        for name, rule in [("T1", tmg.Truncated(1)), ("B1", tmg.Binomial(1)),
                           ("T2", tmg.Truncated(2)), ("B2", tmg.Binomial(2))]:  # fmt: skip
            g, report, regime = meta_grad(rule, lr, K, task)
            errors[name] += rel(g, exact) / len(tasks)
            if name in warned:
                info = report.info
                assert isinstance(info, tmg.BinomialInfo) and info.order == rule.order
                assert info.reliable is (info.dropped <= REGIME_THRESHOLD)
                assert bool(regime) is (not info.reliable)  # the warning says what info says
                warned[name].append(not info.reliable)
        g, report, regime = meta_grad(tmg.Binomial("auto", tol=1e-3), lr, K, task)
        auto.append((rel(g, exact), report.info, [str(w.message) for w in regime]))
    return errors, warned, auto


@pytest.mark.parametrize(("lr", "K"), GRID)
def test_regime_warning_on_the_sine_grid(lr, K):
    errors, warned, _ = grid_setting(lr, K)
    if errors["B1"] > errors["T1"]:
        assert any(warned["B1"]), (errors, warned)
    if errors["B2"] < errors["T2"] / 10:
        assert not any(warned["B2"]), (errors, warned)


def test_the_grid_has_both_kinds_of_setting():
    """Not vacuous: several settings where the warning must fire, several where it must not."""
    must_fire = must_not = 0
    for lr, K in GRID:
        errors, _, _ = grid_setting(lr, K)
        must_fire += errors["B1"] > errors["T1"]
        must_not += errors["B2"] < errors["T2"] / 10
    assert must_fire >= 4 and must_not >= 4, (must_fire, must_not)


@pytest.mark.parametrize(("lr", "K"), GRID)
def test_auto_order_meets_its_tolerance_on_the_sine_grid(lr, K):
    for error, info, regime in grid_setting(lr, K)[2]:
        assert info.auto and bool(regime) is info.fell_back
        if info.fell_back:
            assert info.order == K and error < 1e-12  # the exact product
            assert info.tried <= min(6, K) and "Exact" in regime[0]
        else:
            assert error <= 1e-3
            assert info.contribution <= 1e-3 or info.order == K  # K: the exact product
            assert info.order == info.tried <= min(6, K)


def test_auto_converges_somewhere_on_the_grid():
    """Not vacuous: the automatic order answers without falling back in most settings."""
    answered = [not info.fell_back for lr, K in GRID for _, info, _ in grid_setting(lr, K)[2]]
    assert sum(answered) >= len(answered) // 2, answered


def test_auto_picks_low_orders_where_the_series_is_quick():
    """At lr = 0.001, K = 5 the series converges fast: a low order, no fallback."""
    task = sine_problem()[2][0]
    _, report, _ = meta_grad(tmg.Binomial("auto"), 0.001, 5, task)
    assert report.info.order <= 3 and not report.info.fell_back
    assert report.products == sum(5 - m + 1 for m in range(1, report.info.order + 1))


# --- oracles: the regime number, the warning's form, the knobs -------------------------


def test_elementary_symmetric_polynomials():
    xs = [0.5, 2.0, 3.0]
    assert elementary_symmetric(xs, 0) == 1.0
    assert elementary_symmetric(xs, 1) == pytest.approx(5.5)
    assert elementary_symmetric(xs, 2) == pytest.approx(0.5 * 2 + 0.5 * 3 + 2 * 3)
    assert elementary_symmetric(xs, 3) == pytest.approx(3.0)
    assert elementary_symmetric(xs, 4) == 0.0


def test_regime_estimate_from_the_rules_own_products(problem):
    """rho_k = ||A_k g|| / ||g|| for Binomial(1); dropped = sum_{n >= 2} e_n(rho) ||g|| /
    ||estimate||."""
    K, lr = 4, 0.3
    params = problem.params
    with collect() as reports, pytest.warns(tmg.RegimeWarning):
        adapted = tmg.adapt(problem.loss, params, problem.inner, steps=K, lr=lr,
                            rule=tmg.Binomial(1))  # fmt: skip
        out = torch.autograd.grad(problem.loss(adapted, problem.outer), list(params.values()))
    estimate = torch.cat([o.reshape(-1) for o in out])
    # independent: A_k g = -lr H_k g at the gradient-descent iterates, by double backward
    adapted = tmg.adapt(problem.loss, params, problem.inner, steps=K, lr=lr, rule=tmg.Unrolled())
    g = torch.autograd.grad(problem.loss(adapted, problem.outer), list(adapted.values()))
    g = torch.cat([x.reshape(-1) for x in g])
    phis = tmg.diagnostics.inner_iterates(problem.loss, params, problem.inner, steps=K, lr=lr)
    rho = []
    for phi in phis:
        leaves = {n: t.clone().requires_grad_() for n, t in phi.items()}
        grads = torch.autograd.grad(problem.loss(leaves, problem.inner), list(leaves.values()),
                                    create_graph=True)  # fmt: skip
        flat = torch.cat([x.reshape(-1) for x in grads])
        hv = torch.autograd.grad(flat @ g, list(leaves.values()))
        rho.append(float(lr * torch.cat([x.reshape(-1) for x in hv]).norm() / g.norm()))
    info = reports[0].info
    assert info.step_norms == pytest.approx(rho, rel=1e-10)
    tail = sum(elementary_symmetric(rho, n) for n in range(2, K + 1))
    expected = tail * float(g.norm()) / float(estimate.norm())
    assert info.dropped == pytest.approx(expected, rel=1e-10)


def test_warning_names_the_number_and_the_remedies_once_per_call_site(problem):
    def backward(rule):
        adapted = tmg.adapt(problem.loss, problem.params, problem.inner, steps=4, lr=0.4,
                            rule=rule)  # fmt: skip
        problem.loss(adapted, problem.outer).backward()

    with pytest.warns(tmg.RegimeWarning) as caught:
        for _ in range(3):
            backward(tmg.Binomial(1))  # one call site: one warning
    assert len(caught) == 1
    text = str(caught[0].message)
    assert text.startswith("Binomial(1): the truncated expansion looks unreliable")
    assert "Binomial('auto')" in text and "Truncated(L)" in text and "Exact()" in text
    assert "check=False" in text and f"threshold {REGIME_THRESHOLD:g}" in text
    assert caught[0].filename == __file__  # the user's line, not the library's
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        backward(tmg.Binomial(2))  # the same call site (the line in backward()): silent
    with pytest.warns(tmg.RegimeWarning):  # another line: warns again
        adapted = tmg.adapt(problem.loss, problem.params, problem.inner, steps=4, lr=0.4,
                            rule=tmg.Binomial(1))  # fmt: skip
        problem.loss(adapted, problem.outer).backward()
    reset_call_site_warnings()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        backward(tmg.Binomial(1, check=False))  # ... no check: silent
        backward(tmg.Binomial(4))  # order == steps: exact, nothing dropped


def test_checked_and_unchecked_give_the_same_numbers(problem):
    def grad(rule):
        adapted = tmg.adapt(problem.loss, problem.params, problem.inner, steps=5, lr=0.4,
                            rule=rule)  # fmt: skip
        return torch.autograd.grad(problem.loss(adapted, problem.outer), problem.net[0].weight)

    with pytest.warns(tmg.RegimeWarning):
        checked = grad(tmg.Binomial(2))
    assert torch.equal(checked[0], grad(tmg.Binomial(2, check=False))[0])


@pytest.mark.parametrize("learn_lr", [False, True])
def test_auto_order_with_meta_parameters_matches_the_fixed_order_it_chose(problem, learn_lr):
    """Value and meta-parameter part of Binomial('auto') equal Binomial(L) for the L it chose,
    and the fallback equals Exact for both."""
    K = 8

    def grads(rule, lr_value):
        lr = torch.tensor(lr_value, dtype=DT, requires_grad=True) if learn_lr else lr_value
        params = {n: t.detach().clone().requires_grad_() for n, t in problem.params.items()}
        with collect() as reports:
            adapted = tmg.adapt(problem.loss, params, problem.inner, steps=K, lr=lr, rule=rule)
            wrt = [*params.values(), *([lr] if learn_lr else [])]
            out = torch.autograd.grad(problem.loss(adapted, problem.outer), wrt)
        return torch.cat([o.reshape(-1) for o in out]), reports[0]

    auto, report = grads(tmg.Binomial("auto", tol=1e-4), 0.01)
    assert not report.info.fell_back and 1 <= report.info.order < K
    fixed, _ = grads(tmg.Binomial(report.info.order, check=False), 0.01)
    torch.testing.assert_close(auto, fixed, rtol=1e-12, atol=1e-14)
    with pytest.warns(tmg.RegimeWarning, match=r"returned the exact product"):
        fallback, report = grads(tmg.Binomial("auto", max_order=2), 0.4)
    assert report.info.fell_back and report.info.order == K and report.info.tried <= 2
    exact, exact_report = grads(tmg.Exact(), 0.4)
    torch.testing.assert_close(fallback, exact, rtol=1e-11, atol=1e-14)
    # the fallback reuses the exact adjoint the stages hold: K - tried more serial products
    tried = report.info.tried
    stages = sum(K - m + 1 for m in range(1, tried + 1))
    # (+ the meta-parameters' pullbacks of the last `tried` steps, one batched call)
    assert report.products == stages + (K - tried) + (tried if learn_lr else 0)
    assert exact_report.products == K


def test_auto_reaching_every_step_is_the_exact_product(problem):
    params = problem.params
    with collect() as reports:
        adapted = tmg.adapt(problem.loss, params, problem.inner, steps=3, lr=0.05,
                            rule=tmg.Binomial("auto", tol=1e-15))  # fmt: skip
        g = torch.autograd.grad(problem.loss(adapted, problem.outer), list(params.values()))
    adapted = tmg.adapt(problem.loss, params, problem.inner, steps=3, lr=0.05, rule=tmg.Exact())
    e = torch.autograd.grad(problem.loss(adapted, problem.outer), list(params.values()))
    for a, b in zip(g, e):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)
    assert reports[0].info.order == 3 and not reports[0].info.fell_back


KNOB_ERRORS = [
    ({"order": "Auto"}, ValueError, r"order must be an int >= 0 or 'auto', got 'Auto'"),
    ({"order": -1}, ValueError, r"order must be >= 0, got -1"),
    ({"order": 2.0}, TypeError, r"order must be an int >= 0, got 2.0"),
    ({"order": 2, "check": 1}, TypeError, r"check must be a bool, got 1"),
    ({"order": 2, "tol": 1e-4}, ValueError, r"tol applies to order='auto' only"),
    ({"order": 2, "max_order": 3}, ValueError, r"max_order applies to order='auto' only"),
    ({"order": "auto", "check": False}, ValueError, r"check=False applies to a fixed order"),
    ({"order": "auto", "tol": 0.0}, ValueError, r"tol must be a finite float > 0, got 0.0"),
    ({"order": "auto", "tol": 1.0}, ValueError, r"tol must be in \(0, 1\), got 1.0"),
    ({"order": "auto", "tol": "1e-3"}, TypeError, r"tol must be a float > 0, got '1e-3'"),
    ({"order": "auto", "max_order": 0}, ValueError, r"max_order must be >= 1, got 0"),
    ({"order": "auto", "max_order": 2.5}, TypeError, r"max_order must be an int >= 1"),
]


@pytest.mark.parametrize(("knobs", "error", "message"), KNOB_ERRORS, ids=str)
def test_bad_knobs_name_the_argument(knobs, error, message):
    with pytest.raises(error, match=message):
        tmg.Binomial(**knobs)


def test_auto_accepts_any_number_of_steps_and_clips_max_order(problem):
    rule = tmg.Binomial("auto", max_order=50)
    rule.validate(1)  # no "order > steps" for auto: max_order is clipped to the steps
    adapted = tmg.adapt(problem.loss, problem.params, problem.inner, steps=2, lr=0.01, rule=rule)
    with collect() as reports:
        problem.loss(adapted, problem.outer).backward()
    assert reports[0].info.order <= 2


def test_tasks_under_vmap_report_the_worst_task_and_share_the_order():
    """All tasks' loops run together under torch.func.vmap: the check reports the worst
    task's estimate; the automatic order is the first that meets tol for every task."""
    loss_fn, params, tasks = sine_problem()
    stack = [torch.stack(list(t)) for t in zip(*[(*s, *q) for s, q in tasks])]
    lr, K = 0.003, 20

    def run(rule):
        def task(x, y, xq, yq):
            adapted = tmg.adapt(loss_fn, params, (x, y), steps=K, lr=lr, rule=rule)
            return loss_fn(adapted, (xq, yq))

        with collect() as reports, warnings.catch_warnings():
            warnings.simplefilter("ignore", tmg.RegimeWarning)
            out = torch.func.vmap(task)(*stack)
            grads = torch.autograd.grad(out.sum(), list(params.values()))
        return torch.cat([g.reshape(-1) for g in grads]), reports

    def loop(rule):
        infos, total = [], None
        for task in tasks:
            g, report, _ = meta_grad(rule, lr, K, task)
            infos.append(report.info)
            total = g if total is None else total + g
        return total, infos

    together, reports = run(tmg.Binomial(1))
    one_by_one, infos = loop(tmg.Binomial(1))
    torch.testing.assert_close(together, one_by_one, rtol=1e-10, atol=1e-14)
    assert len(reports) == 1  # one backward for all the tasks
    assert reports[0].info.dropped == pytest.approx(max(i.dropped for i in infos), rel=1e-9)
    assert len({i.reliable for i in infos}) == 2  # a mixed regime: some tasks warn
    assert reports[0].products == len(tasks) * K
    auto = tmg.Binomial("auto", max_order=10)
    together, reports = run(auto)
    _, infos = loop(auto)
    order = reports[0].info.order
    assert not reports[0].info.fell_back and order >= max(i.order for i in infos)
    fixed, _ = loop(tmg.Binomial(order, check=False))
    torch.testing.assert_close(together, fixed, rtol=1e-10, atol=1e-14)


def test_the_readme_example_uses_settings_where_its_rule_is_accurate():
    """The README's first example (its net is the sine MLP): the rule it shows is silent and
    within 10% of Exact on sine tasks in float32, the dtype it runs in."""
    import pathlib
    import re

    readme = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
    example = readme.split("```python", 1)[1].split("```", 1)[0]
    assert "torch.nn.Linear(40, 40)" in example  # the sine MLP of workloads/sine.py
    found = re.search(r"steps=(\d+), lr=([\d.]+), rule=tmg\.Binomial\((\d+)\)", example)
    assert found, "the example's adapt call changed: update this test"
    K, lr, order = int(found[1]), float(found[2]), int(found[3])
    torch.manual_seed(0)
    net = sine.make_mlp()
    params = dict(net.named_parameters())

    def loss_fn(p, batch):
        x, y = batch
        return torch.nn.functional.mse_loss(torch.func.functional_call(net, p, (x,)), y)

    gen = torch.Generator().manual_seed(1)
    errors = []
    for support, query in sine.unstack(sine.sample_tasks(gen, 8)):
        grads = {}
        for rule in (tmg.Exact(), tmg.Binomial(order)):
            adapted = tmg.adapt(loss_fn, params, support, steps=K, lr=lr, rule=rule)
            out = torch.autograd.grad(loss_fn(adapted, query), list(params.values()))
            grads[type(rule)] = torch.cat([o.reshape(-1) for o in out])  # no RegimeWarning
        errors.append(rel(grads[tmg.Binomial], grads[tmg.Exact]))
    assert sum(errors) / len(errors) < 0.1, errors
