"""Adjoint's meta-parameter integral, dL/dw = -int_0^T d/dw <grad_u l(u; w), lambda> dt,
against closed forms and torchdiffeq's own ``odeint_adjoint(adjoint_params=...)`` (float64).

* quadratic ``l(u; w) = 1/2 (u - w)^T A (u - w)``: ``u(T) = w + expm(-T A) (theta - w)``,
  differentiated with autograd (``torch.linalg.matrix_exp``);
* a tiny tanh MLP whose head is adapted, with a closed-over body layer and weight-decay
  coefficient: torchdiffeq's adjoint of the same flow is the reference.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchdiffeq

import torchopt_metagrad as tmg

F64 = torch.float64
TIGHT = tmg.ODE("dopri5", rtol=1e-10, atol=1e-12)


def forward(rule: tmg.Adjoint) -> tmg.ODE:
    """The forward solve: tight for the ODE schemes (their default backward solver);
    the default tolerances for heun, whose O(h^2) error is far above them."""
    return tmg.ODE() if rule.solver == "heun" else TIGHT


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def order(hs, errors) -> float:
    return float(np.polyfit(np.log(hs), np.log(errors), 1)[0])


# ------------------------------------------------------------------ quadratic, closed form
class Quad:
    """``l(u; w) = 1/2 (u - w)^T A (u - w)`` (A SPD, eigenvalues in [0.5, eig_hi]) and
    ``L = 1/2 ||u(T) - c||^2``."""

    def __init__(self, d: int = 5, eig_hi: float = 4.0, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        Q, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=F64))
        A = Q @ torch.diag(torch.linspace(0.5, eig_hi, d, dtype=F64)) @ Q.T
        self.A = (A + A.T) / 2
        self.theta, self.w, self.c = (torch.randn(d, generator=gen, dtype=F64) for _ in range(3))

    def leaves(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.theta.clone().requires_grad_(), self.w.clone().requires_grad_()

    def inner(self, u: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return 0.5 * (u - w) @ self.A @ (u - w)

    def outer(self, u: torch.Tensor) -> torch.Tensor:
        return 0.5 * ((u - self.c) ** 2).sum()

    def closed_form(self, T: float) -> tuple[torch.Tensor, torch.Tensor]:
        """``(dL/dtheta, dL/dw)`` of the exact flow."""
        theta, w = self.leaves()
        uT = w + torch.linalg.matrix_exp(-T * self.A) @ (theta - w)
        return torch.autograd.grad(self.outer(uT), (theta, w))

    def adjoint_given(self, T: float, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The flow's adjoint for the outer gradient ``g``: ``(E g, (I - E) g)``, E = expm(-TA)."""
        E = torch.linalg.matrix_exp(-T * self.A)
        return E @ g, g - E @ g

    def flow(self, rule: tmg.Adjoint, T: float, save_every: float):
        theta, w = self.leaves()
        with tmg.diagnostics.collect() as reports:
            out = tmg.flow(
                lambda p, _: self.inner(p["u"], w),
                {"u": theta},
                T=T,
                solver=forward(rule),
                rule=rule,
                save_every=save_every,
            )
            grads = torch.autograd.grad(self.outer(out["u"]), (theta, w))
        return grads, reports[0].info

    def adapt(self, rule: tmg.Adjoint, T: float, lr: float):
        """Gradient descent with ``w`` a fixed entry of params; also returns ``g = u_K - c``."""
        theta, w = self.leaves()
        with tmg.diagnostics.collect() as reports:
            out = tmg.adapt(
                lambda p, _: self.inner(p["u"], p["w"]),
                {"u": theta, "w": w},
                steps=round(T / lr),
                lr=lr,
                rule=rule,
                adapt=["u"],
            )
            assert out["w"] is w
            grads = torch.autograd.grad(self.outer(out["u"]), (theta, w))
        return grads, reports[0].info, (out["u"] - self.c).detach()


@pytest.mark.parametrize(
    "rule",
    [tmg.Adjoint(), tmg.Adjoint(solver="rk4"), tmg.Adjoint(reintegrate=True)],
    ids=["dopri5", "rk4", "reintegrate"],
)
def test_ode_schemes_under_flow_match_the_closed_form(rule):
    q, T = Quad(), 1.0
    (gt, gw), info = q.flow(rule, T, save_every=0.1 if rule.solver else 0.25)
    et, ew = q.closed_form(T)
    tol = 1e-7 if rule.solver is None else 1e-4  # rk4 on the 0.1 grid: O(h^4), ~4e-5
    assert rel(gt, et) <= tol and rel(gw, ew) <= tol, (rel(gt, et), rel(gw, ew))
    # one mixed product per backward evaluation (reintegrate: the forward re-run has none)
    if rule.reintegrate:
        assert 0 < info.meta_evaluations < info.evaluations
    elif rule.solver is None:
        assert info.meta_evaluations == info.evaluations
    else:
        assert info.meta_evaluations == 4 * info.substeps  # rk4: 4 per step


def test_heun_under_flow_is_second_order_against_the_exact_flow():
    q, T, hs = Quad(), 1.0, [0.1, 0.05, 0.025]
    et, ew = q.closed_form(T)
    errors, theta_errors = [], []
    for h in hs:
        (gt, gw), info = q.flow(tmg.Adjoint(solver="heun"), T, save_every=h)
        errors.append(rel(gw, ew))
        theta_errors.append(rel(gt, et))
        assert info.meta_evaluations == info.substeps + 1  # one mixed product per node
    assert 1.8 <= order(hs, errors) <= 2.3, errors
    assert 1.8 <= order(hs, theta_errors) <= 2.3, theta_errors
    assert errors[-1] <= 1e-3


def test_heun_substeps_on_a_stiff_flow_integrate_the_meta_term_too():
    """||A|| = 250, h = 0.01: 3 substeps per interval (h rho ~ 0.8 each). The stiff
    directions' share of dL/dw = (I - E) g is not damped; Heun's own step on the integral
    gets it to 2e-8 here, where the trapezoid rule with the corrected lambda at both nodes
    was off by 5.7%."""
    q, T = Quad(d=4, eig_hi=250.0, seed=3), 0.5
    (gt, gw), info = q.flow(tmg.Adjoint(solver="heun"), T, save_every=0.01)
    et, ew = q.closed_form(T)
    assert info.substeps > round(T / 0.01)
    assert info.meta_evaluations >= info.substeps + 1
    assert rel(gw, ew) < 1e-3 and rel(gt, et) < 1e-3


def test_heun_under_adapt_with_a_fixed_entry_is_second_order_and_approaches_the_flow():
    """Over gradient-descent iterates H = A is still exact, so given the outer gradient
    ``g = u_K - c`` the error is Heun's O(lr^2); against the exact flow it is the
    iterates' O(lr)."""
    q, T, lrs = Quad(), 1.0, [0.1, 0.05, 0.025]
    _, ew = q.closed_form(T)
    scheme, theta_scheme, flow = [], [], []
    for lr in lrs:
        (gt, gw), info, g = q.adapt(tmg.Adjoint(solver="heun"), T, lr)
        at, aw = q.adjoint_given(T, g)
        scheme.append(rel(gw, aw))
        theta_scheme.append(rel(gt, at))
        flow.append(rel(gw, ew))
        assert info.scheme == "heun" and info.meta_evaluations == info.substeps + 1
    assert 1.8 <= order(lrs, scheme) <= 2.3, scheme
    assert 1.8 <= order(lrs, theta_scheme) <= 2.3, theta_scheme
    assert 0.8 <= order(lrs, flow) <= 1.3, flow


def test_without_meta_parameters_nothing_changes():
    q = Quad()
    theta = q.theta.clone().requires_grad_()
    with tmg.diagnostics.collect() as reports:
        out = tmg.flow(
            lambda p, _: q.inner(p["u"], q.w), {"u": theta}, T=1.0, solver=TIGHT, save_every=0.1
        )
        (gt,) = torch.autograd.grad(q.outer(out["u"]), (theta,))
    assert reports[0].info.meta_evaluations == 0
    assert rel(gt, q.closed_form(1.0)[0]) <= 1e-7


# ------------------------------------------- tanh MLP against torchdiffeq's odeint_adjoint
class MLP:
    """Head ``(v, b)`` adapted on ``tanh(x W^T)`` features; the body ``W`` and a
    weight-decay coefficient ``wd`` are closed over; the outer loss uses ``W`` too."""

    def __init__(self, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.x = torch.randn(12, 2, generator=gen, dtype=F64)
        self.y = torch.sin(self.x.sum(1))
        self.xo = torch.randn(12, 2, generator=gen, dtype=F64)
        self.yo = torch.sin(self.xo.sum(1))
        self.W = torch.randn(5, 2, generator=gen, dtype=F64)
        self.head = torch.randn(6, generator=gen, dtype=F64) * 0.5
        self.wd = torch.tensor(0.3, dtype=F64)

    def leaves(self):
        return tuple(t.clone().requires_grad_() for t in (self.head, self.W, self.wd))

    def inner(self, u, W, wd):
        pred = torch.tanh(self.x @ W.T) @ u[:5] + u[5]
        return ((pred - self.y) ** 2).mean() + wd * (u**2).sum()

    def outer(self, u, W):
        return ((torch.tanh(self.xo @ W.T) @ u[:5] + u[5] - self.yo) ** 2).mean()

    def reference(self, T: float) -> tuple[torch.Tensor, ...]:
        head, W, wd = self.leaves()

        def field(t, u):
            with torch.enable_grad():
                leaf = u if u.requires_grad else u.detach().requires_grad_()
                (g,) = torch.autograd.grad(self.inner(leaf, W, wd), leaf, create_graph=True)
            return -g

        times = torch.tensor([0.0, T], dtype=F64)
        uT = torchdiffeq.odeint_adjoint(
            field, head, times, rtol=1e-11, atol=1e-13, method="dopri5", adjoint_params=(W, wd)
        )[-1]
        return torch.autograd.grad(self.outer(uT, W), (head, W, wd))

    def flow(self, rule: tmg.Adjoint, T: float, save_every: float = 0.125, wd_grad: bool = True):
        head, W, wd = self.leaves()
        wd = wd if wd_grad else wd.detach()
        with tmg.diagnostics.collect() as reports:
            out = tmg.flow(
                lambda p, _: self.inner(p["u"], W, wd),
                {"u": head},
                T=T,
                solver=forward(rule),
                rule=rule,
                save_every=save_every,
            )
            leaves = (head, W, wd) if wd_grad else (head, W)
            grads = torch.autograd.grad(self.outer(out["u"], W), leaves)
        return grads, reports[0].info


MLP_T = 0.5


@pytest.fixture(scope="module")
def mlp_reference():
    p = MLP()
    return p, p.reference(MLP_T)


@pytest.mark.parametrize(
    "rule", [tmg.Adjoint(), tmg.Adjoint(reintegrate=True)], ids=["checkpointed", "reintegrate"]
)
def test_ode_schemes_match_torchdiffeq_odeint_adjoint_on_a_tanh_mlp(mlp_reference, rule):
    p, ref = mlp_reference
    got, info = p.flow(rule, MLP_T)
    for name, a, b in zip(("head", "W", "wd"), got, ref):
        assert rel(a, b) <= 1e-6, (name, rel(a, b))
    assert info.meta_evaluations > 0


def test_reintegrate_with_meta_parameters_gives_odeint_adjoints_lambda(mlp_reference):
    """The augmented solve run by the rule and odeint_adjoint (no meta-parameters: wd
    detached) agree on dL/dtheta and dL/dW (W's part is through the meta integral in
    both)."""
    p, _ = mlp_reference
    rule = tmg.Adjoint(reintegrate=True)
    with_wd, _ = p.flow(rule, MLP_T)
    without, info = p.flow(rule, MLP_T, wd_grad=False)
    assert info.meta_evaluations > 0  # W is still closed over
    assert rel(with_wd[0], without[0]) <= 1e-8 and rel(with_wd[1], without[1]) <= 1e-8


def test_heun_on_a_tanh_mlp_is_second_order(mlp_reference):
    """States from the tight forward solve, u-dependent mixed term (interpolated
    substep states are not needed here: the flow is not stiff)."""
    p, ref = mlp_reference
    hs, errors = [0.1, 0.05], []
    for h in hs:
        got, info = p.flow(tmg.Adjoint(solver="heun"), MLP_T, save_every=h)
        errors.append(max(rel(a, b) for a, b in zip(got[1:], ref[1:])))
        assert info.meta_evaluations == info.substeps + 1
    assert 1.7 <= order(hs, errors) <= 2.4, errors


def test_adapt_with_a_fixed_body_approaches_exact_as_lr_shrinks():
    """Fixed entries of params (adapt=[...]) under Adjoint over gradient-descent iterates:
    the flow's meta-gradient differs from the discrete one (Exact) by O(lr)."""
    p = MLP()
    diffs = []
    for lr in (0.02, 0.01):
        grads = []
        for rule in (tmg.Adjoint(solver="heun"), tmg.Exact()):
            head, W, wd = p.leaves()  # W: a fixed entry; wd: closed over
            out = tmg.adapt(
                lambda q, _, wd=wd: p.inner(q["u"], q["W"], wd),
                {"u": head, "W": W},
                steps=round(0.5 / lr),
                lr=lr,
                rule=rule,
                adapt=["u"],
            )
            grads.append(torch.autograd.grad(p.outer(out["u"], out["W"]), (head, W, wd)))
        diffs.append(max(rel(a, b) for a, b in zip(*grads)))
    assert diffs[1] < 0.6 * diffs[0] and diffs[1] < 0.05, diffs
