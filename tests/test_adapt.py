"""Front-end behaviour of tmg.adapt: gradients land where expected, errors name the argument."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torchopt
from conftest import TinyRegression

import torchopt_metagrad as tmg

ALL_RULES = [
    tmg.FirstOrder(),
    tmg.Truncated(2),
    tmg.Binomial(2),
    tmg.Binomial(2, chunk_size=2),
    tmg.Exact(),
    tmg.Unrolled(),
]


def meta_grad(p: TinyRegression, rule: tmg.AbstractRule, **kw) -> torch.Tensor:
    kw.setdefault("steps", 4)
    if "optimizer" not in kw:
        kw.setdefault("lr", 0.1)
    adapted = tmg.adapt(p.loss, p.params, p.inner, rule=rule, **kw)
    grads = torch.autograd.grad(p.loss(adapted, p.outer), list(p.params.values()))
    return torch.cat([g.reshape(-1) for g in grads])


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_rules_are_frozen_and_hashable():
    rule = tmg.Binomial(2)
    with pytest.raises(AttributeError):
        rule.order = 3  # type: ignore[misc]
    assert hash(rule) == hash(tmg.Binomial(2))


@pytest.mark.parametrize("rule", ALL_RULES, ids=repr)
def test_backward_puts_meta_gradient_on_dot_grad(problem, rule):
    expected = meta_grad(problem, rule)
    adapted = tmg.adapt(problem.loss, problem.params, problem.inner, steps=4, lr=0.1, rule=rule)
    problem.loss(adapted, problem.outer).backward()
    got = torch.cat([p.grad.reshape(-1) for p in problem.net.parameters()])
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=0)


@pytest.mark.parametrize("rule", ALL_RULES, ids=repr)
def test_adapted_params_are_the_inner_loop_result(problem, rule):
    adapted = tmg.adapt(problem.loss, problem.params, problem.inner, steps=3, lr=0.1, rule=rule)
    phi = {k: v.detach().clone() for k, v in problem.params.items()}
    for _ in range(3):
        leaves = {k: v.requires_grad_() for k, v in phi.items()}
        grads = torch.autograd.grad(problem.loss(leaves, problem.inner), list(leaves.values()))
        phi = {k: (v - 0.1 * g).detach() for (k, v), g in zip(leaves.items(), grads)}
    assert list(adapted) == list(problem.params)
    for k in phi:
        torch.testing.assert_close(adapted[k], phi[k], rtol=1e-12, atol=1e-14)


def test_outer_optimizer_step_works_unchanged(problem):
    outer = torch.optim.Adam(problem.net.parameters(), lr=1e-2)
    before = [p.detach().clone() for p in problem.net.parameters()]
    for _ in range(2):
        outer.zero_grad()
        adapted = tmg.adapt(
            problem.loss, problem.params, problem.inner, steps=3, lr=0.1, rule=tmg.Binomial(1)
        )
        problem.loss(adapted, problem.outer).backward()
        outer.step()
    assert all(not torch.equal(a, b) for a, b in zip(before, problem.net.parameters()))


def test_outer_loss_that_also_uses_theta_adds_direct_path(problem):
    """Autograd adds the direct dependence of the outer loss on theta to the rule's part."""
    adapted = tmg.adapt(
        problem.loss, problem.params, problem.inner, steps=2, lr=0.1, rule=tmg.Exact()
    )

    def reg():
        return sum((p**2).sum() for p in problem.params.values())

    total = problem.loss(adapted, problem.outer) + reg()
    got = torch.autograd.grad(total, list(problem.params.values()))
    adapted_u = tmg.adapt(
        problem.loss, problem.params, problem.inner, steps=2, lr=0.1, rule=tmg.Unrolled()
    )
    want = torch.autograd.grad(
        problem.loss(adapted_u, problem.outer) + reg(), list(problem.params.values())
    )
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("rule", [tmg.Exact(), tmg.Binomial(3), tmg.Truncated(3)], ids=repr)
@pytest.mark.parametrize("inner", ["gd", "momentum", "adam"])
def test_gradcheck_through_adapt(rule, inner):
    """The autograd node's backward is the derivative of its forward for the exact rules."""
    p = TinyRegression(seed=1)
    kw: dict = {"lr": 0.1}
    if inner == "momentum":
        kw = {"optimizer": torchopt.sgd(0.1, momentum=0.9)}
    elif inner == "adam":
        kw = {"optimizer": torchopt.adam(0.05)}
    names = list(p.params)
    leaves = tuple(t.detach().clone().requires_grad_() for t in p.params.values())

    def adapted(*theta):
        out = tmg.adapt(p.loss, dict(zip(names, theta)), p.inner, steps=3, rule=rule, **kw)
        return tuple(out.values())

    assert torch.autograd.gradcheck(adapted, leaves)


@pytest.mark.parametrize("rule", ALL_RULES, ids=repr)
def test_float32_matches_float64(rule):
    p64, p32 = TinyRegression(torch.float64), TinyRegression(torch.float32)
    g64 = meta_grad(p64, rule)
    g32 = meta_grad(p32, rule)
    assert g32.dtype == torch.float32
    assert rel(g32.double(), g64) < 1e-4


@pytest.mark.parametrize("chunk_size", [1, 2, 3, 100])
def test_chunked_and_looped_stages_equal_one_batched_call(problem, chunk_size):
    full = meta_grad(problem, tmg.Binomial(2), steps=5)
    chunked = meta_grad(problem, tmg.Binomial(2, chunk_size=chunk_size), steps=5)
    looped = meta_grad(problem, tmg.Binomial(2, vectorize=False), steps=5)
    assert rel(chunked, full) < 1e-13
    assert rel(looped, full) < 1e-13


def test_per_step_batches_of_different_shapes_fall_back_to_a_loop(problem):
    gen = torch.Generator().manual_seed(3)
    batches = []
    for n in (4, 5, 6, 7):
        x = torch.randn(n, 2, generator=gen, dtype=torch.float64)
        batches.append((x, torch.sin(x.sum(1, keepdim=True))))
    params = list(problem.params.values())

    def grad_of(rule):
        adapted = tmg.adapt(
            problem.loss, problem.params, batches=batches, steps=4, lr=0.1, rule=rule
        )
        return torch.autograd.grad(problem.loss(adapted, problem.outer), params)

    ref = grad_of(tmg.Binomial(2, vectorize=False))
    tmg.diagnostics.reset_fallback_warnings()
    with pytest.warns(tmg.VectorizationFallbackWarning, match="cannot be stacked"):
        got = grad_of(tmg.Binomial(2))
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)
    exact = grad_of(tmg.Unrolled())
    for a, b in zip(grad_of(tmg.Binomial(4)), exact):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14)


def test_model_that_updates_buffers_falls_back_once_with_a_warning():
    """Batch norm updating running statistics in place: each step is replayed one by one."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 1)
    ).double()
    x, y = torch.randn(8, 3, dtype=torch.float64), torch.randn(8, 1, dtype=torch.float64)
    buffers = dict(net.named_buffers())

    def loss(params, batch):
        out = torch.func.functional_call(net, {**params, **buffers}, (batch[0],))
        return ((out - batch[1]) ** 2).mean()

    params = dict(net.named_parameters())
    tmg.diagnostics.reset_fallback_warnings()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for _ in range(2):
            adapted = tmg.adapt(loss, params, (x, y), steps=3, lr=0.1, rule=tmg.Binomial(2))
            torch.autograd.grad(loss(adapted, (x, y)), list(params.values()))
    fallbacks = [w for w in record if issubclass(w.category, tmg.VectorizationFallbackWarning)]
    assert len(fallbacks) == 1
    assert "updates buffers in place" in str(fallbacks[0].message)


# ---- errors -------------------------------------------------------------------------------


def call(p: TinyRegression, **overrides):
    kw = dict(loss_fn=p.loss, params=p.params, batch=p.inner, steps=3, lr=0.1, rule=tmg.Exact())
    kw.update(overrides)
    return tmg.adapt(**kw)


@pytest.mark.parametrize(
    ("make", "exc", "match"),
    [
        (lambda: tmg.Binomial(-1), ValueError, "order must be >= 0"),
        (lambda: tmg.Truncated(-2), ValueError, "order must be >= 0"),
        (lambda: tmg.Binomial(1.5), TypeError, "order must be an int"),
        (lambda: tmg.Binomial(2, chunk_size=0), ValueError, "chunk_size"),
    ],
)
def test_bad_rule_knobs(make, exc, match):
    with pytest.raises(exc, match=match):
        make()


@pytest.mark.parametrize(
    ("overrides", "exc", "match"),
    [
        ({"rule": tmg.Binomial(4)}, ValueError, "order=4 is larger than steps=3"),
        ({"rule": tmg.Truncated(5)}, ValueError, "order=5 is larger than steps=3"),
        ({"steps": 0}, ValueError, "steps must be >= 1"),
        ({"steps": 2.0}, TypeError, "steps must be an int"),
        ({"lr": 0.0}, ValueError, "lr must be a finite float > 0"),
        ({"lr": -1e-3}, ValueError, "lr must be"),
        ({"lr": math.inf}, ValueError, "lr must be"),
        ({"lr": None}, TypeError, "lr is required"),
        ({"optimizer": torchopt.sgd(0.1)}, ValueError, "not both"),
        ({"lr": None, "optimizer": object()}, TypeError, "optimizer must be a torchopt"),
        ({"rule": "exact"}, TypeError, "rule must be"),
        ({"loss_fn": 3}, TypeError, "loss_fn must be callable"),
        ({"params": [1, 2]}, TypeError, "params must be a dict"),
        ({"params": {}}, ValueError, "params is empty"),
        ({"batches": [None] * 3}, ValueError, "batch.*or batches.*not both"),
    ],
)
def test_bad_arguments_raise_naming_the_argument(problem, overrides, exc, match):
    with pytest.raises(exc, match=match):
        call(problem, **overrides)


def test_batches_of_wrong_length(problem):
    with pytest.raises(ValueError, match="batches has 2 entries but steps=3"):
        call(problem, batch=None, batches=[problem.inner] * 2)


def test_params_that_do_not_require_grad(problem):
    params = {k: v.detach() for k, v in problem.params.items()}
    with pytest.raises(ValueError, match=r"params\['0.weight'\] does not require grad"):
        call(problem, params=params)


def test_params_that_are_not_floating_point(problem):
    params = dict(problem.params)
    params["step"] = torch.zeros(2, dtype=torch.int64)
    with pytest.raises(TypeError, match=r"params\['step'\] must be floating point"):
        call(problem, params=params)


def test_params_of_mixed_dtype(problem):
    params = dict(problem.params)
    params["extra"] = torch.zeros(2, dtype=torch.float32, requires_grad=True)
    with pytest.raises(ValueError, match=r"params\['extra'\].*share dtype"):
        call(problem, params=params)


@pytest.mark.parametrize("rule", ALL_RULES, ids=repr)
def test_non_scalar_loss(problem, rule):
    def loss(params, batch):
        x, y = batch
        return (torch.func.functional_call(problem.net, params, (x,)) - y) ** 2

    with pytest.raises(ValueError, match=r"scalar tensor, got shape \(10, 1\) at inner step 0"):
        call(problem, loss_fn=loss, rule=rule)


@pytest.mark.parametrize("rule", ALL_RULES, ids=repr)
def test_loss_that_does_not_depend_on_params(problem, rule):
    def loss(params, batch):
        return problem.net(batch[0]).detach().sum()

    with pytest.raises(ValueError, match="does not depend on params"):
        call(problem, loss_fn=loss, rule=rule)


def test_loss_that_is_not_a_tensor(problem):
    with pytest.raises(TypeError, match="must return a scalar tensor, got float"):
        call(problem, loss_fn=lambda params, batch: 1.0)


@pytest.mark.parametrize("rule", ALL_RULES, ids=repr)
def test_non_finite_inner_loss_names_the_step(problem, rule):
    def loss(params, batch):
        value = problem.loss(params, batch[:2])
        return value * batch[2]

    batches = [(*problem.inner, torch.tensor(s, dtype=torch.float64)) for s in (1.0, 1.0, math.nan)]
    with pytest.raises(tmg.NonFiniteError, match="inner loss is not finite at inner step 2"):
        call(problem, loss_fn=loss, batch=None, batches=batches, rule=rule)


@pytest.mark.parametrize(
    ("rule", "where"),
    [
        (tmg.Exact(), "at inner step 1"),
        (tmg.Truncated(3), "at inner step 1"),
        (tmg.Binomial(2), r"stage 1 .* inner step\(s\) 1"),
        (tmg.Unrolled(), "at inner step 1"),
    ],
    ids=repr,
)
def test_non_finite_meta_gradient_names_the_step(problem, rule, where):
    """A loss whose Hessian is infinite at step 1 only (finite value and gradient)."""

    class Kink(torch.autograd.Function):
        @staticmethod
        def forward(ctx, t, scale):
            ctx.save_for_backward(scale)
            return t

        @staticmethod
        def backward(ctx, grad):
            (scale,) = ctx.saved_tensors
            return _Poison.apply(grad, scale), None

    class _Poison(torch.autograd.Function):
        @staticmethod
        def forward(ctx, grad, scale):
            ctx.save_for_backward(scale)
            return grad.clone()

        @staticmethod
        def backward(ctx, gg):
            (scale,) = ctx.saved_tensors
            return gg * scale, None

    def loss(params, batch):
        x, y, scale = batch
        out = torch.func.functional_call(problem.net, params, (x,))
        return ((Kink.apply(out, scale) - y) ** 2).mean()

    batches = [(*problem.inner, torch.tensor(s, dtype=torch.float64)) for s in (1.0, math.inf, 1.0)]
    adapted = call(problem, loss_fn=loss, batch=None, batches=batches, rule=rule)
    with pytest.raises(tmg.NonFiniteError, match=where), warnings.catch_warnings():
        # a custom autograd.Function without setup_context cannot run under vmap
        warnings.simplefilter("ignore", tmg.VectorizationFallbackWarning)
        torch.autograd.grad(problem.loss(adapted, problem.outer), list(problem.params.values()))


def test_non_finite_outer_gradient_is_reported(problem):
    adapted = call(problem)
    with pytest.raises(tmg.NonFiniteError, match="outer loss's gradient"):
        torch.autograd.grad(
            problem.loss(adapted, problem.outer) * math.inf, list(problem.params.values())
        )


@pytest.mark.parametrize("rule", [r for r in ALL_RULES if r != tmg.Unrolled()], ids=repr)
def test_second_derivative_through_a_snapshot_rule_raises_naming_it(problem, rule):
    """create_graph=True through a snapshot rule raises (never a silently dropped term),
    also when the outer loss uses theta directly (torch would otherwise return only that
    part) and with torch.autograd.grad(..., inputs=theta)."""
    adapted = call(problem, rule=rule)
    params = list(problem.params.values())
    outer = problem.loss(adapted, problem.outer) + sum((p**2).sum() for p in params)
    name = type(rule).__name__
    with pytest.raises(RuntimeError, match=rf"{name} \(in tmg.adapt\).*tmg.Unrolled\(\)"):
        torch.autograd.grad(outer, params, create_graph=True)


@pytest.mark.cuda
@pytest.mark.parametrize("rule", ALL_RULES, ids=repr)
def test_cuda_matches_cpu(rule):
    cpu = TinyRegression(torch.float64, "cpu")
    gpu = TinyRegression(torch.float64, "cuda")
    g_cpu = meta_grad(cpu, rule)
    g_gpu = meta_grad(gpu, rule)
    assert g_gpu.device.type == "cuda"
    assert rel(g_gpu.cpu(), g_cpu) < 1e-10


def test_snapshots_are_released_after_backward(problem):
    """The K stored snapshots do not outlive the backward while `adapted` is still alive."""
    from torchopt_metagrad.diagnostics import LiveMemoryTracker

    steps = 40
    snapshot_bytes = sum(p.numel() for p in problem.params.values()) * 8 * steps
    with LiveMemoryTracker() as mem:
        adapted = tmg.adapt(
            problem.loss, problem.params, problem.inner, steps=steps, lr=0.1, rule=tmg.Exact()
        )
        held = mem.current_bytes
        problem.loss(adapted, problem.outer).backward()
        after = mem.current_bytes
    assert adapted  # still referenced
    assert held >= snapshot_bytes
    assert after < snapshot_bytes / 4
