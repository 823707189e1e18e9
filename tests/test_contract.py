"""The contract every meta-gradient rule keeps, driven by ``tests/rules_under_test.py``.

One row per rule; every test here runs over the rows (only the public API):

* every registered rule has a row, and the row's columns agree with what the rule declares;
* the meta-gradient equals its family's float64 oracle;
* ``outer.backward()`` puts it on ``.grad`` of the initial parameters (= autograd.grad);
* float32 is close to float64;
* a non-finite outer gradient raises ``tmg.NonFiniteError``;
* bad ``steps`` / ``lr`` / ``params`` (and module) raise errors naming the argument;
* the module front end gives the functional front end's meta-gradient;
* gradcheck through both front ends for the exact rules;
* a second derivative raises naming the rule and ``Unrolled`` (works through ``Unrolled``);
* the snapshots are freed by the outer backward while the adapted params live on.

A check is skipped for a row only through a column of the table (never by rule name).
"""

from __future__ import annotations

import copy
import functools
import math
import warnings
from typing import Any

import pytest
import torch
from oracles import (
    Problem,
    autograd_through_dict_gd_loop,
    binomial_by_enumeration,
    build_gd_oracle_from_hessians,
    make_problem,
)
from rules_under_test import (
    ADAPT,
    MODULE_CLOSURE,
    MODULE_LOSS,
    ROWS,
    RuleUnderTest,
    StepTerms,
    for_each_rule,
    for_each_rule_and_front_end,
)
from torch import nn

import torchopt_metagrad as tmg
from torchopt_metagrad.diagnostics import LiveMemoryTracker
from torchopt_metagrad.rules import FixedPointRule, FlowRule, GraphRule, StepProductRule

F64 = torch.float64
K = 4  # inner steps of the generic checks
LR = 0.1
MODULE_FRONT_ENDS = (MODULE_LOSS, MODULE_CLOSURE)
FAMILY_CLASS = {
    "step_product": StepProductRule,
    "fixed_point": FixedPointRule,
    "flow": FlowRule,
    "graph": GraphRule,
}
#: which oracle can check which family
FAMILY_ORACLES = {
    "step_product": {"step_product"},
    "graph": {"step_product"},
    "fixed_point": {"fixed_point"},
    "flow": {"flow"},
}


# ------------------------------------------------------------------------------ problems
@functools.cache
def mlp(per_step_batches: bool, steps: int = K, hidden: int = 5) -> Problem:
    """A float64 tanh MLP 2 -> hidden -> 1 (d = 21 at hidden=5), inner and outer batches.

    Cached: tests only read it (``fresh_params`` gives new leaves).
    """
    return make_problem(steps, per_step_batches=per_step_batches, n_in=2, n_hidden=hidden, n_out=1)


def problem_for(row: RuleUnderTest, steps: int = K, hidden: int = 5) -> Problem:
    return mlp(row.per_step_batches, steps, hidden)


def cast(p: Problem, dtype: torch.dtype) -> Problem:
    """The same problem in another dtype."""

    def c(batch):
        return tuple(t.to(dtype) for t in batch)

    return Problem(
        model=copy.deepcopy(p.model).to(dtype),
        theta0={k: v.to(dtype) for k, v in p.theta0.items()},
        inner_batches=[c(b) for b in p.inner_batches],
        outer_batch=c(p.outer_batch),
    )


def mse(pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((pred - y) ** 2).mean()  # as Problem.inner_loss


def batch_kw(row: RuleUnderTest, p: Problem, steps: int) -> dict[str, Any]:
    """Per-step batches where the row accepts them, else the one inner batch."""
    if row.per_step_batches:
        return {"batches": p.inner_batches[:steps]}
    return {"batch": p.inner_batches[0]}


def step_batches(row: RuleUnderTest, p: Problem, steps: int) -> list:
    return p.inner_batches[:steps] if row.per_step_batches else [p.inner_batches[0]] * steps


def flat(tensors) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# ------------------------------------------------------------------------------ runners
def run_adapt(
    row: RuleUnderTest, p: Problem, steps: int = K, lr: float = LR, params=None
) -> tuple[list[torch.Tensor], torch.Tensor, dict[str, torch.Tensor]]:
    """``(theta leaves, outer loss, adapted)`` through ``tmg.adapt``."""
    params = p.fresh_params() if params is None else params
    adapted = tmg.adapt(
        p.inner_loss, params, steps=steps, lr=lr, rule=row.rule, **batch_kw(row, p, steps)
    )
    return list(params.values()), p.outer_loss(adapted), adapted


def make_net(p: Problem) -> nn.Module:
    """A fresh copy of the problem's model holding its initial parameters."""
    net = copy.deepcopy(p.model)
    with torch.no_grad():
        for name, t in net.named_parameters():
            t.copy_(p.theta0[name])
    return net


def run_module(
    row: RuleUnderTest, p: Problem, front_end: str, steps: int = K, lr: float = LR, net=None
) -> tuple[list[torch.Tensor], torch.Tensor, nn.Module]:
    """``(theta, outer loss, net)`` through ``tmg.MetaSGD(net, lr, rule).step(...)``."""
    net = make_net(p) if net is None else net
    theta = list(net.parameters())
    opt = tmg.MetaSGD(net, lr, rule=row.rule)
    for x, y in step_batches(row, p, steps):
        if front_end == MODULE_CLOSURE:
            opt.step(lambda x=x, y=y: mse(net(x), y))
        else:
            assert front_end == MODULE_LOSS
            opt.step(mse(net(x), y))
    xq, yq = p.outer_batch
    return theta, mse(net(xq), yq), net


def run(row: RuleUnderTest, p: Problem, front_end: str, **kw):
    """``(theta, outer loss)`` through either front end."""
    if front_end == ADAPT:
        theta, outer, _ = run_adapt(row, p, **kw)
    else:
        theta, outer, _ = run_module(row, p, front_end, **kw)
    return theta, outer


def meta_grad(row: RuleUnderTest, p: Problem, front_end: str = ADAPT, **kw) -> torch.Tensor:
    theta, outer = run(row, p, front_end, **kw)
    return flat(torch.autograd.grad(outer, theta))


# ------------------------------------------------------------------- 1. the table itself
def test_every_registered_rule_has_a_row():
    """A newly registered rule must get a row in tests/rules_under_test.py."""
    covered = {type(row.rule) for row in ROWS}
    missing = [n for n in tmg.available_rules() if tmg.rule_class(n) not in covered]
    assert not missing, f"add a row to tests/rules_under_test.py for: {missing}"
    for row in ROWS:  # and every row is a registered rule
        assert tmg.rule_class(type(row.rule).name) is type(row.rule)


def test_known_bugs_name_tests_of_this_file():
    """A typo in a row's known_bugs would silently not mark anything."""
    for row in ROWS:
        for test_name in row.known_bugs:
            assert callable(globals().get(test_name)), (row, test_name)


@for_each_rule()
def test_table_columns_agree_with_the_rules_declared_needs(row):
    needs = row.rule.needs(K)
    assert isinstance(row.rule, FAMILY_CLASS[row.family])
    assert row.oracle in FAMILY_ORACLES[row.family]
    assert row.per_step_batches == needs.per_step_batches
    assert row.stores_snapshots == (needs.snapshots_from < K)
    assert row.higher_order == needs.graph
    # the module front end cannot know the horizon that keep_graphs / checkpoints need
    horizon = bool(needs.kept_graphs) or needs.checkpoints is not None
    assert (MODULE_LOSS in row.front_ends) == (not needs.curvature and not horizon)
    if row.family == "fixed_point":
        assert needs.proximal == float(row.rule.reg)


# ------------------------------------------------------------------- 2. family oracles
def check_step_product_oracle(row: RuleUnderTest) -> None:
    """Sum of the selected products of ``A_k = -lr H_k`` applied to g (explicit Hessians)."""
    p = problem_for(row)
    o = build_gd_oracle_from_hessians(p, LR)
    terms = row.terms
    assert terms is not None
    As = o.As if terms.last is None else o.As[K - terms.last :]
    ref = binomial_by_enumeration(As, o.v, len(As) if terms.degree is None else terms.degree)
    if terms == StepTerms():  # the oracle's own check: the whole product is autograd
        assert rel(ref, autograd_through_dict_gd_loop(p, LR)) < 1e-12
    theta, outer, adapted = run_adapt(row, p)
    torch.testing.assert_close(flat(adapted.values()).detach(), o.adapted_flat, rtol=1e-12, atol=0)
    got = flat(torch.autograd.grad(outer, theta))
    assert rel(got, ref) <= row.rtol


def check_fixed_point_oracle(row: RuleUnderTest) -> None:
    """``(I + H/reg)^{-1} g`` at the proximal minimizer, from the explicit Hessian there."""
    reg = float(row.rule.reg)
    p = mlp(per_step_batches=False, steps=1)
    (batch,) = p.inner_batches
    theta = p.theta0_flat()

    def inner(u: torch.Tensor) -> torch.Tensor:
        return p.inner_loss_flat(u, 0)

    H0 = torch.autograd.functional.hessian(inner, theta)
    lr = 1.0 / (float(torch.linalg.eigvalsh(H0).max()) + reg)
    params = p.fresh_params()
    adapted = tmg.adapt(p.inner_loss, params, batch, steps=300, lr=lr, rule=row.rule)
    phi = flat(adapted.values()).detach()
    # the inner loop reached the minimizer of inner + reg/2 ||phi - theta||^2 ...
    leaf = phi.clone().requires_grad_()
    (grad_inner,) = torch.autograd.grad(inner(leaf), leaf)
    assert float((grad_inner + reg * (phi - theta)).norm()) < 1e-9
    # ... where I + H/reg is positive definite (the oracle is the implicit gradient)
    M = torch.eye(p.dim, dtype=F64) + torch.autograd.functional.hessian(inner, phi) / reg
    assert float(torch.linalg.eigvalsh(M).min()) > 0.05
    (g,) = torch.autograd.grad(p.outer_loss_flat(leaf), leaf)
    ref = torch.linalg.solve(M, g)
    assert rel(g, ref) > 0.1  # the curvature term matters on this problem
    got = flat(torch.autograd.grad(p.outer_loss(adapted), list(params.values())))
    assert rel(got, ref) <= row.rtol


def check_flow_oracle(row: RuleUnderTest) -> None:
    """``expm(-T A) g`` for gradient descent (lr -> flow samples) on a quadratic."""
    d, T, lr = 6, 1.0, 0.01
    gen = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=F64))
    A = Q @ torch.diag(torch.linspace(0.5, 2.0, d, dtype=F64)) @ Q.T
    A = (A + A.T) / 2
    a, b, theta = (torch.randn(d, generator=gen, dtype=F64) for _ in range(3))

    def u_of(params: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([params["w"].reshape(-1), params["v"].reshape(-1)])

    def inner(params: dict[str, torch.Tensor], batch: object) -> torch.Tensor:
        u = u_of(params) - a
        return 0.5 * u @ A @ u

    params = {
        "w": theta[:2].clone().requires_grad_(),
        "v": theta[2:].reshape(-1, 1).clone().requires_grad_(),
    }
    adapted = tmg.adapt(inner, params, steps=round(T / lr), lr=lr, rule=row.rule)
    g = u_of(adapted).detach() - b  # grad of 1/2 ||u_K - b||^2
    ref = torch.linalg.matrix_exp(-T * A) @ g
    assert rel(g, ref) > 0.1
    outer = 0.5 * ((u_of(adapted) - b) ** 2).sum()
    got = flat(torch.autograd.grad(outer, list(params.values())))
    assert rel(got, ref) <= row.rtol


ORACLE_CHECKS = {
    "step_product": check_step_product_oracle,
    "fixed_point": check_fixed_point_oracle,
    "flow": check_flow_oracle,
}


@for_each_rule()
def test_meta_gradient_matches_the_family_oracle_in_float64(row):
    ORACLE_CHECKS[row.oracle](row)


# ------------------------------------------------------------ 3. where gradients land
@for_each_rule_and_front_end()
def test_backward_puts_the_meta_gradient_on_dot_grad(row, front_end):
    p = problem_for(row)
    expected = meta_grad(row, p, front_end)
    theta, outer = run(row, p, front_end)
    outer.backward()
    assert all(t.grad is not None for t in theta)
    torch.testing.assert_close(flat(t.grad for t in theta), expected, rtol=1e-12, atol=0)


# ------------------------------------------------------------------- 4. float32
@for_each_rule()
def test_float32_is_close_to_float64(row):
    p64 = problem_for(row)
    g64 = meta_grad(row, p64)
    with warnings.catch_warnings():
        # a solver tolerance meant for float64 may be out of float32's reach
        warnings.simplefilter("ignore", tmg.SolverWarning)
        g32 = meta_grad(row, cast(p64, torch.float32))
    assert g32.dtype == torch.float32
    assert rel(g32.double(), g64) < 1e-4


# ------------------------------------------------------------------- 5. errors
@for_each_rule_and_front_end()
def test_non_finite_outer_gradient_raises_non_finite_error(row, front_end):
    p = problem_for(row)
    theta, outer = run(row, p, front_end)
    with pytest.raises(tmg.NonFiniteError, match="non-finite"):
        torch.autograd.grad(outer * math.inf, theta)


def _no_grad_params(p: Problem) -> dict[str, Any]:
    return {"params": {k: v.detach().clone() for k, v in p.fresh_params().items()}}


def _int_params(p: Problem) -> dict[str, Any]:
    return {"params": {**p.fresh_params(), "count": torch.zeros(2, dtype=torch.int64)}}


BAD_ADAPT_ARGS = [
    ({"steps": 0}, ValueError, r"steps must be >= 1"),
    ({"steps": 2.0}, TypeError, r"steps must be an int"),
    ({"steps": True}, TypeError, r"steps must be an int"),
    ({"lr": 0.0}, ValueError, r"lr must be a finite float > 0"),
    ({"lr": -0.1}, ValueError, r"lr must be a finite float > 0"),
    ({"lr": math.inf}, ValueError, r"lr must be a finite float > 0"),
    ({"lr": math.nan}, ValueError, r"lr must be a finite float > 0"),
    ({"lr": "0.1"}, TypeError, r"lr must be a float"),
    ({"lr": None}, TypeError, r"lr is required"),
    ({"params": [torch.zeros(2, requires_grad=True)]}, TypeError, r"params must be a dict"),
    ({"params": {}}, ValueError, r"params is empty"),
    (_no_grad_params, ValueError, r"params\['0.weight'\] does not require grad"),
    (_int_params, TypeError, r"params\['count'\] must be floating point"),
]


@pytest.mark.parametrize(
    ("bad", "exc", "match"), BAD_ADAPT_ARGS, ids=[m for _, _, m in BAD_ADAPT_ARGS]
)
@for_each_rule()
def test_bad_adapt_arguments_raise_naming_the_argument(row, bad, exc, match):
    p = problem_for(row)
    kw: dict[str, Any] = {"params": p.fresh_params(), "steps": K, "lr": LR}
    kw.update(bad(p) if callable(bad) else bad)
    with pytest.raises(exc, match=match):
        tmg.adapt(p.inner_loss, rule=row.rule, **kw, **batch_kw(row, p, K))


BAD_MODULE_ARGS = [
    ({"lr": 0.0}, ValueError, r"lr must be a finite float > 0"),
    ({"lr": -0.1}, ValueError, r"lr must be a finite float > 0"),
    ({"lr": math.inf}, ValueError, r"lr must be a finite float > 0"),
    ({"module": "net"}, TypeError, r"module must be a torch.nn.Module"),
    ({"module": "frozen"}, ValueError, r"module has no parameters that require grad"),
]


@pytest.mark.parametrize(
    ("bad", "exc", "match"), BAD_MODULE_ARGS, ids=[m for _, _, m in BAD_MODULE_ARGS]
)
@for_each_rule()
def test_bad_module_arguments_raise_naming_the_argument(row, bad, exc, match):
    net = make_net(problem_for(row))
    kw: dict[str, Any] = {"module": net, "lr": LR, **bad}
    if kw["module"] == "frozen":
        kw["module"] = net.requires_grad_(False)
    with pytest.raises(exc, match=match):
        tmg.MetaSGD(kw.pop("module"), kw.pop("lr"), rule=row.rule)


@for_each_rule()
def test_module_modes_missing_from_the_row_are_refused_naming_the_rule(row):
    """The table's front_ends column is the truth: a module mode it lacks is refused."""
    p = problem_for(row)
    for front_end in set(MODULE_FRONT_ENDS) - set(row.front_ends):
        what = r"use tmg.adapt" if row.rule.needs(K).kept_graphs else "closure"
        with pytest.raises(ValueError, match=rf"{type(row.rule).__name__}\b.*{what}"):
            run_module(row, p, front_end)


# ------------------------------------------------------ 6. module front end == functional
@for_each_rule_and_front_end(MODULE_FRONT_ENDS)
def test_module_front_end_equals_the_functional_one(row, front_end):
    p = problem_for(row)
    want = meta_grad(row, p, ADAPT)
    got = meta_grad(row, p, front_end)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10 * float(want.abs().max()))


# --------------------------------------------------------------- 7. gradcheck (exact rules)
GRADCHECK_STEPS = 3


@for_each_rule(where="exact")
def test_gradcheck_through_adapt(row):
    p = problem_for(row, steps=GRADCHECK_STEPS)
    names = list(p.theta0)
    leaves = tuple(p.fresh_params().values())

    def adapted(*theta):
        params = dict(zip(names, theta))
        _, _, out = run_adapt(row, p, steps=GRADCHECK_STEPS, params=params)
        return tuple(out.values())

    assert torch.autograd.gradcheck(adapted, leaves)


def put_parameters(net: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Make ``tensors`` the module's parameters (as torchopt's MetaOptimizer does)."""
    for name, t in tensors.items():
        owner, _, attr = name.rpartition(".")
        net.get_submodule(owner)._parameters[attr] = t  # type: ignore[assignment]


@for_each_rule_and_front_end(MODULE_FRONT_ENDS, where="exact")
def test_gradcheck_through_the_module_front_end(row, front_end):
    p = problem_for(row, steps=GRADCHECK_STEPS)
    names = list(p.theta0)
    leaves = tuple(p.fresh_params().values())

    def adapted(*theta):
        net = copy.deepcopy(p.model)
        put_parameters(net, dict(zip(names, theta)))
        run_module(row, p, front_end, steps=GRADCHECK_STEPS, net=net)
        held = dict(net.named_parameters())
        return tuple(held[n] for n in names)

    assert torch.autograd.gradcheck(adapted, leaves)


# --------------------------------------------------------------- 8. second derivatives
def unrolled_hvp_reference(row: RuleUnderTest, p: Problem, u: list[torch.Tensor]):
    """``d/dtheta <dL/dtheta, u>`` by double backprop through a hand-written GD loop."""
    params = p.fresh_params()
    phi = dict(params)
    for batch in step_batches(row, p, K):
        grads = torch.autograd.grad(p.inner_loss(phi, batch), list(phi.values()), create_graph=True)
        phi = {n: t - LR * g for (n, t), g in zip(phi.items(), grads)}
    theta = list(params.values())
    mg = torch.autograd.grad(p.outer_loss(phi), theta, create_graph=True)
    return flat(torch.autograd.grad(sum((g * v).sum() for g, v in zip(mg, u)), theta))


@for_each_rule_and_front_end((ADAPT, MODULE_CLOSURE))
def test_second_derivative_raises_naming_the_rule_or_works_if_higher_order(row, front_end):
    p = problem_for(row)
    theta, outer = run(row, p, front_end)
    if not row.higher_order:
        name = type(row.rule).__name__
        with pytest.raises(RuntimeError, match=rf"{name}\b.*Unrolled"):
            torch.autograd.grad(outer, theta, create_graph=True)
        return
    gen = torch.Generator().manual_seed(5)
    u = [torch.randn(t.shape, generator=gen, dtype=F64) for t in theta]
    mg = torch.autograd.grad(outer, theta, create_graph=True)
    got = flat(torch.autograd.grad(sum((g * v).sum() for g, v in zip(mg, u)), theta))
    want = unrolled_hvp_reference(row, p, u)
    assert rel(got, want) < 1e-10


# --------------------------------------------------------------- 9. memory
MEMORY_STEPS = 20


@for_each_rule(where="stores_snapshots")
def test_snapshots_are_freed_by_the_backward_while_adapted_lives(row):
    """After ``outer.backward()`` only the adapted params and the ``.grad`` remain."""
    p = problem_for(row, steps=MEMORY_STEPS, hidden=16)
    snapshot_bytes = p.dim * 8  # one flat float64 state
    stored = MEMORY_STEPS - row.rule.needs(MEMORY_STEPS).snapshots_from
    params = p.fresh_params()
    with LiveMemoryTracker() as mem:
        _, outer, adapted = run_adapt(row, p, steps=MEMORY_STEPS, params=params)
        held = mem.current_bytes
        outer.backward()
        after = mem.current_bytes
    assert adapted  # still referenced
    assert all(t.grad is not None for t in params.values())
    assert held >= stored * snapshot_bytes  # the snapshots were there ...
    assert after <= 2 * snapshot_bytes + 256  # ... and only adapted + .grad are left
