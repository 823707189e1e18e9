"""tmg.diagnostics' estimator measurements against independent float64 computations:
closed forms on quadratics (Hessian norm = largest |eigenvalue|, the exact meta-gradient
(I - lr A)^K g, FirstOrder's error), explicit Hessians of a small MLP, and hand-written
gradient descent for the inner iterates."""

from __future__ import annotations

import json
import math

import pytest
import torch

import torchopt_metagrad as tmg
from torchopt_metagrad.diagnostics import (
    Comparison,
    compare_to_exact,
    curvature_regime,
    hessian_norm,
    inner_iterates,
    meta_gradient,
)

DT = torch.float64


class Quadratic:
    r"""Inner loss :math:`\tfrac12 \phi^\top A \phi - b^\top \phi` over two parameter
    tensors (``w``: 3 entries, ``c``: 2), outer loss :math:`\tfrac12\|\phi - t\|^2`."""

    def __init__(self, eigenvalues: list[float], seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        n = len(eigenvalues)
        q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=DT))
        self.A = q @ torch.diag(torch.tensor(eigenvalues, dtype=DT)) @ q.T
        self.b = torch.randn(n, generator=gen, dtype=DT)
        self.target = torch.randn(n, generator=gen, dtype=DT)
        theta = torch.randn(n, generator=gen, dtype=DT)
        self.params = {
            "w": theta[:3].clone().requires_grad_(),
            "c": theta[3:].clone().requires_grad_(),
        }

    @staticmethod
    def flat(p: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([p["w"], p["c"]])

    def loss(self, p: dict[str, torch.Tensor], batch: str) -> torch.Tensor:
        phi = self.flat(p)
        if batch == "inner":
            return 0.5 * phi @ self.A @ phi - self.b @ phi
        return 0.5 * ((phi - self.target) ** 2).sum()

    def gd(self, steps: int, lr: float) -> list[torch.Tensor]:
        """phi_0 .. phi_K by the update written out: phi - lr (A phi - b)."""
        phi = self.flat(self.params).detach()
        out = [phi]
        for _ in range(steps):
            phi = phi - lr * (self.A @ phi - self.b)
            out.append(phi)
        return out

    def exact_meta_gradient(self, steps: int, lr: float) -> torch.Tensor:
        """(I - lr A)^K (phi_K - t): the step Jacobians are all I - lr A."""
        M = torch.linalg.matrix_power(torch.eye(len(self.b), dtype=DT) - lr * self.A, steps)
        return M @ (self.gd(steps, lr)[-1] - self.target)


def explicit_hessian_norm(loss_fn, params, batch) -> tuple[float, float]:
    """The two largest |eigenvalues| of the explicit Hessian (float64, torch.linalg)."""
    names, shapes = list(params), [p.shape for p in params.values()]
    flat = torch.cat([p.detach().reshape(-1) for p in params.values()])

    def loss_of_flat(x: torch.Tensor) -> torch.Tensor:
        parts = torch.split(x, [math.prod(s) for s in shapes])
        return loss_fn({n: t.reshape(s) for n, t, s in zip(names, parts, shapes)}, batch)

    H = torch.autograd.functional.hessian(loss_of_flat, flat)
    eig = torch.linalg.eigvalsh(H).abs().sort(descending=True).values
    return float(eig[0]), float(eig[1])


@pytest.mark.parametrize("eigenvalues", [[3.0, -5.0, 1.0, 0.5, 2.0], [0.1, 0.2, 4.0, -1.0, 0.0]])
def test_hessian_norm_of_a_quadratic_is_the_largest_absolute_eigenvalue(eigenvalues):
    quad = Quadratic(eigenvalues)
    expected = float(torch.linalg.eigvalsh(quad.A).abs().max())
    assert expected == pytest.approx(max(abs(e) for e in eigenvalues), rel=1e-12)
    gen = torch.Generator().manual_seed(0)
    value = hessian_norm(quad.loss, quad.params, "inner", iters=100, generator=gen)
    assert value == pytest.approx(expected, rel=1e-10)
    # from below, and the same number again for the same seed
    few = hessian_norm(quad.loss, quad.params, "inner", iters=2, generator=torch.Generator())
    assert few <= expected * (1 + 1e-12)
    again = hessian_norm(quad.loss, quad.params, "inner", iters=2, generator=torch.Generator())
    assert again == few


def test_hessian_norm_of_an_mlp_matches_its_explicit_hessian(problem):
    first, second = explicit_hessian_norm(problem.loss, problem.params, problem.inner)
    assert second < 0.95 * first  # a spectral gap: power iteration converges
    gen = torch.Generator().manual_seed(1)
    value = hessian_norm(problem.loss, problem.params, problem.inner, iters=600, generator=gen)
    assert value == pytest.approx(first, rel=1e-8)


def test_inner_iterates_are_gradient_descent_from_one_recorded_run():
    """K iterates from one run: the loss is evaluated K times (K re-runs would take K^2/2)."""
    quad = Quadratic([3.0, -5.0, 1.0, 0.5, 2.0])
    calls = []

    def counted(params, batch):
        calls.append(batch)
        return quad.loss(params, batch)

    steps, lr = 6, 0.05
    iterates = inner_iterates(counted, quad.params, "inner", steps=steps, lr=lr)
    assert len(calls) == steps and len(iterates) == steps
    for phi, expected in zip(iterates, quad.gd(steps, lr)[:steps]):
        assert set(phi) == {"w", "c"} and not any(v.requires_grad for v in phi.values())
        torch.testing.assert_close(Quadratic.flat(phi), expected, rtol=1e-14, atol=1e-14)
    assert quad.params["w"].grad is None  # the parameters are only read


def test_curvature_regime_of_a_quadratic():
    quad = Quadratic([3.0, -5.0, 1.0, 0.5, 2.0])
    gen = torch.Generator().manual_seed(0)
    value, norms = curvature_regime(
        quad.loss, quad.params, "inner", steps=4, lr=0.02, iters=100, generator=gen
    )
    assert norms == pytest.approx([5.0] * 4, rel=1e-10)  # the Hessian is A everywhere
    assert value == pytest.approx(4 * 0.02 * 5.0, rel=1e-10)


def test_curvature_regime_follows_the_iterates(problem):
    steps, lr = 3, 0.3
    gen = torch.Generator().manual_seed(2)
    value, norms = curvature_regime(
        problem.loss, problem.params, problem.inner, steps=steps, lr=lr, iters=600, generator=gen
    )
    iterates = inner_iterates(problem.loss, problem.params, problem.inner, steps=steps, lr=lr)
    for phi, norm in zip(iterates, norms):
        expected, _ = explicit_hessian_norm(problem.loss, phi, problem.inner)
        assert norm == pytest.approx(expected, rel=1e-6)
    assert value == pytest.approx(steps * lr * max(norms))
    assert len(set(norms)) == steps  # the Hessian changes along the trajectory


def test_meta_gradient_of_exact_is_the_closed_form():
    quad = Quadratic([3.0, -5.0, 1.0, 0.5, 2.0])
    task = ("inner", "outer")
    for steps, lr in [(1, 0.1), (5, 0.05), (12, 0.15)]:
        g = meta_gradient(quad.loss, quad.params, task, steps=steps, lr=lr, rule=tmg.Exact())
        assert g.dtype == DT and g.shape == (5,)
        torch.testing.assert_close(g, quad.exact_meta_gradient(steps, lr), rtol=1e-12, atol=1e-12)


def test_compare_to_exact_closed_forms():
    quad = Quadratic([3.0, -5.0, 1.0, 0.5, 2.0])
    task, steps, lr = ("inner", "outer"), 5, 0.05
    kw = {"steps": steps, "lr": lr}
    same = compare_to_exact(quad.loss, quad.params, task, rule=tmg.Exact(), **kw)
    assert same == Comparison(rel_error=0.0, cosine=pytest.approx(1.0, abs=1e-15))
    full_order = compare_to_exact(quad.loss, quad.params, task, rule=tmg.Truncated(steps), **kw)
    assert full_order.rel_error < 1e-14
    # FirstOrder drops every Jacobian: its estimate is phi_K - t itself.
    outer = quad.gd(steps, lr)[-1] - quad.target
    exact = quad.exact_meta_gradient(steps, lr)
    first = compare_to_exact(quad.loss, quad.params, task, rule=tmg.FirstOrder(), **kw)
    assert first.rel_error == pytest.approx(float((outer - exact).norm() / exact.norm()), rel=1e-12)
    cosine = float(outer @ exact / (outer.norm() * exact.norm()))
    assert first.cosine == pytest.approx(cosine, rel=1e-12)
    assert first.rel_error > 0.1  # not a vacuous check
    given = compare_to_exact(quad.loss, quad.params, task, rule=tmg.FirstOrder(), exact=exact, **kw)
    assert given.rel_error == pytest.approx(first.rel_error, rel=1e-12)


def test_comparison_of_two_vectors():
    between = Comparison.between
    result = between(torch.tensor([1.0, 0.0], dtype=DT), torch.tensor([0.0, 1.0], dtype=DT))
    assert result.rel_error == pytest.approx(math.sqrt(2)) and result.cosine == 0.0
    parallel = between(torch.tensor([2.0, 2.0], dtype=DT), torch.tensor([1.0, 1.0], dtype=DT))
    assert parallel == Comparison(1.0, pytest.approx(1.0, abs=1e-15))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"steps": 0}, "steps must be an int >= 1"), ({"steps": 2.0}, "steps must be an int"),
     ({"lr": 0.0}, "lr must be a number > 0"), ({"lr": "0.1"}, "lr must be")],
)  # fmt: skip
def test_bad_arguments_are_value_errors(kwargs, message):
    quad = Quadratic([1.0, 2.0, 3.0, 4.0, 5.0])
    with pytest.raises(ValueError, match=message):
        inner_iterates(quad.loss, quad.params, "inner", **{"steps": 2, "lr": 0.1, **kwargs})
    with pytest.raises(ValueError, match="iters must be an int >= 1"):
        hessian_norm(quad.loss, quad.params, "inner", iters=0)


# --- tmg.diagnostics.compare: every rule against Exact, with its cost -------------------


def _quad_table(**kw):
    quad = Quadratic([3.0, -5.0, 1.0, 0.5, 2.0])
    rules = kw.pop("rules", [tmg.FirstOrder(), tmg.Truncated(5), tmg.Binomial(2), tmg.Unrolled()])
    args = {"steps": 5, "lr": 0.05, "query": "outer", "repeats": 1, "power_iters": 200, **kw}
    return quad, tmg.diagnostics.compare(quad.loss, quad.params, "inner", rules=rules, **args)


def test_compare_closed_forms_on_a_quadratic():
    quad, table = _quad_table()
    assert [r.label for r in table.rows] == [
        "exact", "first_order", "truncated:order=5", "binomial:order=2", "unrolled",
    ]  # fmt: skip
    exact = quad.exact_meta_gradient(5, 0.05)
    outer = quad.gd(5, 0.05)[-1] - quad.target
    assert table["exact"].rel_error == 0.0 and table["unrolled"].rel_error < 1e-14
    assert table["truncated:order=5"].rel_error < 1e-14
    assert table["first_order"].rel_error == pytest.approx(
        float((outer - exact).norm() / exact.norm()), rel=1e-12
    )
    assert table["first_order"].cosine == pytest.approx(
        float(outer @ exact / (outer.norm() * exact.norm())), rel=1e-12
    )
    # products counted by the record: K, 0, L, L (K - L + 1); Unrolled has no record
    counts = {r.label: r.products for r in table.rows}
    assert counts == {"exact": 5, "first_order": 0, "truncated:order=5": 5,
                      "binomial:order=2": 8, "unrolled": None}  # fmt: skip
    # the regime: A_k = -lr A everywhere, ||A_k|| = lr * 5
    assert table.step_norms == pytest.approx([0.05 * 5.0] * 5, rel=1e-10)
    assert table.lr_max_h == pytest.approx(0.25, rel=1e-10)
    assert table.k_lr_max_h == pytest.approx(1.25, rel=1e-10)
    for row in table.rows:
        assert row.time_s > 0 and isinstance(row.peak_live_bytes, int)
        assert row.peak_live_bytes > 0
    info = table["binomial:order=2"].info
    assert isinstance(info, tmg.BinomialInfo) and info.order == 2 and info.dropped > 0


def test_compare_prints_a_table_and_gives_a_plain_dict():
    _, table = _quad_table(rules={"B2": tmg.Binomial(2), "auto": tmg.Binomial("auto")})
    text = str(table)
    assert text.splitlines()[0].startswith("K = 5 inner steps; lr * max_k ||H_k|| ~ 0.25")
    assert "| rule | rel. error | cosine | products | time (ms) |" in text
    assert "| B2 |" in text and "auto: order" in text and "| exact |" in text
    plain = table.as_dict()
    json.dumps(plain)  # plain values only
    assert list(plain["rules"]) == ["exact", "B2", "auto"]
    assert plain["K_lr_max_H"] == pytest.approx(1.25, rel=1e-10)
    assert plain["rules"]["auto"]["info"]["type"] == "BinomialInfo"
    assert plain["rules"]["auto"]["rel_error"] <= 1e-3


def test_compare_without_memory_and_with_exact_given():
    _, table = _quad_table(rules=[tmg.Binomial(1), tmg.Exact()], memory=False, repeats=2)
    assert [r.label for r in table.rows] == ["exact", "binomial:order=1"]
    assert all(r.peak_live_bytes is None for r in table.rows)


def test_compare_run_with_the_module_front_end_equals_compare(problem):
    """compare_run over a MetaSGD inner loop gives the numbers tmg.adapt's compare gives."""
    torchopt = pytest.importorskip("torchopt")
    K, lr = 3, 0.1
    net = problem.net
    leaves = list(net.parameters())
    state = torchopt.extract_state_dict(net, by="reference")

    def run(rule):
        torchopt.recover_state_dict(net, state)
        opt = tmg.MetaSGD(net, lr=lr, rule=rule)
        x, y = problem.inner
        for _ in range(K):
            opt.step(torch.nn.functional.mse_loss(net(x), y))
        xq, yq = problem.outer
        return torch.nn.functional.mse_loss(net(xq), yq)

    rules = [tmg.Binomial(1), tmg.Truncated(1)]
    module = tmg.diagnostics.compare_run(run, leaves, rules=rules, repeats=1, memory=False)
    torchopt.recover_state_dict(net, state)
    functional = tmg.diagnostics.compare(
        problem.loss, problem.params, problem.inner, query=problem.outer, steps=K, lr=lr,
        rules=rules, repeats=1, memory=False,
    )  # fmt: skip
    assert module.steps == functional.steps == K
    for a, b in zip(module.rows, functional.rows):
        assert a.label == b.label and a.products == b.products
        assert a.rel_error == pytest.approx(b.rel_error, rel=1e-9, abs=1e-14)
    assert module.step_norms == pytest.approx(functional.step_norms, rel=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [({"rules": []}, ValueError, "rules must name at least one rule"),
     ({"rules": tmg.Exact()}, TypeError, "rules must be a list of rules or a dict"),
     ({"rules": ["exact"]}, TypeError, r"rules\[\.\.\.\] must be a meta-gradient rule"),
     ({"rules": {"": tmg.Exact()}}, ValueError, "rule labels must be non-empty strings"),
     ({"rules": {"exact": tmg.FirstOrder()}}, ValueError, "the label 'exact' appears twice"),
     ({"repeats": 0}, ValueError, "repeats must be >= 1"),
     ({"power_iters": 0}, ValueError, "power_iters must be >= 1"),
     ({"memory": 1}, TypeError, "memory must be a bool"),
     ({"steps": 0}, ValueError, "steps must be >= 1"),
     ({"lr": -1.0}, ValueError, "lr")],
)  # fmt: skip
def test_compare_bad_arguments_name_them(kwargs, error, message):
    quad = Quadratic([1.0, 2.0, 3.0, 4.0, 5.0])
    args = {"steps": 2, "lr": 0.1, "rules": [tmg.FirstOrder()], "repeats": 1, **kwargs}
    with pytest.raises(error, match=message):
        tmg.diagnostics.compare(quad.loss, quad.params, "inner", **args)


def test_compare_run_refuses_a_run_that_ignores_the_rule(problem):
    def run(rule):
        adapted = tmg.adapt(problem.loss, problem.params, problem.inner, steps=2, lr=0.1,
                            rule=tmg.Unrolled())  # fmt: skip
        return problem.loss(adapted, problem.outer)

    with pytest.raises(ValueError, match="ran no inner loop with the rule it was given"):
        tmg.diagnostics.compare_run(run, problem.params, rules=[tmg.FirstOrder()])
    with pytest.raises(ValueError, match="params must be a non-empty dict or list of tensors"):
        tmg.diagnostics.compare_run(run, [], rules=[tmg.FirstOrder()])
    with pytest.raises(TypeError, match="run must be callable"):
        tmg.diagnostics.compare_run(None, problem.params, rules=[tmg.FirstOrder()])


def test_step_norms_are_batched_power_iteration(problem):
    """One apply_many sweep per iteration; the same norms as hessian_norm at each iterate."""
    steps, lr = 3, 0.3
    with tmg.diagnostics.collect() as reports:
        gen = torch.Generator().manual_seed(0)
        _, norms = curvature_regime(problem.loss, problem.params, problem.inner, steps=steps,
                                    lr=lr, iters=400, generator=gen)  # fmt: skip
    assert reports == []  # diagnostics only: no meta-gradient was computed
    for phi, norm in zip(inner_iterates(problem.loss, problem.params, problem.inner,
                                        steps=steps, lr=lr), norms):  # fmt: skip
        expected, _ = explicit_hessian_norm(problem.loss, phi, problem.inner)
        assert norm == pytest.approx(expected, rel=1e-6)


def test_compare_run_over_tasks_under_vmap(problem):
    """A run that maps tmg.adapt over tasks with torch.func.vmap: one report per backward,
    the step norms the largest over the tasks."""
    x = torch.stack([problem.inner[0], problem.outer[0]])
    y = torch.stack([problem.inner[1], problem.outer[1]])

    def task(rule, xs, ys):
        adapted = tmg.adapt(problem.loss, problem.params, (xs, ys), steps=3, lr=0.1, rule=rule)
        return problem.loss(adapted, problem.outer)

    def together(rule):
        return torch.func.vmap(lambda a, b: task(rule, a, b))(x, y).sum()

    def apart(rule):
        return task(rule, x[0], y[0]) + task(rule, x[1], y[1])

    rules = [tmg.Binomial(1), tmg.FirstOrder()]
    kw = {"rules": rules, "repeats": 1, "memory": False, "power_iters": 100}
    a = tmg.diagnostics.compare_run(together, problem.params, **kw)
    b = tmg.diagnostics.compare_run(apart, problem.params, **kw)
    for ra, rb in zip(a.rows, b.rows):
        assert ra.rel_error == pytest.approx(rb.rel_error, rel=1e-9, abs=1e-14)
        assert ra.products == rb.products
    assert a.step_norms == pytest.approx(b.step_norms, rel=1e-6)
