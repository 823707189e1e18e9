"""tmg.custom_root: torchopt's custom_root convention with the plugin's rules or torchopt's solves.

Oracles (float64): closed forms on a quadratic (with argnums a tuple, one argument itself a
tuple of tensors), a dense solve with the explicit Hessian, and torchopt's own
``torchopt.diff.implicit.custom_root`` on an iMAML loop over a small conv net on
Omniglot-shaped data (28x28x1 images, 5-way 1-shot), written here in this project's words
after torchopt's ``examples/iMAML/imaml_omniglot_functional.py``.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torchopt
from torch.nn import functional as F

import torchopt_metagrad as tmg

F64 = torch.float64
pytestmark = pytest.mark.filterwarnings("ignore:.*functorch.*:UserWarning")


# ------------------------------------------------------------------ quadratic, argnums tuple
def _quadratic(d: int = 6, reg: float = 1.5, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=F64))
    A = Q @ torch.diag(torch.linspace(0.5, 4.0, d, dtype=F64)) @ Q.T
    A = (A + A.T) / 2
    theta, a, b = (torch.randn(d, generator=gen, dtype=F64) for _ in range(3))
    return A, theta, a, b, reg


def _objective(x, theta, a_parts, A, reg):
    u = torch.cat([x[0], x[1]]) - torch.cat(a_parts)
    prox = torch.cat([x[0], x[1]]) - theta
    return 0.5 * u @ A @ u + 0.5 * reg * prox @ prox


def _optimality(A, reg):
    grad = torch.func.grad(lambda x, theta, a_parts, data: _objective(x, theta, a_parts, A, reg))
    return grad


def _exact_solver(A, reg):
    def solver(x0, theta, a_parts, data):
        # any root solver: here the exact one (the solution depends on theta and a)
        M = A + reg * torch.eye(A.shape[0], dtype=F64)
        x = torch.linalg.solve(M, A @ torch.cat(a_parts) + reg * theta)
        return (x[:2].clone(), x[2:].clone()), {"steps": 0, "data": data}

    return solver


SOLVES = {
    "minres": lambda reg: tmg.ImplicitCG(reg, maxiter=50, tol=1e-13),
    "cg": lambda reg: tmg.ImplicitCG(reg, maxiter=50, tol=1e-13, solver="cg"),
    "normal_cg": lambda reg: tmg.ImplicitCG(reg, maxiter=50, tol=1e-13, solver="normal_cg"),
    "neumann": lambda reg: tmg.ImplicitNeumann(10.0, terms=200),
    "torchopt_normal_cg": lambda reg: torchopt.linear_solve.solve_normal_cg(maxiter=50, atol=0),
    "default": lambda reg: None,
}


@pytest.mark.parametrize("solve", list(SOLVES))
def test_quadratic_closed_form_with_argnums_tuple_and_aux(solve):
    A, theta0, a0, b, reg = _quadratic()
    theta = theta0.clone().requires_grad_()
    a_parts = (a0[:3].clone().requires_grad_(), a0[3:].clone().requires_grad_())
    root = tmg.custom_root(_optimality(A, reg), argnums=(1, 2), has_aux=True,
                           solve=SOLVES[solve](reg))(_exact_solver(A, reg))  # fmt: skip
    x0 = (torch.zeros(2, dtype=F64), torch.zeros(4, dtype=F64))
    with tmg.diagnostics.collect() as reports:
        (x1, x2), aux = root(x0, theta, a_parts, "data")
        outer = 0.5 * ((torch.cat([x1, x2]) - b) ** 2).sum()
        g_theta, g_a1, g_a2 = torch.autograd.grad(outer, [theta, *a_parts])
    assert aux == {"steps": 0, "data": "data"}
    # closed form: x* = (A + reg I)^{-1} (A a + reg theta)
    M = A + reg * torch.eye(6, dtype=F64)
    xs = torch.linalg.solve(M, A @ a0 + reg * theta0)
    y = torch.linalg.solve(M, xs - b)
    assert torch.allclose(g_theta, reg * y, rtol=1e-9, atol=1e-12)
    assert torch.allclose(torch.cat([g_a1, g_a2]), A @ y, rtol=1e-9, atol=1e-12)
    assert len(reports) == 1 and reports[0].front_end == "tmg.custom_root"
    if isinstance(reports[0].info, tmg.CGInfo):
        assert reports[0].info.residual <= 1e-10
        assert reports[0].info.stationarity is not None and reports[0].info.stationarity < 1e-12


def test_quadratic_matches_torchopt_custom_root():
    A, theta0, a0, b, reg = _quadratic(seed=3)
    grads = []
    for deco in (torchopt.diff.implicit.custom_root, tmg.custom_root):
        theta = theta0.clone().requires_grad_()
        a_parts = (a0[:3].clone().requires_grad_(), a0[3:].clone().requires_grad_())
        solve = torchopt.linear_solve.solve_normal_cg(maxiter=3, atol=0)  # unconverged
        root = deco(_optimality(A, reg), argnums=(1, 2), has_aux=True, solve=solve)(
            _exact_solver(A, reg)
        )
        (x1, x2), _ = root(
            (torch.zeros(2, dtype=F64), torch.zeros(4, dtype=F64)), theta, a_parts, "data"
        )
        outer = 0.5 * ((torch.cat([x1, x2]) - b) ** 2).sum()
        with pytest.warns(tmg.SolverWarning, match="stopped after") if deco is tmg.custom_root \
                else _nothing():  # fmt: skip
            grads.append(torch.cat(torch.autograd.grad(outer, [theta, *a_parts])))
    assert torch.allclose(grads[0], grads[1], rtol=1e-12, atol=1e-14)


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


# --------------------------------------------------------------------- bad arguments
def _simple(reg=1.0):
    A, theta0, a0, _, _ = _quadratic()
    return A, theta0.clone().requires_grad_(), (a0[:3].clone(), a0[3:].clone()), reg


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"argnums": 0}, ValueError, "positions start at 1"),
        ({"argnums": (1, 1)}, ValueError, "repeats"),
        ({"argnums": "1"}, TypeError, "argnums must be an int"),
        ({"argnums": 1, "solve": "cg"}, TypeError, "solve must be"),
        ({"argnums": 1, "has_aux": 1}, TypeError, "has_aux must be a bool"),
    ],
)
def test_bad_decorator_arguments_raise_naming_them(kwargs, error, match):
    A, _, _, reg = _simple()
    with pytest.raises(error, match=match):
        tmg.custom_root(_optimality(A, reg), **kwargs)


def test_bad_calls_raise_naming_the_argument():
    A, theta, a_parts, reg = _simple()
    x0 = (torch.zeros(2, dtype=F64), torch.zeros(4, dtype=F64))
    solver = _exact_solver(A, reg)
    opt = _optimality(A, reg)
    with pytest.raises(ValueError, match="argnums=5 names argument 5"):
        tmg.custom_root(opt, argnums=5, has_aux=True)(solver)(x0, theta, a_parts, "d")
    with pytest.raises(TypeError, match=r"argument 3 \('data'\), named in argnums"):
        tmg.custom_root(opt, argnums=(1, 3), has_aux=True)(solver)(x0, theta, a_parts, "d")
    ints = torch.arange(6)
    with pytest.raises(TypeError, match=r"argument 1 \('theta'\).*dtype torch.int64"):
        tmg.custom_root(opt, argnums=1, has_aux=True)(solver)(x0, ints, a_parts, "d")
    grad_a = (a_parts[0].requires_grad_(), a_parts[1])
    with pytest.raises(ValueError, match=r"argument 2 \('a_parts'\).*not in argnums"):
        tmg.custom_root(opt, argnums=1, has_aux=True)(solver)(x0, theta, grad_a, "d")
    a_parts[0].requires_grad_(False)
    with pytest.raises(TypeError, match=r"has_aux=True: the solver must return"):
        tmg.custom_root(opt, argnums=1, has_aux=True)(lambda *a: solver(*a)[0][0])(
            x0, theta, a_parts, "d"
        )
    with pytest.raises(TypeError, match="solver's output"):
        tmg.custom_root(opt, argnums=1)(lambda *a: "x")(x0, theta, a_parts, "d")

    def wrong_shape(x, theta, a_parts, data):
        return torch.zeros(3, dtype=F64)

    with pytest.raises(ValueError, match="optimality_fn must return tensors shaped like"):
        tmg.custom_root(wrong_shape, argnums=1, has_aux=True)(solver)(x0, theta, a_parts, "d")
    hidden = torch.ones(6, dtype=F64, requires_grad=True)

    def closes_over(x, theta, a_parts, data):
        return opt(x, theta, a_parts, data)[0] * hidden[:2], opt(x, theta, a_parts, data)[1]

    with pytest.raises(ValueError, match="optimality_fn depends on a tensor of shape"):
        tmg.custom_root(closes_over, argnums=1, has_aux=True)(solver)(x0, theta, a_parts, "d")


def test_nonsymmetric_jacobian_is_refused_by_krylov_rules_and_solved_by_normal_cg():
    """A fixed point x = W x + theta (W non-symmetric): J = I - W."""
    gen = torch.Generator().manual_seed(1)
    W = 0.3 * torch.randn(5, 5, generator=gen, dtype=F64)
    theta0, b = torch.randn(5, generator=gen, dtype=F64), torch.randn(5, generator=gen, dtype=F64)

    def optimality(x, theta):
        return x - W @ x - theta

    def solver(x, theta):
        return torch.linalg.solve(torch.eye(5, dtype=F64) - W, theta)

    expected = torch.linalg.solve((torch.eye(5, dtype=F64) - W).T, torch.linalg.solve(
        torch.eye(5, dtype=F64) - W, theta0) - b)  # fmt: skip
    for solve, ok in ((tmg.ImplicitCG(1.0), False), (None, True)):
        theta = theta0.clone().requires_grad_()
        x = tmg.custom_root(optimality, argnums=1, solve=solve)(solver)(torch.zeros(5), theta)
        outer = 0.5 * ((x - b) ** 2).sum()
        if ok:
            (got,) = torch.autograd.grad(outer, theta)
            assert torch.allclose(got, expected, rtol=1e-8)
        else:
            with pytest.raises(ValueError, match="needs a symmetric Jacobian"):
                torch.autograd.grad(outer, theta)


# ------------------------------------------------- iMAML on Omniglot-shaped data (conv net)
REG, INNER_LR, INNER_STEPS = 2.0, 0.1, 60


def _net_params(gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    def init(*shape, scale):
        return (scale * torch.randn(*shape, generator=gen, dtype=F64)).requires_grad_()

    return (
        init(4, 1, 3, 3, scale=0.3), init(4, scale=0.1),  # conv 3x3, stride 3: 28 -> 9
        init(4, 4, 3, 3, scale=0.3), init(4, scale=0.1),  # conv 3x3, stride 3: 9 -> 3
        init(5, 36, scale=0.2), init(5, scale=0.1),  # linear 36 -> 5 ways
    )  # fmt: skip


def _fnet(params, x):
    w1, b1, w2, b2, w3, b3 = params
    h = torch.tanh(F.conv2d(x, w1, b1, stride=3))
    h = torch.tanh(F.conv2d(h, w2, b2, stride=3))
    return F.linear(h.flatten(1), w3, b3)


def imaml_objective(params, meta_params, data):
    x, y = data
    prox = sum(((p - m) ** 2).sum() for p, m in zip(params, meta_params))
    return F.cross_entropy(_fnet(params, x), y) + 0.5 * REG * prox


def inner_solver(params, meta_params, data):
    """Plain SGD on the proximal objective (the example's loop, in this project's words)."""
    opt = torchopt.sgd(lr=INNER_LR)
    state = opt.init(params)
    with torch.enable_grad():  # torchopt's custom_root runs the solver under no_grad
        for _ in range(INNER_STEPS):
            grads = torch.autograd.grad(imaml_objective(params, meta_params, data), params)
            updates, state = opt.update(grads, state, inplace=False)
            params = torchopt.apply_updates(params, updates, inplace=False)
    return params


def _episode(gen: torch.Generator):
    x_spt = torch.rand(5, 1, 28, 28, generator=gen, dtype=F64)
    x_qry = torch.rand(15, 1, 28, 28, generator=gen, dtype=F64)
    return (x_spt, torch.arange(5)), (x_qry, torch.arange(5).repeat(3))


def _imaml_meta_grad(decorator, solve, meta_params, spt, qry):
    solver = decorator(torch.func.grad(imaml_objective, argnums=0), argnums=1, solve=solve)(
        inner_solver
    )
    init = tuple(p.detach().clone().requires_grad_() for p in meta_params)
    adapted = solver(init, meta_params, spt)
    outer = F.cross_entropy(_fnet(adapted, qry[0]), qry[1])
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(outer, meta_params)]), adapted


def test_imaml_conv_plugin_equals_torchopt_custom_root_and_dense_oracle():
    gen = torch.Generator().manual_seed(0)
    meta_params = _net_params(gen)
    spt, qry = _episode(gen)
    init = tuple(p.detach().clone().requires_grad_() for p in meta_params)
    adapted = inner_solver(init, tuple(p.detach() for p in meta_params), spt)
    # dense oracle: x = (I + H/reg)^{-1} g with the explicit Hessian at the solution
    sizes = [p.numel() for p in meta_params]
    flat = torch.cat([p.detach().reshape(-1) for p in adapted])

    def unflat(v):
        return tuple(t.view_as(p) for t, p in zip(v.split(sizes), meta_params))

    H = torch.func.jacrev(torch.func.grad(
        lambda v: F.cross_entropy(_fnet(unflat(v), spt[0]), spt[1])))(flat)  # fmt: skip
    g = torch.func.grad(lambda v: F.cross_entropy(_fnet(unflat(v), qry[0]), qry[1]))(flat)
    dense = torch.linalg.solve(torch.eye(flat.numel(), dtype=F64) + H / REG, g)
    ref = dense
    # (normal CG's tol bounds the normal-equation residual: the true one may be cond(M) x it)
    rules = [tmg.ImplicitCG(REG, maxiter=300, tol=tol, solver=s)
             for s, tol in (("minres", 1e-11), ("cg", 1e-11), ("normal_cg", 1e-12))]  # fmt: skip
    for solve in rules:
        with tmg.diagnostics.collect() as reports, warnings.catch_warnings():
            warnings.filterwarnings("ignore", "ImplicitCG: normal_cg stopped", tmg.SolverWarning)
            got, _ = _imaml_meta_grad(tmg.custom_root, solve, meta_params, spt, qry)
        assert float((got - ref).norm() / ref.norm()) < 1e-9, solve
        info = reports[0].info
        assert info.residual < 1e-8 and info.stationarity < 1e-2
    # the example's own setting: 5 normal-CG iterations; the one line changed, same numbers
    five = torchopt.linear_solve.solve_normal_cg(maxiter=5, atol=0)
    a, _ = _imaml_meta_grad(torchopt.diff.implicit.custom_root, five, meta_params, spt, qry)
    with pytest.warns(tmg.SolverWarning, match="stopped after"):
        b, _ = _imaml_meta_grad(tmg.custom_root, five, meta_params, spt, qry)
    assert torch.allclose(a, b, rtol=1e-12, atol=1e-15)
