"""What the two front ends got wrong when tried adversarially, each fixed in the one core.

Randomness and buffers in the loss are replayed, not redrawn or updated again; kept
graphs are released as the rule drops steps; the unrolled loop checks every state.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import torchopt_metagrad as tmg
from torchopt_metagrad.diagnostics import LiveMemoryTracker

F64 = torch.float64
K = 4


def _data(seed: int = 0, n: int = 16):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=gen, dtype=F64)
    return x, torch.sin(x.sum(1, keepdim=True))


def _meta_grad(net, loss, rule, seed=0, steps=K):
    params = dict(net.named_parameters())
    torch.manual_seed(seed)  # the same draws in the forward loop for every rule
    adapted = tmg.adapt(loss, params, _data(1), steps=steps, lr=0.1, rule=rule)
    outer = loss(adapted, _data(2))
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(outer, list(params.values()))])


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def _dropout_problem():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 32), nn.Tanh(), nn.Dropout(0.5), nn.Linear(32, 1)).double()

    def loss(params, batch):
        x, y = batch
        return F.mse_loss(torch.func.functional_call(net, params, (x,)), y)

    return net, loss


@pytest.mark.parametrize("rule", [tmg.Exact(), tmg.Truncated(K), tmg.Binomial(K)], ids=repr)
def test_dropout_is_replayed_not_redrawn(rule):
    """Exact rules equal Unrolled to round-off with dropout in loss_fn (were 32% off)."""
    net, loss = _dropout_problem()
    want = _meta_grad(net, loss, tmg.Unrolled())
    assert _rel(_meta_grad(net, loss, rule), want) < 1e-12
    # the draws really matter: a different seed gives a different meta-gradient
    assert _rel(_meta_grad(net, loss, tmg.Unrolled(), seed=1), want) > 1e-3


def test_dropout_binomial_stage_replays_each_step_and_says_so():
    net, loss = _dropout_problem()
    looped = _meta_grad(net, loss, tmg.Binomial(2, vectorize=False))
    tmg.diagnostics.reset_fallback_warnings()
    with pytest.warns(tmg.VectorizationFallbackWarning, match="random numbers"):
        got = _meta_grad(net, loss, tmg.Binomial(2))
    assert _rel(got, looped) < 1e-13


class _no_warning:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _bn_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 1)).double()


@pytest.mark.parametrize(
    "rule",
    [tmg.Unrolled(), tmg.Exact(), tmg.Binomial(2), tmg.Truncated(2), tmg.ImplicitCG(1.0)],
    ids=repr,
)
def test_batch_norm_buffers_are_left_as_the_forward_left_them(rule):
    """num_batches_tracked and running stats after one task do not depend on the rule
    (were 5 with Unrolled, 9 with Exact, 11 with Binomial(2), 18 with ImplicitCG)."""
    net = _bn_net()

    def loss(params, batch):
        x, y = batch
        return F.mse_loss(torch.func.functional_call(net, params, (x,)), y)

    params = dict(net.named_parameters())
    adapted = tmg.adapt(loss, params, _data(1), steps=K, lr=0.1, rule=rule)
    outer = loss(adapted, _data(2))
    bn = net[1]
    before = [bn.running_mean.clone(), bn.running_var.clone(), int(bn.num_batches_tracked)]
    tmg.diagnostics.reset_fallback_warnings()
    warns = isinstance(rule, tmg.Binomial)
    with pytest.warns(tmg.VectorizationFallbackWarning) if warns else _no_warning():
        grads = torch.autograd.grad(outer, list(params.values()))
    assert all(torch.isfinite(g).all() for g in grads)
    assert before[2] == K + 1  # K inner steps + the outer loss's forward
    assert int(bn.num_batches_tracked) == before[2]  # the backward's replays added nothing
    assert torch.equal(bn.running_mean, before[0]) and torch.equal(bn.running_var, before[1])


def _functional_loss(net):
    def loss(params, batch):
        x, y = batch
        return F.mse_loss(torch.func.functional_call(net, params, (x,)), y)

    return loss


def test_batch_norm_exact_equals_unrolled():
    """With running statistics tracked, Exact's meta-gradient equals Unrolled's."""
    nets = [_bn_net(), _bn_net()]
    grads = []
    for net, rule in zip(nets, (tmg.Unrolled(), tmg.Exact())):
        grads.append(_meta_grad(net, _functional_loss(net), rule))
    assert _rel(grads[1], grads[0]) < 1e-12


def test_module_closure_mode_batch_norm_buffers_match_unrolled():
    grads, counts = [], []
    for rule in (tmg.Unrolled(), tmg.Exact()):
        net = _bn_net()
        theta = list(net.parameters())
        opt = tmg.MetaSGD(net, lr=0.1, rule=rule)
        x, y = _data(1)
        for _ in range(K):
            opt.step(lambda net=net, x=x, y=y: F.mse_loss(net(x), y))
        xq, yq = _data(2)
        F.mse_loss(net(xq), yq).backward()
        counts.append(int(net[1].num_batches_tracked))
        grads.append(torch.cat([p.grad.reshape(-1) for p in theta]))
    assert counts == [K + 1, K + 1]  # K inner steps + the outer forward
    assert _rel(grads[1], grads[0]) < 1e-12


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 64), nn.Tanh(), nn.Linear(64, 1)).double()


def _kept_bytes(rule, steps):
    net = _mlp()
    x, y = _data(1)
    with LiveMemoryTracker() as mem:
        opt = tmg.MetaSGD(net, lr=0.1, rule=rule)
        for _ in range(steps):
            opt.step(F.mse_loss(net(x), y))
        held = mem.current_bytes
    return held


def test_truncated_in_loss_mode_keeps_only_the_last_steps_graphs():
    """Truncated(L) with step(loss) kept every step's graph (198 KiB per step on an MLP)."""
    per_step_truncated = (_kept_bytes(tmg.Truncated(2), 12) - _kept_bytes(tmg.Truncated(2), 4)) / 8
    per_step_exact = (_kept_bytes(tmg.Exact(), 12) - _kept_bytes(tmg.Exact(), 4)) / 8
    snapshot = sum(p.numel() for p in _mlp().parameters()) * 8
    assert per_step_exact > 5 * snapshot  # Exact keeps a graph per step
    assert per_step_truncated <= 0.05 * per_step_exact  # flat: the window's graphs only


def test_truncated_loss_mode_meta_gradient_still_right_and_earlier_params_refused():
    net = _mlp()
    theta = list(net.parameters())
    x, y = _data(1)
    opt = tmg.MetaSGD(net, lr=0.1, rule=tmg.Truncated(2))
    opt.step(F.mse_loss(net(x), y))
    early = [p for p in net.parameters()]
    for _ in range(3):
        opt.step(F.mse_loss(net(x), y))
    xq, yq = _data(2)
    got = torch.autograd.grad(F.mse_loss(net(xq), yq), theta, retain_graph=True)
    ref_net = _mlp()
    params = dict(ref_net.named_parameters())

    def loss(p, batch):
        return F.mse_loss(torch.func.functional_call(ref_net, p, (batch[0],)), batch[1])

    adapted = tmg.adapt(loss, params, (x, y), steps=4, lr=0.1, rule=tmg.Truncated(2))
    want = torch.autograd.grad(loss(adapted, (xq, yq)), list(params.values()))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)
    outer_early = sum((p**2).sum() for p in early)
    with pytest.raises(RuntimeError, match=r"earlier inner step.*step\(closure\)"):
        torch.autograd.grad(outer_early, theta)


@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("front_end", ["adapt", "module"])
def test_unrolled_checks_every_state_including_step_zero(steps, front_end):
    """A non-finite meta-gradient through the unrolled graph is reported, even at z_0."""
    net = _mlp()
    x, y = _data(1)

    class Poison(torch.autograd.Function):
        @staticmethod
        def forward(ctx, t):
            return t.clone()

        @staticmethod
        def backward(ctx, g):
            return g * math.inf

    if front_end == "adapt":
        params = dict(net.named_parameters())

        def loss(p, batch):
            return F.mse_loss(torch.func.functional_call(net, p, (batch[0],)), batch[1])

        adapted = tmg.adapt(loss, params, (x, y), steps=steps, lr=0.1, rule=tmg.Unrolled())
        theta = list(params.values())
        outer = F.mse_loss(torch.func.functional_call(net, adapted, (x,)), y)
    else:
        opt = tmg.MetaSGD(net, lr=0.1, rule=tmg.Unrolled())
        theta = list(net.parameters())
        for _ in range(steps):
            opt.step(F.mse_loss(net(x), y))
        outer = F.mse_loss(net(x), y)
    with pytest.raises(tmg.NonFiniteError, match="inner step"):
        torch.autograd.grad(Poison.apply(outer), theta)


def test_flow_refuses_save_every_larger_than_T():
    params = {"u": torch.ones(3, dtype=F64, requires_grad=True)}
    with pytest.raises(ValueError, match=r"save_every=0\.5 is larger than T=0\.2"):
        tmg.flow(lambda p, b: (p["u"] ** 2).sum(), params, T=0.2, save_every=0.5)


@pytest.mark.parametrize("factor", [6.0, 1.3, 0.75])
def test_adjoint_decorator_refuses_states_that_do_not_match_T(factor):
    """Dynamics integrating over factor * T: silently 6x / 21-39% off before; now refused."""
    A = torch.diag(torch.tensor([0.5, 1.0, 2.0], dtype=F64))

    def loss(p, batch):
        return 0.5 * p["u"] @ A @ p["u"]

    T, n = 1.0, 50
    h_true = factor * T / n

    @tmg.adjoint(loss, T=T)
    def dynamics(params, batch):
        u, states = params["u"].detach(), [params]
        for _ in range(n):
            u = u - h_true * (A @ u)
            states.append({"u": u})
        return states

    params = {"u": torch.ones(3, dtype=F64, requires_grad=True)}
    with pytest.raises(ValueError, match=r"do not match T=1"):
        dynamics(params)
