"""ImplicitNeumann against closed forms and ImplicitCG (the rule added through the three
places of CONTRIBUTING's "How to add a rule"; its contract tests come from its table row)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import TinyRegression
from test_implicit_adjoint import (
    Quadratic,
    grad_wrt,
    mlp_meta_grad,
    quad_meta_grad,
    rel,
)

import torchopt_metagrad as tmg


def _neumann_error(q: Quadratic, reg: float, terms: int) -> tuple[float, tmg.NeumannInfo]:
    params = q.params()
    rule = tmg.ImplicitNeumann(reg, terms=terms)
    adapted = tmg.adapt(q.inner, params, steps=400, lr=1.0 / (q.lmax + reg), rule=rule)
    assert rel(q.flat(adapted).detach(), q.prox_minimizer(reg)) < 1e-12
    with tmg.diagnostics.collect() as reports:
        got = quad_meta_grad(q, params, adapted)
    return rel(got, q.implicit_meta_grad(reg)), reports[0].info


def test_neumann_meets_the_closed_form_and_its_error_falls_geometrically():
    """reg (A + reg I)^{-1} g with reg above the largest eigenvalue: the error of J terms
    falls like rho^(J+1), rho = lmax / reg, down to <= 1e-8."""
    q = Quadratic.make(8, 0.5, 4.0, seed=3)
    reg = 8.0
    rho = q.lmax / reg  # 0.5
    terms = [2, 4, 8, 16, 32]
    errors = [_neumann_error(q, reg, t)[0] for t in terms]
    assert errors[-1] <= 1e-8
    slope = float(np.polyfit(terms, np.log(errors), 1)[0])  # log error vs terms
    assert slope == pytest.approx(np.log(rho), rel=0.15)
    _, info = _neumann_error(q, reg, 32)
    assert info.terms == 32 and info.contraction == pytest.approx(rho, rel=0.05)
    assert info.last_term < 1e-8


def test_neumann_agrees_with_implicit_cg_on_an_mlp():
    p = TinyRegression(seed=0)
    reg, steps, lr = 20.0, 300, 0.04
    cg = mlp_meta_grad(p, tmg.ImplicitCG(reg, maxiter=100, tol=1e-13), steps=steps, lr=lr)
    neumann = mlp_meta_grad(p, tmg.ImplicitNeumann(reg, terms=60), steps=steps, lr=lr)
    assert rel(neumann, cg) <= 1e-8
    assert rel(neumann, mlp_meta_grad(p, tmg.FirstOrder(), steps=steps, lr=lr)) > 1e-3


def test_neumann_through_the_implicit_decorator():
    q = Quadratic.make(6, 0.5, 3.0, seed=1)
    reg = 6.0
    rule = tmg.ImplicitNeumann(reg, terms=60)

    @tmg.implicit(q.inner, rule)
    def solve(params, batch):
        M = q.A + reg * torch.eye(q.d, dtype=torch.float64)
        phi = torch.linalg.solve(M, q.A @ q.a + reg * q.flat(params))
        return {"w": phi[:2], "v": phi[2:].reshape(-1, 1)}

    params = q.params()
    got = grad_wrt(q.outer(solve(params)), params)
    assert rel(got, q.implicit_meta_grad(reg)) <= 1e-10


def test_diverging_series_warns_saying_so():
    """reg below the largest eigenvalue: the terms grow; a SolverWarning says so."""
    q = Quadratic.make(6, 0.5, 10.0, seed=2)
    reg = 2.0
    params = q.params()
    rule = tmg.ImplicitNeumann(reg, terms=10)
    adapted = tmg.adapt(q.inner, params, steps=200, lr=1.0 / (q.lmax + reg), rule=rule)
    with pytest.warns(tmg.SolverWarning, match="does not converge.*raise reg"):
        quad_meta_grad(q, params, adapted)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"reg": 0.0}, ValueError, "reg"),
        ({"reg": 1.0, "terms": 0}, ValueError, "terms"),
        ({"reg": 1.0, "terms": 2.5}, TypeError, "terms"),
    ],
)
def test_bad_knobs_name_themselves(kwargs, error, match):
    with pytest.raises(error, match=match):
        tmg.ImplicitNeumann(**kwargs)
