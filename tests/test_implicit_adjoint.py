"""ImplicitCG (iMAML) and Adjoint (A-MAML) against closed forms and brute-force oracles.

Quadratic oracles: with the inner loss ``l(u) = 1/2 (u - a)^T A (u - a)`` (A SPD) and the
outer loss ``L(u) = 1/2 ||u - b||^2``, everything is in closed form (float64):

* ImplicitCG(reg): the proximal minimizer is ``phi* = (A + reg I)^{-1} (A a + reg theta)``
  and the meta-gradient ``reg (A + reg I)^{-1} (phi* - b)``;
* Adjoint: the gradient flow is ``u(T) = a + expm(-T A) (theta - a)`` and the adjoint
  ``lambda(0) = expm(-T A) g`` with ``g = grad L(u(T))`` (H = A is constant, so the only
  error of the Heun scheme is its own O(h^2)).

On a small tanh MLP the oracles are a dense solve with the explicit Hessian (implicit) and
``tmg.Exact()`` of the same gradient-descent loop (adjoint, which differs by O(lr)).
"""

from __future__ import annotations

import gc
import itertools
import math
import warnings
from dataclasses import dataclass

import numpy as np
import pytest
import scipy.linalg
import torch
import torchopt
from conftest import TinyRegression

import torchopt_metagrad as tmg
from torchopt_metagrad._core.ode import ODE
from torchopt_metagrad.diagnostics import LiveMemoryTracker

F64 = torch.float64


# --------------------------------------------------------------------------- helpers
@dataclass
class Quadratic:
    """``l(u) = 1/2 (u-a)^T A (u-a)`` inner, ``L(u) = 1/2 ||u-b||^2`` outer, start ``theta``.

    The flat vector ``u`` is split into two named tensors (shapes (2,) and (d-2, 1)) so
    that the flattening of a params dict is exercised too.
    """

    A: torch.Tensor
    a: torch.Tensor
    b: torch.Tensor
    theta: torch.Tensor

    @classmethod
    def make(cls, d: int, eig_lo: float, eig_hi: float, seed: int = 0) -> Quadratic:
        gen = torch.Generator().manual_seed(seed)
        Q, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=F64))
        eig = torch.linspace(eig_lo, eig_hi, d, dtype=F64)
        A = Q @ torch.diag(eig) @ Q.T
        A = (A + A.T) / 2
        a, b, theta = (torch.randn(d, generator=gen, dtype=F64) for _ in range(3))
        return cls(A, a, b, theta)

    @property
    def d(self) -> int:
        return self.A.shape[0]

    @property
    def lmax(self) -> float:
        return float(torch.linalg.eigvalsh(self.A).max())

    def params(self) -> dict[str, torch.Tensor]:
        return {
            "w": self.theta[:2].clone().requires_grad_(),
            "v": self.theta[2:].reshape(-1, 1).clone().requires_grad_(),
        }

    @staticmethod
    def flat(params: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([params["w"].reshape(-1), params["v"].reshape(-1)])

    def inner(self, params: dict[str, torch.Tensor], batch: object = None) -> torch.Tensor:
        u = self.flat(params) - self.a
        return 0.5 * u @ self.A @ u

    def outer(self, params: dict[str, torch.Tensor]) -> torch.Tensor:
        return 0.5 * ((self.flat(params) - self.b) ** 2).sum()

    # closed forms
    def prox_minimizer(self, reg: float) -> torch.Tensor:
        M = self.A + reg * torch.eye(self.d, dtype=F64)
        return torch.linalg.solve(M, self.A @ self.a + reg * self.theta)

    def implicit_meta_grad(self, reg: float) -> torch.Tensor:
        M = self.A + reg * torch.eye(self.d, dtype=F64)
        return reg * torch.linalg.solve(M, self.prox_minimizer(reg) - self.b)

    def expm(self, T: float) -> torch.Tensor:
        return torch.from_numpy(scipy.linalg.expm(-T * self.A.numpy()))

    def flow_state(self, T: float) -> torch.Tensor:
        return self.a + self.expm(T) @ (self.theta - self.a)

    def flow_meta_grad(self, T: float) -> torch.Tensor:
        return self.expm(T) @ (self.flow_state(T) - self.b)


def grad_wrt(loss: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
    grads = torch.autograd.grad(loss, list(params.values()))
    return torch.cat([g.reshape(-1) for g in grads])


def quad_meta_grad(q: Quadratic, params: dict[str, torch.Tensor], adapted) -> torch.Tensor:
    return grad_wrt(q.outer(adapted), params)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def loglog_slope(xs, ys) -> float:
    """Least-squares slope of log(ys) against log(xs)."""
    return float(np.polyfit(np.log(xs), np.log(ys), 1)[0])


def mlp_flat(params: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1) for t in params.values()])


def mlp_meta_grad(p: TinyRegression, rule: tmg.AbstractRule, **kw) -> torch.Tensor:
    adapted = tmg.adapt(p.loss, p.params, p.inner, rule=rule, **kw)
    return grad_wrt(p.loss(adapted, p.outer), p.params)


# --------------------------------------------------------------- 1. ImplicitCG, quadratic
QUADRATICS = [(3, 1.0, 5.0), (6, 0.5, 10.0), (10, 3.0, 20.0)]  # (d, reg, largest eigenvalue)


def _inner_kw(inner: str, q: Quadratic, reg: float) -> dict:
    lr = 1.0 / (q.lmax + reg)  # stable for the proximal Hessian A + reg I
    if inner == "gd":
        return {"lr": lr}
    if inner == "momentum":
        return {"optimizer": torchopt.sgd(0.5 * lr, momentum=0.9)}
    return {"optimizer": torchopt.adam(0.05)}


@pytest.mark.parametrize("inner", ["gd", "momentum", "adam"])
@pytest.mark.parametrize(("d", "reg", "eig_hi"), QUADRATICS)
def test_implicit_cg_matches_closed_form_on_quadratic(d, reg, eig_hi, inner):
    """reg (A + reg I)^{-1} g at the proximal minimizer, whatever optimizer got there."""
    q = Quadratic.make(d, 1.0, eig_hi, seed=d)
    rule = tmg.ImplicitCG(reg, maxiter=100, tol=1e-12)
    params = q.params()
    adapted = tmg.adapt(q.inner, params, steps=500, rule=rule, **_inner_kw(inner, q, reg))
    # the inner loop converged to the proximal minimizer ...
    assert rel(q.flat(adapted).detach(), q.prox_minimizer(reg)) < 1e-10
    # ... and the meta-gradient is the closed form, with g taken at the exact minimizer
    with tmg.diagnostics.collect() as reports:
        got = quad_meta_grad(q, params, adapted)
    assert rel(got, q.implicit_meta_grad(reg)) <= 1e-8
    assert len(reports) == 1 and reports[0].rule is rule and reports[0].front_end == "tmg.adapt"
    info = reports[0].info
    assert isinstance(info, tmg.CGInfo)
    assert 1 <= info.iterations <= 2 * d  # CG on a d-dim SPD system
    assert info.residual <= 1e-12
    assert info.converged is True


def test_implicit_cg_reports_each_backward_and_stays_frozen():
    """Each backward reports its own CGInfo through collect(); the rule object is untouched."""
    q = Quadratic.make(20, 1.0, 10.0, seed=1)
    reg, lr = 2.0, 1.0 / 12.0  # cond(I + A/reg) = 6 / 1.5 = 4
    rule = tmg.ImplicitCG(reg, maxiter=100, tol=1e-12)
    loose = tmg.ImplicitCG(reg, maxiter=100, tol=1e-3)
    infos = []
    for r in (rule, loose):
        params = q.params()
        adapted = tmg.adapt(q.inner, params, steps=300, lr=lr, rule=r)
        with tmg.diagnostics.collect() as reports:
            got = quad_meta_grad(q, params, adapted)
        infos.append(reports[0].info)
        assert infos[-1].converged and infos[-1].residual <= r.tol
        assert rel(got, q.implicit_meta_grad(reg)) <= 4 * r.tol + 1e-13  # error <= cond * res
    assert infos[1].iterations < infos[0].iterations  # looser tol: fewer CG steps
    params = q.params()
    adapted = tmg.adapt(q.inner, params, steps=300, lr=lr, rule=rule)
    with tmg.diagnostics.collect() as reports:
        quad_meta_grad(q, params, adapted)
    assert reports[0].info is not infos[0] and reports[0].info == infos[0]  # fresh, identical
    assert vars(rule) == vars(tmg.ImplicitCG(reg, maxiter=100, tol=1e-12))  # nothing stored
    assert rule == tmg.ImplicitCG(reg, maxiter=100, tol=1e-12)
    assert hash(rule) == hash(tmg.ImplicitCG(reg, maxiter=100, tol=1e-12))


def test_implicit_cg_with_tiny_maxiter_warns_and_reports_not_converged():
    # eigenvalues 1e-3 .. 1e3 and reg=1e-2: I + A/reg has condition number ~1e5
    gen = torch.Generator().manual_seed(0)
    d = 10
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=F64))
    A = Q @ torch.diag(torch.logspace(-3, 3, d, dtype=F64)) @ Q.T
    q = Quadratic((A + A.T) / 2, *(torch.randn(d, generator=gen, dtype=F64) for _ in range(3)))
    # two inner steps: far from stationary on purpose; the stationarity check is off here
    # (tests/test_implicit_solvers.py tests it)
    rule = tmg.ImplicitCG(1e-2, maxiter=1, tol=1e-10, inner_tol=None)
    params = q.params()
    adapted = tmg.adapt(q.inner, params, steps=2, lr=1e-4, rule=rule)
    with (
        pytest.warns(tmg.SolverWarning, match=r"after 1 iterations.*raise maxiter or reg"),
        tmg.diagnostics.collect() as reports,
    ):
        quad_meta_grad(q, params, adapted)
    info = reports[0].info
    assert info.iterations == 1
    assert info.converged is False
    assert info.residual > 1e-10
    assert math.isfinite(info.residual)


# ---------------------------------------------------------------- 2. ImplicitCG, tanh MLP
def test_implicit_cg_on_mlp_approaches_dense_implicit_gradient_as_maxiter_grows():
    p = TinyRegression(seed=0)
    reg, steps, lr = 1.0, 200, 0.2
    names = list(p.params)
    shapes = [t.shape for t in p.params.values()]
    sizes = [t.numel() for t in p.params.values()]

    def unflat(flat: torch.Tensor) -> dict[str, torch.Tensor]:
        return {k: t.view(s) for k, t, s in zip(names, flat.split(sizes), shapes)}

    errors, infos, exact = [], [], None
    maxiters = (1, 2, 4, 8, 16, 64)
    for maxiter in maxiters:
        rule = tmg.ImplicitCG(reg, maxiter=maxiter, tol=1e-13)
        adapted = tmg.adapt(p.loss, p.params, p.inner, steps=steps, lr=lr, rule=rule)
        if exact is None:
            phi = mlp_flat(adapted)
            # the inner loop reached the proximal minimizer (stationary point)
            leaf = phi.clone().requires_grad_()
            theta = mlp_flat(p.params)
            (gi,) = torch.autograd.grad(p.loss(unflat(leaf), p.inner), leaf)
            assert float((gi + reg * (phi - theta)).norm()) < 1e-9
            H = torch.autograd.functional.hessian(lambda u: p.loss(unflat(u), p.inner), phi)
            assert float(torch.linalg.eigvalsh(H).min()) > -reg  # I + H/reg is SPD
            (g,) = torch.autograd.grad(p.loss(unflat(leaf), p.outer), leaf)
            exact = torch.linalg.solve(torch.eye(phi.numel(), dtype=F64) + H / reg, g)
        with warnings.catch_warnings(record=True) as caught, tmg.diagnostics.collect() as rep:
            warnings.simplefilter("always", tmg.SolverWarning)
            got = grad_wrt(p.loss(adapted, p.outer), p.params)
        errors.append(rel(got, exact))
        infos.append(rep[0].info)
        # a warning exactly when CG stopped above tol
        assert len(caught) == (0 if infos[-1].converged else 1)
    assert errors[0] > 1e-2  # one CG step is a poor solve: the sequence means something
    for prev, nxt in itertools.pairwise(errors):
        assert nxt <= max(prev, 1e-12)
    assert errors[-1] <= 1e-8
    assert errors[-2] <= 1e-6
    for m, info in zip(maxiters, infos):
        assert info.iterations <= m
        if not info.converged:
            assert info.iterations == m
    assert infos[-1].converged and infos[-1].residual <= 1e-13


# --------------------------------------------------------------- 3. tmg.implicit decorator
def _sgd_solver(loss_fn, rule, lr, steps):
    def solve(params, batch):
        phi = {k: v.clone().requires_grad_() for k, v in params.items()}
        opt = torch.optim.SGD(list(phi.values()), lr=lr)
        for _ in range(steps):
            opt.zero_grad()
            prox = sum(((phi[k] - params[k]) ** 2).sum() for k in phi)
            (loss_fn(phi, batch) + rule.reg / 2 * prox).backward()
            opt.step()
        return phi

    return solve


def _lbfgs_solver(loss_fn, rule):
    def solve(params, batch):
        phi = {k: v.clone().requires_grad_() for k, v in params.items()}
        opt = torch.optim.LBFGS(
            list(phi.values()),
            lr=1.0,
            max_iter=200,
            tolerance_grad=1e-14,
            tolerance_change=0.0,
            line_search_fn="strong_wolfe",
        )

        def closure():
            opt.zero_grad()
            prox = sum(((phi[k] - params[k]) ** 2).sum() for k in phi)
            loss = loss_fn(phi, batch) + rule.reg / 2 * prox
            loss.backward()
            return loss

        opt.step(closure)
        return phi

    return solve


@pytest.mark.parametrize("solver", ["sgd", "lbfgs"])
@pytest.mark.parametrize(("d", "reg", "eig_hi"), QUADRATICS[:2])
def test_implicit_decorator_with_user_solver_matches_closed_form_and_adapt(d, reg, eig_hi, solver):
    q = Quadratic.make(d, 1.0, eig_hi, seed=d)
    rule = tmg.ImplicitCG(reg, maxiter=100, tol=1e-12)
    raw = (
        _sgd_solver(q.inner, rule, 1.0 / (q.lmax + reg), 500)
        if solver == "sgd"
        else _lbfgs_solver(q.inner, rule)
    )
    solve = tmg.implicit(q.inner, rule)(raw)
    params = q.params()
    adapted = solve(params)
    assert list(adapted) == ["w", "v"]
    assert adapted["v"].shape == params["v"].shape
    assert rel(q.flat(adapted).detach(), q.prox_minimizer(reg)) < 1e-9
    with tmg.diagnostics.collect() as reports:
        got = quad_meta_grad(q, params, adapted)
    assert rel(got, q.implicit_meta_grad(reg)) <= 1e-7
    assert reports[0].front_end == "tmg.implicit" and reports[0].info.converged

    rule2 = tmg.ImplicitCG(reg, maxiter=100, tol=1e-12)
    params2 = q.params()
    adapted2 = tmg.adapt(q.inner, params2, steps=500, lr=1.0 / (q.lmax + reg), rule=rule2)
    assert rel(got, quad_meta_grad(q, params2, adapted2)) <= 1e-7


def test_implicit_decorator_on_mlp_matches_adapt_with_the_same_inner_loop():
    """Same inner iterates (SGD == GD on the proximal objective): same CG, same answer."""
    p = TinyRegression(seed=2)
    rule = tmg.ImplicitCG(1.0, maxiter=50, tol=1e-12)
    solve = tmg.implicit(p.loss, rule)(_sgd_solver(p.loss, rule, 0.2, 200))
    got = grad_wrt(p.loss(solve(p.params, p.inner), p.outer), p.params)
    want = mlp_meta_grad(p, tmg.ImplicitCG(1.0, maxiter=50, tol=1e-12), steps=200, lr=0.2)
    assert rel(got, want) <= 1e-9


# ------------------------------------------------------------------ 4. Adjoint, quadratic
FLOW_Q = dict(d=5, eig_lo=0.5, eig_hi=3.0, seed=1)


@pytest.mark.parametrize(
    "rule",
    [
        tmg.Adjoint(solver=ODE("dopri5", rtol=1e-10, atol=1e-12)),
        tmg.Adjoint(solver=ODE("dopri5", rtol=1e-10, atol=1e-12), reintegrate=True),
        tmg.Adjoint(solver=ODE("rk4", step_size=0.01)),
    ],
    ids=repr,
)
def test_flow_adjoint_odeint_backwards_match_expm_on_quadratic(rule):
    q = Quadratic.make(**FLOW_Q)
    T = 1.0
    params = q.params()
    adapted = tmg.flow(q.inner, params, T=T, rule=rule, save_every=0.1)
    uT = q.flat(adapted).detach()
    assert rel(uT, q.flow_state(T)) <= 1e-6  # forward solve at its default tolerances
    got = quad_meta_grad(q, params, adapted)
    want = q.expm(T) @ (uT - q.b)  # g at the returned point isolates the backward solve
    assert rel(got, want) <= 1e-6


def test_flow_adjoint_heun_error_is_second_order_in_state_spacing():
    q = Quadratic.make(**FLOW_Q)
    T, hs, errors = 1.0, (0.1, 0.05, 0.025, 0.0125), []
    for h in hs:
        params = q.params()
        adapted = tmg.flow(q.inner, params, T=T, rule=tmg.Adjoint(solver="heun"), save_every=h)
        gT = q.flat(adapted).detach() - q.b
        got = quad_meta_grad(q, params, adapted)
        errors.append(rel(got, q.expm(T) @ gT))
        # H is constant, so each Heun step is exactly I - hA + (hA)^2 / 2
        step = torch.eye(q.d, dtype=F64) - h * q.A + 0.5 * h**2 * q.A @ q.A
        assert rel(got, torch.linalg.matrix_power(step, round(T / h)) @ gT) < 1e-12
    slope = loglog_slope(hs, errors)
    assert 1.8 <= slope <= 2.2, (slope, errors)
    assert all(b < a for a, b in itertools.pairwise(errors))
    assert errors[-1] < 1e-3


def test_adapt_gd_with_adjoint_approaches_flow_meta_gradient_as_lr_shrinks():
    """K * lr = T fixed: O(lr) to the flow's meta-gradient, O(lr^2) to expm(-TA) g_K."""
    q = Quadratic.make(**FLOW_Q)
    T, lrs = 1.0, (0.1, 0.05, 0.025, 0.0125)
    to_flow, to_expm = [], []
    for lr in lrs:
        params = q.params()
        adapted = tmg.adapt(q.inner, params, steps=round(T / lr), lr=lr, rule=tmg.Adjoint())
        got = quad_meta_grad(q, params, adapted)
        to_flow.append(rel(got, q.flow_meta_grad(T)))
        gK = q.flat(adapted).detach() - q.b
        to_expm.append(rel(got, q.expm(T) @ gK))
    assert all(b < a for a, b in itertools.pairwise(to_flow))
    assert 0.8 <= loglog_slope(lrs, to_flow) <= 1.3, to_flow
    assert to_flow[-1] < 0.02
    assert 1.8 <= loglog_slope(lrs, to_expm) <= 2.2, to_expm
    assert to_expm[-1] < 1e-3


# ------------------------------------------------------------------- 5. Adjoint, tanh MLP
def test_adjoint_of_gd_loop_on_mlp_approaches_exact_as_lr_shrinks():
    p = TinyRegression(seed=0)
    T, lrs, diffs = 1.0, (0.1, 0.05, 0.025, 0.0125), []
    for lr in lrs:
        K = round(T / lr)
        adj = mlp_meta_grad(p, tmg.Adjoint(), steps=K, lr=lr)
        exact = mlp_meta_grad(p, tmg.Exact(), steps=K, lr=lr)
        diffs.append(rel(adj, exact))
    for a, b in itertools.pairwise(diffs):
        assert 1.6 <= a / b <= 2.4, diffs  # halving lr halves the gap
    assert 0.8 <= loglog_slope(lrs, diffs) <= 1.2, diffs
    assert diffs[-1] < 0.01


# ---------------------------------------------------------------- 6. tmg.adjoint decorator
@pytest.mark.parametrize(
    "rule",
    [tmg.Adjoint(solver="heun"), tmg.Adjoint(solver=ODE()), tmg.Adjoint(ODE(), reintegrate=True)],
    ids=repr,
)
def test_adjoint_decorator_with_user_euler_equals_adapt_with_adjoint(rule):
    p = TinyRegression(seed=3)
    lr, K = 0.05, 20

    @tmg.adjoint(p.loss, T=lr * K, rule=rule)
    def dynamics(params, batch):
        states, u = [params], params
        for _ in range(K):
            g = torch.autograd.grad(p.loss(u, batch), list(u.values()))
            u = {k: (v - lr * gk).detach().requires_grad_() for (k, v), gk in zip(u.items(), g)}
            states.append(u)
        return states

    adapted = dynamics(p.params, p.inner)
    reference = tmg.adapt(p.loss, p.params, p.inner, steps=K, lr=lr, rule=rule)
    for k in reference:
        torch.testing.assert_close(adapted[k], reference[k], rtol=1e-13, atol=1e-15)
    got = grad_wrt(p.loss(adapted, p.outer), p.params)
    want = grad_wrt(p.loss(reference, p.outer), p.params)
    assert rel(got, want) <= 1e-12


# ---------------------------------------------------------------------------- 7. errors
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"reg": 0.0}, "reg must be"),
        ({"reg": -1.0}, "reg must be"),
        ({"reg": 1.0, "maxiter": 0}, "maxiter must be"),
        ({"reg": 1.0, "tol": 0.0}, "tol must be"),
        ({"reg": 1.0, "tol": -1e-6}, "tol must be"),
    ],
)
def test_implicit_cg_rejects_bad_knobs(kwargs, match):
    with pytest.raises(ValueError, match=match):
        tmg.ImplicitCG(**kwargs)


def test_adjoint_rejects_bad_knobs():
    with pytest.raises(ValueError, match=r"solver must be 'heun'.*method='nope'.*dopri5"):
        tmg.Adjoint(solver="nope")
    with pytest.raises(TypeError, match="solver must be"):
        tmg.Adjoint(solver=1.0)
    with pytest.raises(ValueError, match="reintegrate=True needs an ODE solver"):
        tmg.Adjoint(solver="heun", reintegrate=True)
    with pytest.raises(ValueError, match="rtol must be"):
        tmg.Adjoint(solver=ODE(rtol=0.0))
    with pytest.raises(ValueError, match="step_size must be"):
        tmg.Adjoint(solver=ODE("rk4", step_size=-0.1))


@pytest.mark.parametrize("T", [0.0, -1.0])
def test_flow_rejects_nonpositive_T(T):
    q = Quadratic.make(**FLOW_Q)
    with pytest.raises(ValueError, match="T must be"):
        tmg.flow(q.inner, q.params(), T=T)
    with pytest.raises(ValueError, match="T must be"):
        tmg.adjoint(q.inner, T=T)


def test_flow_and_decorators_reject_wrong_rules():
    q = Quadratic.make(**FLOW_Q)
    with pytest.raises(ValueError, match=r"Exact differentiates discrete inner steps.*tmg.flow"):
        tmg.flow(q.inner, q.params(), T=1.0, rule=tmg.Exact())
    with pytest.raises(ValueError, match=r"Adjoint .*gradient flow.*tmg.implicit"):
        tmg.implicit(q.inner, tmg.Adjoint())
    with pytest.raises(ValueError, match=r"ImplicitCG needs a proximal term.*tmg.adjoint"):
        tmg.adjoint(q.inner, T=1.0, rule=tmg.ImplicitCG(1.0))
    with pytest.raises(TypeError, match="rule must be a meta-gradient rule"):
        tmg.flow(q.inner, q.params(), T=1.0, rule="adjoint")


@pytest.mark.parametrize("rule", [tmg.ImplicitCG(1.0), tmg.Adjoint()], ids=repr)
def test_single_objective_rules_reject_per_step_batches(problem, rule):
    with pytest.raises(ValueError, match=r"one batch \(batch=...\), not per-step batches"):
        tmg.adapt(
            problem.loss, problem.params, batches=[problem.inner] * 3, steps=3, lr=0.1, rule=rule
        )


def test_adjoint_with_torchopt_optimizer_is_refused_at_the_call_saying_why(problem):
    """Both front ends refuse it up front (the module front end at its first step)."""
    with pytest.raises(ValueError, match=r"plain gradient descent.*tmg\.adapt"):
        tmg.adapt(
            problem.loss,
            problem.params,
            problem.inner,
            steps=3,
            optimizer=torchopt.adam(0.05),
            rule=tmg.Adjoint(),
        )


def test_forward_flow_blowup_raises_ode_solve_error_naming_the_solve():
    """du/dt = exp(u) from u=0 blows up at t=1 < T."""
    params = {"u": torch.zeros(3, dtype=F64, requires_grad=True)}
    with pytest.raises(tmg.ODESolveError, match=r"forward gradient-flow solve.*t=") as err:
        tmg.flow(lambda p, _: -torch.exp(p["u"]).sum(), params, T=2.0)
    t_fail = float(str(err.value).split("t=")[1].split(":")[0])
    assert 0.9 < t_fail <= 1.0


def _concave_overflow(rule: tmg.Adjoint, via: str):
    """l = -50 ||u||^2 from u = 0 (the state stays 0, H = -100 I), g = 1e300 * ones.

    lambda(t) = exp(100 (T - t)) g overflows float64 near t = T - 0.19, so the
    backward solve cannot succeed.
    """
    params = {"u": torch.zeros(3, dtype=F64, requires_grad=True)}

    def loss(p, _):
        return -50.0 * (p["u"] ** 2).sum()

    if via == "flow":
        adapted = tmg.flow(loss, params, T=1.0, rule=rule)
    else:
        adapted = tmg.adapt(loss, params, steps=10, lr=0.1, rule=rule)
    (1e300 * adapted["u"].sum()).backward()


@pytest.mark.parametrize("via", ["flow", "adapt"])
def test_backward_odeint_failure_raises_ode_solve_error_naming_the_solve(via):
    # torchdiffeq either fails (ODESolveError) or returns inf at the end of an interval
    # (NonFiniteError); both name the solve and the time
    with pytest.raises(
        (tmg.ODESolveError, tmg.NonFiniteError), match=r"backward adjoint solve.*t="
    ) as err:
        _concave_overflow(tmg.Adjoint(solver=ODE()), via)
    t_fail = float(str(err.value).split("t=")[1].split(":")[0].split(" ")[0])
    assert 0.7 < t_fail < 1.0


def test_backward_heun_overflow_raises_non_finite_error_with_time():
    with pytest.raises(tmg.NonFiniteError, match=r"backward adjoint solve at t=0\.\d+"):
        _concave_overflow(tmg.Adjoint(), "flow")


@pytest.mark.parametrize("via", ["flow", "adapt"])
def test_backward_reintegrate_failure_raises_ode_solve_error(via):
    with pytest.raises(tmg.ODESolveError, match=r"backward adjoint solve .*re-integration.* t="):
        _concave_overflow(tmg.Adjoint(solver=ODE(), reintegrate=True), via)


# --------------------------------------------------------------------- 8. memory smoke
def test_flow_adjoint_memory_grows_only_by_the_stored_states():
    """T=3 vs T=1 at the same save_every: + 40 flat states, no per-step autograd graph."""
    p = TinyRegression(seed=0)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(64, 2, generator=gen, dtype=F64)
    inner = (x, torch.sin(x.sum(1, keepdim=True)))
    d = sum(t.numel() for t in p.params.values())
    save_every, peaks = 0.05, {}
    for T in (1.0, 3.0):
        params = {k: v.detach().clone().requires_grad_() for k, v in p.params.items()}
        gc.collect()
        with LiveMemoryTracker() as mem:
            adapted = tmg.flow(p.loss, params, inner, T=T, save_every=save_every)
            p.loss(adapted, p.outer).backward()
            del adapted
        peaks[T] = mem.peak_bytes
        assert torch.isfinite(params["0.weight"].grad).all()
    extra_states = round((3.0 - 1.0) / save_every) * d * 8
    # one graph of the inner loss on 64 samples is several KB; 40+ kept steps would be
    # far above this bound
    assert peaks[3.0] - peaks[1.0] <= extra_states + 4096, (peaks, extra_states)
    assert peaks[1.0] < 200_000


@pytest.mark.parametrize("tol", [math.inf, True, "1e-3"])
def test_implicit_cg_rejects_non_finite_or_non_numeric_tol(tol):
    with pytest.raises((TypeError, ValueError), match="tol must be"):
        tmg.ImplicitCG(1.0, tol=tol)
