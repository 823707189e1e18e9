"""Meta-parameters tried as an adversary: hidden tensors, bad lr values, unsupported rules.

Each case either gets the right meta-gradient (checked against ``Unrolled``, which keeps
the whole graph) or a clear error naming what is wrong; never a silently dropped term.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import pytest
import torch
import torchopt
from torch import nn

import torchopt_metagrad as tmg
from torchopt_metagrad.rules.base import StepProductRule

D = torch.float64
SNAPSHOT_RULES = [
    tmg.Exact(),
    tmg.FirstOrder(),
    tmg.Truncated(1),
    tmg.Binomial(1),
    tmg.Binomial(2, vectorize=False),
]


def _data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(6, 3, dtype=D, generator=g),
        torch.randn(6, dtype=D, generator=g),
        torch.randn(3, dtype=D, generator=g),
    )


def _mse(q: dict[str, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """The linear least-squares inner loss most cases use."""
    return ((b[0] @ q["w"] - b[1]) ** 2).mean()


def _grads(rule: tmg.AbstractRule, build) -> list[torch.Tensor]:  # type: ignore[no-untyped-def]
    outer, leaves = build(rule)
    return list(torch.autograd.grad(outer, leaves))


def _close(got: list[torch.Tensor], ref: list[torch.Tensor]) -> float:
    num = sum(float((a - b).norm() ** 2) for a, b in zip(got, ref, strict=True)) ** 0.5
    den = sum(float(b.norm() ** 2) for b in ref) ** 0.5
    return num / den


@pytest.mark.parametrize("rule", [tmg.Exact(), tmg.Binomial(3), tmg.Truncated(3)], ids=str)
def test_closed_over_float32_coefficient_in_float64_loop(rule):
    """A closed-over leaf of another dtype gets its meta-gradient in its own dtype."""
    x, y, w0 = _data()
    coef = torch.tensor(0.3, requires_grad=True)  # float32

    def build(r):  # type: ignore[no-untyped-def]
        p = {"w": w0.clone().requires_grad_()}
        fn = lambda q, b: _mse(q, b) + coef * (q["w"] ** 2).sum()  # noqa: E731
        out = tmg.adapt(fn, p, (x, y), steps=3, lr=0.1, rule=r)
        return (out["w"] ** 3).sum(), [p["w"], coef]

    got, ref = _grads(rule, build), _grads(tmg.Unrolled(), build)
    assert got[1].dtype == torch.float32
    assert _close(got, ref) < 1e-6


@pytest.mark.parametrize("rule", SNAPSHOT_RULES, ids=str)
def test_torchopt_optimizer_with_a_tensor_lr_that_requires_grad_is_refused(rule):
    x, y, w0 = _data()
    lr = torch.tensor(0.1, dtype=D, requires_grad=True)
    p = {"w": w0.clone().requires_grad_()}
    with pytest.raises(ValueError, match=r"inner optimizer depends on a tensor of shape \(\)"):
        tmg.adapt(
            _mse,
            p,
            (x, y),
            steps=2,
            rule=rule,
            optimizer=torchopt.sgd(lr),
        )


def test_per_step_batches_that_require_grad_are_refused():
    x, y, w0 = _data()
    feats = x * torch.tensor(2.0, dtype=D, requires_grad=True)
    p = {"w": w0.clone().requires_grad_()}
    with pytest.raises(ValueError, match=r"batches\[1\] holds a tensor of shape \(6, 3\)"):
        tmg.adapt(
            _mse,
            p,
            batches=[(x, y), (feats, y)],
            steps=2,
            lr=0.1,
            rule=tmg.Exact(),
        )


@pytest.mark.parametrize(
    "lr, match",
    [
        (torch.tensor(float("nan"), dtype=D), "non-finite"),
        (torch.ones(2, 2, dtype=D), r"0-dim tensor \(one rate\) or of shape \(3,\)"),
        (torch.ones(4, dtype=D), r"shape \(3,\)"),
        (torch.tensor(1, dtype=torch.long), "floating-point"),
        ({"v": torch.tensor(0.1, dtype=D)}, r"missing \['w'\]"),
        ({"w": torch.ones(2, dtype=D)}, "shaped like the parameter"),
    ],
    ids=["nan", "matrix", "per-step-length", "int", "dict-key", "dict-shape"],
)
def test_bad_lr_tensors_are_refused_naming_lr(lr, match):
    x, y, w0 = _data()
    with pytest.raises((TypeError, ValueError), match=match):
        tmg.adapt(
            _mse,
            {"w": w0.clone().requires_grad_()},
            (x, y),
            steps=3,
            lr=lr,
            rule=tmg.Exact(),
        )


@pytest.mark.parametrize(
    "rule", [tmg.ImplicitCG(1.0), tmg.ImplicitNeumann(1.0), tmg.Adjoint()], ids=str
)
def test_learned_lr_is_refused_by_rules_that_do_not_depend_on_it(rule):
    x, y, w0 = _data()
    lr = torch.tensor(0.1, dtype=D, requires_grad=True)
    with pytest.raises(ValueError, match="does not depend on the inner learning rate"):
        tmg.adapt(
            _mse,
            {"w": w0.clone().requires_grad_()},
            (x, y),
            steps=3,
            lr=lr,
            rule=rule,
        )


def test_a_rule_without_meta_support_raises_instead_of_dropping_the_term():
    @dataclass(frozen=True)
    class PlainOnly(StepProductRule):  # not registered: used directly
        def meta_gradient(self, record, g):  # type: ignore[no-untyped-def]
            return g

    x, y, w0 = _data()
    coef = torch.tensor(0.3, dtype=D, requires_grad=True)
    out = tmg.adapt(
        lambda q, b: _mse(q, b) + coef * (q["w"] ** 2).sum(),
        {"w": w0.clone().requires_grad_()},
        (x, y),
        steps=2,
        lr=0.1,
        rule=PlainOnly(),
    )
    with pytest.raises(RuntimeError, match=r"PlainOnly returned no meta-gradient .* shape \(\)"):
        out["w"].sum().backward()


@pytest.mark.parametrize("rule", SNAPSHOT_RULES, ids=str)
def test_second_derivative_through_a_meta_parameter_raises(rule):
    x, y, w0 = _data()
    lr = torch.tensor(0.1, dtype=D, requires_grad=True)
    out = tmg.adapt(
        _mse,
        {"w": w0.clone().requires_grad_()},
        (x, y),
        steps=2,
        lr=lr,
        rule=rule,
    )
    with pytest.raises(RuntimeError, match="once-differentiable"):
        torch.autograd.grad((out["w"] ** 2).sum(), lr, create_graph=True)


@pytest.mark.filterwarnings("ignore::torchopt_metagrad.VectorizationFallbackWarning")
@pytest.mark.parametrize("rule", [tmg.Exact(), tmg.Binomial(3), tmg.Truncated(3)], ids=str)
def test_dropout_and_batch_norm_in_a_closed_over_body(rule):
    """Randomness and buffer writes in the body: replayed, and its meta-gradient is exact."""
    torch.manual_seed(0)
    body = nn.Sequential(nn.Linear(3, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Dropout(0.3)).to(D)
    x, y, _ = _data()
    state = {k: v.clone() for k, v in body.state_dict().items()}

    def build(r):  # type: ignore[no-untyped-def]
        body.load_state_dict(state)
        torch.manual_seed(1)
        p = {"w": torch.full((5,), 0.2, dtype=D, requires_grad=True)}
        fn = lambda q, b: ((body(b[0]) @ q["w"] - b[1]) ** 2).mean()  # noqa: E731
        out = tmg.adapt(fn, p, (x, y), steps=3, lr=0.2, rule=r)
        body.eval()
        outer = ((body(x * 0.5) @ out["w"] - y) ** 2).mean()
        body.train()
        return outer, [p["w"], *body.parameters()]

    ref = _grads(tmg.Unrolled(), build)
    stats = body[1].running_mean.clone()
    got = _grads(rule, build)
    assert torch.equal(body[1].running_mean, stats)  # the replays did not update it again
    assert _close(got, ref) < 1e-12


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(3, 4), nn.Tanh())
        self.head = nn.Linear(4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x)).squeeze(-1)


@pytest.mark.parametrize("closure", [False, True], ids=["step(loss)", "step(closure)"])
@pytest.mark.parametrize("rule", [tmg.Exact(), tmg.Binomial(3), tmg.FirstOrder()], ids=str)
def test_module_optimizer_over_the_head_with_features_computed_before_the_loop(rule, closure):
    """The training loss uses features computed once, outside the inner loop, by the body:
    the body's meta-gradient through the inner loop is found through them."""
    torch.manual_seed(0)
    base = _Net().to(D)
    x, y, _ = _data()

    def run(r):  # type: ignore[no-untyped-def]
        net = copy.deepcopy(base)
        theta = list(net.parameters())
        feats = net.body(x)
        opt = tmg.MetaSGD(net.head, lr=0.3, rule=r)
        for _ in range(3):
            loss = lambda: ((net.head(feats).squeeze(-1) - y) ** 2).mean()  # noqa: E731
            opt.step(loss if closure else loss())
        ((net(x * 0.5) - y) ** 2).mean().backward()
        return [t.grad.clone() for t in theta]

    ref = run(tmg.Unrolled())
    if isinstance(rule, tmg.FirstOrder):
        # FirstOrder differs from the exact answer, but equals Binomial(0) for every tensor.
        assert _close(run(rule), run(tmg.Binomial(0))) < 1e-13
        return
    assert _close(run(rule), ref) < 1e-12


@pytest.mark.parametrize("rule", [tmg.Exact(), tmg.Binomial(3), tmg.Truncated(3)], ids=str)
def test_a_fixed_entry_also_closed_over_gets_both_paths(rule):
    """A tensor passed as a fixed entry of params *and* used directly by the loss: the
    closed-over use is found too (found in review: 24.5% off before the fix)."""
    x, y, w0 = _data()
    m = torch.tensor([0.3, -0.2, 0.5], dtype=D, requires_grad=True)

    def build(r):  # type: ignore[no-untyped-def]
        params = {"w": w0.clone().requires_grad_(), "m": m}

        def fn(q, b):  # type: ignore[no-untyped-def]
            return ((b[0] @ (q["w"] + q["m"]) - b[1]) ** 2).mean() + 0.1 * (q["w"] * m).sum() ** 2

        out = tmg.adapt(fn, params, (x, y), steps=3, lr=0.1, rule=r, adapt=["w"])
        return (out["w"] ** 3).sum() + out["m"].sum(), [params["w"], m]

    assert _close(_grads(rule, build), _grads(tmg.Unrolled(), build)) < 1e-12


@pytest.mark.parametrize("rule", [tmg.Exact(), tmg.Binomial(2)], ids=str)
def test_a_tensor_closed_over_only_after_the_first_step_is_refused(rule):
    x, y, w0 = _data()
    wd = torch.tensor(0.1, dtype=D, requires_grad=True)
    calls = {"n": 0}

    def fn(q, b):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        value = ((b[0] @ q["w"] - b[1]) ** 2).mean()
        return value + wd * (q["w"] ** 2).sum() if calls["n"] > 1 else value

    with pytest.raises(ValueError, match=r"from inner step 1 on, but not at step 0"):
        tmg.adapt(fn, {"w": w0.clone().requires_grad_()}, (x, y), steps=3, lr=0.1, rule=rule)
