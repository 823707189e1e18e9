"""tmg.flow end to end: as accurate as its forward solve by default, fixed-step methods on
the stored grid, a step budget for non-smooth nets."""

from __future__ import annotations

import pytest
import torch
from test_implicit_adjoint import Quadratic, quad_meta_grad, rel
from torch import nn
from torch.nn import functional as F

import torchopt_metagrad as tmg

F64 = torch.float64


@pytest.mark.parametrize("T", [1.0, 2.0])
def test_default_adjoint_under_flow_is_as_accurate_as_the_forward_solve(T):
    """solver=ODE(dopri5, rtol=1e-10, atol=1e-12): expm(-T A) g to ~1e-8 (the Heun
    scheme over a 0.01 grid stopped at its O(h^2) error, 7e-5)."""
    q = Quadratic.make(6, 0.5, 4.0, seed=0)
    params = q.params()
    solver = tmg.ODE("dopri5", rtol=1e-10, atol=1e-12)
    with tmg.diagnostics.collect() as reports:
        got = quad_meta_grad(q, params, tmg.flow(q.inner, params, T=T, solver=solver))
    assert rel(got, q.flow_meta_grad(T)) <= 1e-8
    assert reports[0].info.scheme.startswith("ode:dopri5")
    params = q.params()
    heun = tmg.flow(q.inner, params, T=T, solver=solver, rule=tmg.Adjoint(solver="heun"))
    assert rel(quad_meta_grad(q, params, heun), q.flow_meta_grad(T)) > 1e-6  # O(h^2)


@pytest.mark.parametrize("backward", [tmg.ODE("rk4"), tmg.ODE("euler")], ids=repr)
def test_fixed_step_backward_without_step_size_uses_the_stored_grid(backward):
    """rk4 with no step size used to integrate T = 2 in one step (relative error 155)."""
    q = Quadratic.make(6, 0.5, 4.0, seed=0)
    T = 2.0
    params = q.params()
    forward = tmg.ODE("dopri5", rtol=1e-10, atol=1e-12)
    adapted = tmg.flow(q.inner, params, T=T, solver=forward, rule=tmg.Adjoint(solver=backward))
    tol = 1e-6 if backward.method == "rk4" else 5e-2  # rk4: O(h^4); euler: O(h)
    assert rel(quad_meta_grad(q, params, adapted), q.flow_meta_grad(T)) <= tol


def _relu_problem():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 1))
    x = torch.linspace(-5, 5, 10).reshape(-1, 1)
    y = 3 * torch.sin(x + 0.5)

    def loss(params, batch):
        return F.mse_loss(torch.func.functional_call(net, params, (batch[0],)), batch[1])

    return net, loss, (x, y)


def test_adaptive_solver_on_a_relu_net_stops_at_its_step_budget_with_advice():
    net, loss, batch = _relu_problem()
    params = dict(net.named_parameters())
    with pytest.raises(tmg.ODESolveError, match=r"max_steps=50.*rk4"):
        tmg.flow(loss, params, batch, T=0.5, solver=tmg.ODE(rtol=1e-12, atol=1e-14, max_steps=50))


def test_fixed_step_flow_on_a_relu_net_is_close_to_exact():
    net, loss, batch = _relu_problem()
    params = dict(net.named_parameters())
    adapted = tmg.flow(loss, params, batch, T=0.5, solver=tmg.ODE("euler"), save_every=0.01)
    flow_grad = torch.autograd.grad(loss(adapted, batch), list(params.values()))
    exact = tmg.adapt(loss, params, batch, steps=50, lr=0.01, rule=tmg.Exact())
    exact_grad = torch.autograd.grad(loss(exact, batch), list(params.values()))
    a = torch.cat([g.reshape(-1) for g in flow_grad])
    b = torch.cat([g.reshape(-1) for g in exact_grad])
    # forward euler on the grid is gradient descent; the adjoint differs by O(h)
    assert rel(a, b) < 0.1


def test_heun_on_a_stiff_flow_refines_instead_of_returning_garbage():
    """||H|| = 250, h = 0.01: h ||H|| = 2.5 > 2 gave relative error 1e21 before."""
    q = Quadratic.make(5, 1.0, 250.0, seed=4)
    params = q.params()
    rule = tmg.Adjoint(solver="heun")
    with tmg.diagnostics.collect() as reports:
        adapted = tmg.flow(q.inner, params, T=1.0, rule=rule, save_every=0.01)
        got = quad_meta_grad(q, params, adapted)
    assert rel(got, q.flow_meta_grad(1.0)) < 1e-3
    assert reports[0].info.substeps > 100  # some intervals were split
