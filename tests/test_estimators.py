"""tmg.diagnostics' estimator measurements against independent float64 computations:
closed forms on quadratics (Hessian norm = largest |eigenvalue|, the exact meta-gradient
(I - lr A)^K g, FirstOrder's error), explicit Hessians of a small MLP, and hand-written
gradient descent for the inner iterates."""

from __future__ import annotations

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
