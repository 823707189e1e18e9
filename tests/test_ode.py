"""The ODE layer (``_core.ode``) and the numerics of ``Adjoint``, on fake records.

The records here are plain objects with the record protocol (``num_steps``,
``param_dim``, ``time_step``, ``solver``, ``snapshot``, ``hvp``, ``hvp_at``,
``vector_field``), so the tests do not depend on any front end:

* a quadratic ``l(u) = 1/2 (u-a)^T A (u-a)`` in float64, with states from the exact
  flow ``u(t) = a + expm(-tA)(u0 - a)``: the adjoint is ``lambda(0) = expm(-TA) g``;
* a quartic ``l(u) = 1/2 (u-a)^T B (u-a) + c/4 sum u^4`` (non-constant Hessian), with
  states from scipy's DOP853 at tolerance 1e-13 and the reference ``Psi(T)^T g`` from
  the variational equation ``Psi' = -H(u) Psi`` solved forward with the flow;
* a time-dependent Hessian with a stiffness spike in the middle of the horizon.
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Callable

import numpy as np
import pytest
import scipy.integrate
import scipy.linalg
import torch

import torchopt_metagrad as tmg
from torchopt_metagrad._core.ode import ODE, Clock, ODEKnobWarning, linspace, solve
from torchopt_metagrad.rules.adjoint import MAX_SUBSTEPS, Adjoint, AdjointInfo

F64 = torch.float64
Vec = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


# --------------------------------------------------------------------------- fakes
class FakeRecord:
    """The record protocol over given states; ``hvp_fn(u, v)``, ``grad_fn(u)`` define l."""

    def __init__(self, states, h, hvp_fn: Vec, grad_fn, solver=None):
        self.states, self.h, self._hvp, self._grad = states, h, hvp_fn, grad_fn
        if solver is not None:
            self.solver = solver
        self.hvps = 0

    @property
    def num_steps(self) -> int:
        return self.states.shape[0] - 1

    @property
    def param_dim(self) -> int:
        return self.states.shape[1]

    @property
    def time_step(self) -> float | None:
        return self.h

    def snapshot(self, k: int) -> torch.Tensor:
        return self.states[k]

    def hvp(self, k: int, v: torch.Tensor) -> torch.Tensor:
        return self.hvp_at(self.states[k], v, k=min(k, self.num_steps - 1))

    def hvp_at(self, params: torch.Tensor, v: torch.Tensor, *, k: int = 0) -> torch.Tensor:
        self.hvps += 1
        return self._hvp(params, v)

    def vector_field(self, params: torch.Tensor, *, create_graph: bool = False) -> torch.Tensor:
        f = -self._grad(params)
        return f if create_graph else f.detach()


def spd(d: int, lo: float, hi: float, gen: torch.Generator) -> torch.Tensor:
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=F64))
    A = Q @ torch.diag(torch.linspace(lo, hi, d, dtype=F64)) @ Q.T
    return (A + A.T) / 2


def expm(A: torch.Tensor, t: float) -> torch.Tensor:
    return torch.from_numpy(scipy.linalg.expm(-t * A.numpy()))


class Quadratic:
    def __init__(self, d: int = 5, lo: float = 0.5, hi: float = 3.0, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        self.A = spd(d, lo, hi, gen)
        self.a, self.u0, self.g = (torch.randn(d, generator=gen, dtype=F64) for _ in range(3))

    def record(self, T: float, n: int, solver=None) -> FakeRecord:
        E, states = expm(self.A, T / n), [self.u0]
        for _ in range(n):
            states.append(self.a + E @ (states[-1] - self.a))
        A, a = self.A, self.a
        return FakeRecord(
            torch.stack(states), T / n, lambda u, v: A @ v, lambda u: A @ (u - a), solver
        )

    def adjoint(self, T: float) -> torch.Tensor:
        return expm(self.A, T) @ self.g


class Quartic:
    def __init__(self, d: int = 4, c: float = 1.0, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        self.B, self.c, self.d = spd(d, 0.5, 3.0, gen), c, d
        self.a, self.u0, self.g = (torch.randn(d, generator=gen, dtype=F64) for _ in range(3))

    def grad(self, u: torch.Tensor) -> torch.Tensor:
        return self.B @ (u - self.a) + self.c * u**3

    def hvp(self, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self.B @ v + 3 * self.c * u**2 * v

    def _rhs(self, t: float, y: np.ndarray) -> np.ndarray:
        d, B, a = self.d, self.B.numpy(), self.a.numpy()
        u, P = y[:d], y[d:].reshape(d, d)
        H = B + 3 * self.c * np.diag(u**2)
        return np.concatenate([-(B @ (u - a) + self.c * u**3), (-H @ P).ravel()])

    def _solve(self, T: float, t_eval=None):
        y0 = np.concatenate([self.u0.numpy(), np.eye(self.d).ravel()])
        return scipy.integrate.solve_ivp(
            self._rhs, (0, T), y0, t_eval=t_eval, method="DOP853", rtol=1e-13, atol=1e-14
        )

    def record(self, T: float, n: int) -> FakeRecord:
        sol = self._solve(T, np.linspace(0, T, n + 1))
        states = torch.from_numpy(sol.y[: self.d].T.copy())
        return FakeRecord(states, T / n, self.hvp, self.grad)

    def adjoint(self, T: float) -> torch.Tensor:
        P = self._solve(T).y[self.d :, -1].reshape(self.d, self.d)
        return torch.from_numpy(P.T @ self.g.numpy())


def rel(x: torch.Tensor, y: torch.Tensor) -> float:
    return float((x - y).norm() / y.norm())


def heun_unrefined(A: torch.Tensor, g: torch.Tensor, h: float, n: int) -> torch.Tensor:
    """The modified Euler step with constant H = A, n times, no refinement."""
    step = torch.eye(A.shape[0], dtype=F64) - h * A + 0.5 * h**2 * A @ A
    return torch.linalg.matrix_power(step, n) @ g


# ------------------------------------------------------------------------ 1. ODE value
def test_ode_defaults_and_resolved_values():
    ode = ODE()
    assert (ode.method, ode.rtol, ode.atol, ode.step_size, ode.max_steps) == (
        "dopri5",
        None,
        None,
        None,
        10_000,
    )
    assert ode.tolerances == (1e-7, 1e-9)
    assert not ode.is_fixed
    assert ode.evaluations_per_step == 6 and ode.budget == 60_002
    assert ODE(rtol=1e-4, atol=1e-6).tolerances == (1e-4, 1e-6)
    rk4 = ODE("rk4", step_size=0.1, max_steps=7)
    assert rk4.is_fixed and rk4.budget == 28
    assert ODE(rtol=1) == ODE(rtol=1.0) and isinstance(ODE(rtol=1).rtol, float)
    with pytest.raises(AttributeError):
        ode.method = "rk4"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"method": "nope"}, ValueError, r"method='nope' is not a torchdiffeq method.*dopri5.*rk4"),
        ({"method": 3}, TypeError, "method must be"),
        ({"rtol": 0.0}, ValueError, "rtol must be a finite float > 0"),
        ({"rtol": -1e-3}, ValueError, "rtol must be"),
        ({"rtol": math.nan}, ValueError, "rtol must be"),
        ({"atol": math.inf}, ValueError, "atol must be"),
        ({"atol": "1e-3"}, TypeError, "atol must be a float"),
        ({"rtol": True}, TypeError, "rtol must be a float"),
        ({"method": "rk4", "step_size": 0.0}, ValueError, "step_size must be"),
        ({"method": "rk4", "step_size": -0.1}, ValueError, "step_size must be"),
        ({"max_steps": 0}, ValueError, "max_steps must be >= 1"),
        ({"max_steps": 1.5}, TypeError, "max_steps must be an int"),
        ({"max_steps": True}, TypeError, "max_steps must be an int"),
    ],
)
def test_ode_rejects_bad_knobs_naming_them(kwargs, error, match):
    with pytest.raises(error, match=match):
        ODE(**kwargs)


def test_ode_warns_about_knobs_the_method_ignores():
    with pytest.warns(ODEKnobWarning, match=r"rtol and atol ignored: 'rk4' is a fixed-step") as w:
        ODE("rk4", rtol=1e-3, atol=1e-5)
    assert w[0].filename == __file__  # points at the caller
    with pytest.warns(ODEKnobWarning, match=r"step_size ignored: 'dopri5' is an adaptive"):
        ODE("dopri5", step_size=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ODE("rk4", step_size=0.1)
        ODE("dopri5", rtol=1e-3)
        ODE("implicit_adams", rtol=1e-3, step_size=0.1)  # its corrector uses rtol/atol


# ------------------------------------------------------------------------- 2. solve()
def _decay(A: torch.Tensor) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    return lambda t, y: -A @ (y - 1.0)


def test_fixed_step_solve_without_a_step_raises_and_uses_the_grid_step():
    """rk4 over [0, 2] in ONE step is off by O(1); the grid step gives 1e-9."""
    q = Quadratic(d=4, lo=0.5, hi=3.0)
    T, y0 = 2.0, q.u0
    exact = 1.0 + expm(q.A, T) @ (y0 - 1.0)
    t = torch.tensor([0.0, T], dtype=F64)
    with pytest.raises(ValueError, match=r"the test solve: 'rk4' is a fixed-step .* step size"):
        solve("test solve", _decay(q.A), y0, t, ODE("rk4"))
    one_step = solve("test solve", _decay(q.A), y0, t, ODE("rk4"), grid_step=T)[-1]
    assert rel(one_step, exact) > 0.5
    gridded = solve("test solve", _decay(q.A), y0, t, ODE("rk4"), grid_step=0.01)[-1]
    assert rel(gridded, exact) < 1e-9
    # an explicit step_size beats the grid step
    stepped = solve("test solve", _decay(q.A), y0, t, ODE("rk4", step_size=0.01), grid_step=T)
    assert torch.equal(stepped[-1], gridded)
    times = linspace(T, 4, y0)
    assert times.dtype == F64 and torch.allclose(
        times, torch.tensor([0, 0.5, 1, 1.5, 2.0], dtype=F64)
    )


def test_fixed_step_outputs_are_step_boundaries_not_interpolated():
    """rk4 with step 0.03 and outputs every 0.1: torchdiffeq's own grid interpolates the
    outputs linearly (error 6e-4); solve() fits equal steps <= 0.03 into each interval."""
    q = Quadratic(d=5, lo=0.5, hi=3.0)
    t = linspace(1.0, 10, q.u0)
    exact = torch.stack([1.0 + expm(q.A, float(ti)) @ (q.u0 - 1.0) for ti in t])
    clock = Clock(0.0)
    ys = solve("test solve", _decay(q.A), q.u0, t, ODE("rk4", step_size=0.03), clock=clock)
    assert float((ys - exact).norm(dim=1).max() / exact.norm(dim=1).min()) < 1e-7
    assert clock.evaluations == 10 * 4 * 4  # 4 steps of 0.025 per interval, 4 evaluations each


def test_solve_step_budget_raises_naming_the_solve_and_what_suits_non_smooth_nets():
    q = Quadratic(d=4, lo=0.5, hi=50.0)
    t = torch.tensor([0.0, 2.0], dtype=F64)
    ode = ODE("dopri5", rtol=1e-12, atol=1e-14, max_steps=5)
    clock = Clock(0.0)
    with pytest.raises(
        tmg.ODESolveError,
        match=r"the test solve \(dopri5, rtol=1e-12, atol=1e-14\) ran out of steps "
        r"\(max_steps=5, 32 vector-field evaluations\) at t=.*ReLU.*ODE\('rk4', step_size",
    ):
        solve("test solve", _decay(q.A), q.u0, t, ode, clock=clock)
    assert clock.evaluations == 33 and 0.0 < clock.t < 2.0
    # the same solve with the default budget succeeds
    solve("test solve", _decay(q.A), q.u0, t, ODE("dopri5", rtol=1e-12, atol=1e-14))


def test_solve_failure_names_the_solve_and_time():
    """dy/dt = y^2 from y = 1 blows up at t = 1."""
    t = torch.tensor([0.0, 2.0], dtype=F64)
    with pytest.raises(tmg.ODESolveError, match=r"the blow-up solve \(dopri5.*failed at t=") as e:
        solve("blow-up solve", lambda t, y: y**2, torch.ones(2, dtype=F64), t, ODE())
    t_fail = float(str(e.value).split("t=")[1].split(":")[0])
    assert 0.99 < t_fail <= 1.0


# --------------------------------------------------------------- 3. Adjoint: ODE schemes
def test_checkpointed_dopri5_matches_expm_on_quadratic():
    q = Quadratic(d=5, lo=0.5, hi=3.0)
    rec = q.record(1.0, 20)
    got, info = Adjoint(solver=ODE("dopri5", rtol=1e-10, atol=1e-12)).meta_gradient_with_info(
        rec, q.g
    )
    assert rel(got, q.adjoint(1.0)) < 1e-8
    assert info.scheme == "ode:dopri5" and info.substeps == 0
    assert 20 * 8 <= info.evaluations < 2000  # at least a start and one step per interval


def test_checkpointed_dopri5_has_no_interpolation_error_on_quartic():
    """H(u) varies: the (u, lambda) solve restarts u at each stored state, no O(h^2) term."""
    q = Quartic()
    rec = q.record(1.0, 10)
    got = Adjoint(solver=ODE(rtol=1e-10, atol=1e-12)).meta_gradient(rec, q.g).value
    assert rel(got, q.adjoint(1.0)) < 1e-8


def test_fixed_step_ode_without_step_size_uses_the_grid_and_refines_when_stiff():
    q = Quadratic(d=5, lo=0.5, hi=3.0)
    got, info = Adjoint(solver="rk4").meta_gradient_with_info(q.record(1.0, 50), q.g)
    assert rel(got, q.adjoint(1.0)) < 1e-7  # rk4 with h = 0.02: error O(h^4)
    assert info.scheme == "ode:rk4" and info.substeps == 50
    # ||H|| = 1000, h = 0.01: rk4 on the grid is unstable (h ||H|| = 10 > 2.78) ...
    stiff = Quadratic(d=5, lo=0.5, hi=1000.0)
    rec = stiff.record(1.0, 100)
    got, info = Adjoint(solver=ODE("rk4")).meta_gradient_with_info(rec, stiff.g)
    assert info.substeps > 100  # ... so the grid is refined
    assert rel(got, stiff.adjoint(1.0)) < 1e-10
    # a given step_size is never changed: an unstable one raises
    with pytest.raises(tmg.ODESolveError, match=r"rk4, step_size=0.01\) is unstable"):
        Adjoint(solver=ODE("rk4", step_size=0.01)).meta_gradient(rec, stiff.g)


def test_checkpointed_scheme_refuses_states_that_are_not_flow_samples():
    """GD with lr ||A|| = 1.9 oscillates; the flow run backward from an iterate misses the
    previous one by ~e^1.9 times the oscillation: an ODE solver raises, heun works."""
    q = Quadratic(d=5, lo=0.5, hi=190.0)
    lr, states = 0.01, [q.u0]
    for _ in range(50):
        states.append(states[-1] - lr * q.A @ (states[-1] - q.a))
    A, a = q.A, q.a
    rec = FakeRecord(torch.stack(states), lr, lambda u, v: A @ v, lambda u: A @ (u - a))
    with pytest.raises(tmg.ODESolveError, match=r"not samples of the gradient flow.*'heun'"):
        Adjoint(solver="rk4").meta_gradient(rec, q.g)
    got = Adjoint().meta_gradient(rec, q.g).value  # heun over the stored states (H is constant)
    assert rel(got, q.adjoint(0.5)) < 1e-5


def test_backward_step_budget_raises():
    q = Quadratic(d=4, lo=0.5, hi=250.0)
    rule = Adjoint(solver=ODE("dopri5", rtol=1e-12, atol=1e-14, max_steps=5))
    with pytest.raises(tmg.ODESolveError, match=r"backward adjoint solve .*max_steps=5"):
        rule.meta_gradient(q.record(1.0, 10), q.g)


def test_reintegrate_matches_expm():
    q = Quadratic(d=5, lo=0.5, hi=3.0)
    rule = Adjoint(solver=ODE(rtol=1e-10, atol=1e-12), reintegrate=True)
    got, info = rule.meta_gradient_with_info(q.record(1.0, 10), q.g)
    assert rel(got, q.adjoint(1.0)) < 1e-8
    assert info.scheme == "reintegrate:dopri5" and info.evaluations > 0


# ------------------------------------------------------------------ 4. Adjoint: heun
def test_heun_is_second_order_on_quartic():
    q = Quartic()
    want, ns, errors = q.adjoint(1.0), (20, 40, 80, 160), []
    for n in ns:
        got, info = Adjoint().meta_gradient_with_info(q.record(1.0, n), q.g)
        errors.append(rel(got, want))
        assert info.scheme == "heun" and info.substeps == n  # smooth: no refinement
        assert info.evaluations <= 2 * n + 16 + n // 8  # + the stiffness estimate
    slope = float(np.polyfit(np.log(1.0 / np.array(ns)), np.log(errors), 1)[0])
    assert 1.9 <= slope <= 2.3, (slope, errors)
    assert all(b < a for a, b in itertools.pairwise(errors))


def test_heun_refines_stiff_intervals_instead_of_returning_garbage():
    """||H|| = 250, h = 0.01: h ||H|| = 2.5 > 2, plain modified Euler grows by 1e21."""
    q = Quadratic(d=6, lo=0.5, hi=250.0)
    h, n = 0.01, 100
    want = q.adjoint(1.0)
    assert rel(heun_unrefined(q.A, q.g, h, n), want) > 1e10  # the test means something
    got, info = Adjoint().meta_gradient_with_info(q.record(1.0, n), q.g)
    assert rel(got, want) < 1e-5
    assert info.substeps == 3 * n  # ceil(h ||H||) = 3 substeps per interval
    estimate = info.evaluations - 2 * info.substeps
    assert estimate <= 30  # power iteration at both ends + one HVP every 8 states


def test_heun_catches_a_stiffness_spike_between_the_ends():
    """H(t) has its top eigenvalue 5 at both ends and 305 around t = 0.3."""
    d = 5
    gen = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=F64))
    g = torch.randn(d, generator=gen, dtype=F64)

    def H(t: float) -> np.ndarray:
        mu = [5 + 300 * math.exp(-(((t - 0.3) / 0.05) ** 2)), 1, 2, 3, 4]
        return Q.numpy() @ np.diag(mu) @ Q.numpy().T

    T, n = 1.0, 100
    states = torch.zeros(n + 1, d, dtype=F64)
    states[:, 0] = torch.linspace(0, T, n + 1, dtype=F64)  # the state carries t
    rec = FakeRecord(states, T / n, lambda u, v: torch.from_numpy(H(float(u[0]))) @ v, None)
    ref = scipy.integrate.solve_ivp(
        lambda t, y: H(t) @ y, (T, 0), g.numpy(), method="Radau", rtol=1e-12, atol=1e-14
    )
    got, info = Adjoint().meta_gradient_with_info(rec, g)
    assert rel(got, torch.from_numpy(ref.y[:, -1])) < 2e-4  # Heun's own O(h^2) level
    assert info.substeps > n


def test_heun_too_stiff_for_the_grid_raises():
    q = Quadratic(d=3, lo=1.0, hi=1e6)
    with pytest.raises(tmg.ODESolveError, match=rf"needs \d+ substeps > {MAX_SUBSTEPS} on t in"):
        Adjoint().meta_gradient(q.record(1.0, 100), q.g)


def test_heun_overflow_raises_non_finite_error_naming_the_time():
    """l = -50 ||u||^2 (H = -100 I): lambda = exp(100 (T - t)) g overflows near t = 0.81."""
    n = 100
    rec = FakeRecord(
        torch.zeros(n + 1, 3, dtype=F64), 1.0 / n, lambda u, v: -100 * v, lambda u: -100 * u
    )
    with pytest.raises(
        tmg.NonFiniteError, match=r"backward adjoint solve at t=0\.8\d* \(stored state 8\d\)"
    ):
        Adjoint().meta_gradient(rec, torch.full((3,), 1e300, dtype=F64))


# --------------------------------------------------------- 5. Adjoint: knobs, resolution
def test_adjoint_resolves_the_forward_solver_and_accepts_method_names():
    q = Quadratic(d=4)
    assert Adjoint(solver="rk4") == Adjoint(solver=ODE("rk4"))
    assert Adjoint().resolve(q.record(1.0, 10)) == "heun"  # no solver attribute
    forward = ODE("dopri5", rtol=1e-10, atol=1e-12)
    rec = q.record(1.0, 10, solver=forward)
    assert Adjoint().resolve(rec) == forward
    assert Adjoint(solver="heun").resolve(rec) == "heun"
    got, info = Adjoint().meta_gradient_with_info(rec, q.g)
    assert info.scheme == "ode:dopri5" and rel(got, q.adjoint(1.0)) < 1e-8
    assert torch.equal(Adjoint().meta_gradient(rec, q.g).value, got)
    assert isinstance(info, AdjointInfo)
    with pytest.raises(AttributeError):
        info.evaluations = 0  # type: ignore[misc]


def test_adjoint_rejects_bad_knobs_and_unfit_records():
    with pytest.raises(ValueError, match=r"solver must be 'heun'.*method='nope'.*dopri5"):
        Adjoint(solver="nope")
    with pytest.raises(TypeError, match=r"solver must be 'heun', a tmg\.ODE or None"):
        Adjoint(solver=0.1)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="reintegrate must be a bool"):
        Adjoint(reintegrate=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="reintegrate=True needs an ODE solver"):
        Adjoint(solver="heun", reintegrate=True)
    q = Quadratic(d=3)
    with pytest.raises(ValueError, match=r"needs an ODE solver.*solver=tmg.ODE"):
        Adjoint(reintegrate=True).meta_gradient(q.record(1.0, 10), q.g)  # GD iterates
    rec = q.record(1.0, 10)
    rec.h = None
    with pytest.raises(ValueError, match="Adjoint needs samples of a gradient flow"):
        Adjoint().meta_gradient(rec, q.g)
