"""ImplicitCG's linear solvers and the signals it gives when its assumptions fail.

Oracles (float64): ``torch.linalg.solve`` and scipy's MINRES on explicit symmetric
matrices; the proximal quadratic's closed forms (tests/test_implicit_adjoint.py).
"""

from __future__ import annotations

import itertools
import warnings

import numpy as np
import pytest
import scipy.sparse.linalg
import torch
from test_implicit_adjoint import F64, Quadratic, quad_meta_grad, rel

import torchopt_metagrad as tmg
from torchopt_metagrad.rules.linear_solvers import SOLVERS, solve


def _symmetric(d: int, eigs: torch.Tensor, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=F64))
    M = Q @ torch.diag(eigs.to(F64)) @ Q.T
    return (M + M.T) / 2


INDEFINITE = torch.cat([torch.linspace(-2.0, -0.1, 6), torch.linspace(0.2, 5.0, 14)])


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("x0", ["zero", "rhs"])
def test_solvers_reach_the_dense_solution(solver, x0):
    eigs = torch.linspace(0.5, 8.0, 20) if solver == "cg" else INDEFINITE
    M = _symmetric(20, eigs)
    b = torch.randn(20, generator=torch.Generator().manual_seed(1), dtype=F64)
    out = solve(lambda v: M @ v, b, solver=solver, x0=x0, maxiter=200, tol=1e-13)
    assert rel(out.x, torch.linalg.solve(M, b)) < 1e-9
    assert (out.min_curvature <= 0) == (solver != "cg")  # indefinite ones are detected


def test_minres_equals_scipy_iterate_by_iterate_and_its_residual_never_grows():
    M = _symmetric(30, torch.cat([INDEFINITE, torch.linspace(6, 9, 10)]), seed=2)
    b = torch.randn(30, generator=torch.Generator().manual_seed(3), dtype=F64)
    residuals = [1.0]
    for k in range(1, 16):
        x = solve(lambda v: M @ v, b, solver="minres", x0="zero", maxiter=k, tol=1e-15).x
        ref = scipy.sparse.linalg.minres(M.numpy(), b.numpy(), maxiter=k, rtol=1e-15)[0]
        assert np.abs(x.numpy() - ref).max() < 1e-10 * np.abs(ref).max()
        residuals.append(float((b - M @ x).norm() / b.norm()))
    assert all(r2 <= r1 + 1e-14 for r1, r2 in itertools.pairwise(residuals))


def test_unknown_solver_or_start_is_refused_naming_the_knob():
    with pytest.raises(ValueError, match="solver must be one of"):
        tmg.ImplicitCG(1.0, solver="gmres")
    with pytest.raises(ValueError, match="x0 must be one of"):
        tmg.ImplicitCG(1.0, x0="g")
    with pytest.raises(ValueError, match="inner_tol"):
        tmg.ImplicitCG(1.0, inner_tol=0.0)


# ------------------------------------------------------- signals on the proximal quadratic
def _indefinite_quadratic(lowest: float, reg: float = 1.0) -> Quadratic:
    """l = 1/2 (u-a)^T A (u-a) with A's smallest eigenvalue ``lowest`` (< -reg: the proximal
    objective is unbounded below, so any inner loop stops at a non-minimum)."""
    q = Quadratic.make(8, 1.0, 4.0, seed=5)
    A = _symmetric(8, torch.cat([torch.tensor([lowest]), torch.linspace(0.5, 4.0, 7)]), seed=6)
    return Quadratic(A, q.a, q.b, q.theta)


@pytest.mark.parametrize("solver", SOLVERS)
def test_every_solver_matches_the_closed_form_on_a_converged_quadratic(solver):
    q, reg = Quadratic.make(10, 1.0, 6.0, seed=4), 1.5
    rule = tmg.ImplicitCG(reg, maxiter=100, tol=1e-12, solver=solver)
    params = q.params()
    adapted = tmg.adapt(q.inner, params, steps=300, lr=1.0 / (6.0 + reg), rule=rule)
    with tmg.diagnostics.collect() as reports:
        got = quad_meta_grad(q, params, adapted)
    assert rel(got, q.implicit_meta_grad(reg)) < 1e-8
    info = reports[0].info
    assert info.solver == solver and info.stationarity < 1e-10 and 0 < info.gain <= 1
    assert info.min_curvature > 0 and not info.negative_curvature


def test_far_from_converged_inner_loop_warns_with_its_stationarity():
    q, reg = Quadratic.make(10, 1.0, 6.0, seed=4), 1.5
    rule = tmg.ImplicitCG(reg, maxiter=100, tol=1e-12)
    errors = {}
    for steps in (3, 300):
        params = q.params()
        adapted = tmg.adapt(q.inner, params, steps=steps, lr=0.02, rule=rule)
        with warnings.catch_warnings(record=True) as caught, tmg.diagnostics.collect() as rep:
            warnings.simplefilter("always")
            got = quad_meta_grad(q, params, adapted)
        errors[steps] = rel(got, q.implicit_meta_grad(reg))
        far = [w for w in caught if "far from a stationary point" in str(w.message)]
        assert len(far) == (1 if rep[0].info.stationarity > rule.inner_tol else 0)
        if steps == 3:  # few small steps: the implicit gradient is far off, and says so
            assert errors[3] > 0.1 and rep[0].info.stationarity > 0.5 and far
            assert rep[0].info.converged  # the linear solve itself is fine
    off = tmg.ImplicitCG(reg, maxiter=100, tol=1e-12, inner_tol=None)
    params = q.params()
    adapted = tmg.adapt(q.inner, params, steps=3, lr=0.02, rule=off)
    with warnings.catch_warnings(), tmg.diagnostics.collect() as rep:
        warnings.simplefilter("error")
        quad_meta_grad(q, params, adapted)
    assert rep[0].info.stationarity is None


def test_cg_on_an_indefinite_system_warns_negative_curvature_and_minres_solves_it():
    reg = 1.0
    q = _indefinite_quadratic(-1.8, reg)  # I + A/reg has eigenvalue -0.8
    M = torch.eye(8, dtype=F64) + q.A / reg

    @tmg.implicit(q.inner, tmg.ImplicitCG(reg, maxiter=50, tol=1e-12, solver="cg"))
    def stationary(params, batch):  # the proximal objective's stationary point (a saddle)
        x = torch.linalg.solve(q.A + reg * torch.eye(8, dtype=F64), q.A @ q.a + reg * q.theta)
        return {"w": x[:2].clone(), "v": x[2:].reshape(-1, 1).clone()}

    params = q.params()
    with pytest.warns(tmg.SolverWarning, match=r"negative curvature.*solver='minres'"):
        quad_meta_grad(q, params, stationary(params))
    rule = tmg.ImplicitCG(reg, maxiter=50, tol=1e-12)  # minres: the IFT answer at the saddle
    solver = tmg.implicit(q.inner, rule)(stationary.__wrapped__)
    with tmg.diagnostics.collect() as reports:
        got = quad_meta_grad(q, params, solver(params))
    x = torch.linalg.solve(q.A + reg * torch.eye(8, dtype=F64), q.A @ q.a + reg * q.theta)
    assert rel(got, torch.linalg.solve(M, x - q.b)) < 1e-9
    assert reports[0].info.converged  # (Lanczos vectors need not meet v^T M v <= 0)


def test_nearly_singular_system_warns_what_to_change():
    reg = 1.0
    q = _indefinite_quadratic(-1.0 + 1e-6, reg)  # I + A/reg has eigenvalue 1e-6

    @tmg.implicit(q.inner, tmg.ImplicitCG(reg, maxiter=50, tol=1e-10))
    def stationary(params, batch):
        x = torch.linalg.solve(q.A + reg * torch.eye(8, dtype=F64), q.A @ q.a + reg * q.theta)
        return {"w": x[:2].clone(), "v": x[2:].reshape(-1, 1).clone()}

    params = q.params()
    with (
        warnings.catch_warnings(record=True) as caught,
        tmg.diagnostics.collect() as reports,
    ):
        warnings.simplefilter("always")
        quad_meta_grad(q, params, stationary(params))
    messages = [str(w.message) for w in caught]
    assert any("nearly) singular" in m and "Raise reg" in m for m in messages), messages
    assert reports[0].info.gain > 1e3


# ------------------------------------------------------- tmg.implicit checks its solver's output
@pytest.mark.parametrize(
    ("bad", "error", "match"),
    [
        (lambda p: p["w"], TypeError, "must return a dict"),
        (lambda p: {"w": p["w"]}, ValueError, r"missing \['v'\]"),
        (lambda p: {**p, "z": p["w"]}, ValueError, r"unexpected \['z'\]"),
        (lambda p: {"w": p["w"][:1], "v": p["v"]}, ValueError, r"solver\['w'\] has shape \(1,\)"),
        (lambda p: {"w": p["w"], "v": p["v"].reshape(-1)}, ValueError, r"solver\['v'\] has shape"),
        (lambda p: {"w": p["w"].float(), "v": p["v"]}, TypeError, r"is torch.float32"),
        (lambda p: {"w": p["w"].tolist(), "v": p["v"]}, TypeError, r"must be a tensor"),
        (lambda p: {"w": p["w"] * float("nan"), "v": p["v"]}, tmg.NonFiniteError, r"solver\['w'\]"),
    ],
)  # fmt: skip
def test_implicit_decorator_refuses_bad_solver_output_naming_it(bad, error, match):
    q = Quadratic.make(6, 1.0, 3.0)
    wrapped = tmg.implicit(q.inner, tmg.ImplicitCG(1.0))(lambda params, batch: bad(params))
    with pytest.raises(error, match=match):
        wrapped(q.params())
