"""``torch.optim`` optimizers as inner optimizers: the same updates as ``torch.optim``.

Each supported optimizer's inner loop (through ``tmg.adapt(optimizer=...)``) must reach
the parameters ``torch.optim`` reaches step for step on the same losses (float64, 1e-10),
and its meta-gradient under ``Exact`` must equal ``Unrolled``'s. Param groups with
different settings run each group's update. Unsupported optimizers and an optimizer that
has already taken steps are refused by name. (Against ``higher``: test_higher_compat.py.)
"""

from __future__ import annotations

import pytest
import torch
import torchopt
from torch import nn
from torch.func import functional_call

import torchopt_metagrad as tmg

D = torch.float64
K = 4
OPTIMIZERS = {
    "SGD momentum nesterov wd": lambda p: torch.optim.SGD(
        p, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3
    ),
    "SGD momentum dampening": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, dampening=0.3),
    "Adam": lambda p: torch.optim.Adam(p, lr=0.01, weight_decay=1e-3),
    "Adam amsgrad maximize": lambda p: torch.optim.Adam(p, lr=0.01, amsgrad=True, maximize=True),
    "AdamW": lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.1),
    "Adagrad": lambda p: torch.optim.Adagrad(p, lr=0.05, lr_decay=0.01, weight_decay=1e-3),
    "Adadelta": lambda p: torch.optim.Adadelta(p, lr=0.5, weight_decay=1e-3),
    "Adamax": lambda p: torch.optim.Adamax(p, lr=0.01, weight_decay=1e-3),
    "ASGD": lambda p: torch.optim.ASGD(p, lr=0.05, lambd=0.1, weight_decay=1e-3),
    "RMSprop": lambda p: torch.optim.RMSprop(p, lr=0.01, momentum=0.5, weight_decay=1e-3),
    "RMSprop centered": lambda p: torch.optim.RMSprop(p, lr=0.01, centered=True),
    "Rprop": lambda p: torch.optim.Rprop(p, lr=0.01),
    "SGD maximize": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.5, maximize=True),
}


#: torch.optim.ASGD keeps its step size eta as a float32 tensor (torch.as_tensor of a Python
#: float); higher and the plugin use float64 (equal to higher's: test_higher_compat.py)
RTOL = {"ASGD": 1e-7}


def _problem():  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(2, 6), nn.Tanh(), nn.Linear(6, 1)).to(D)
    x, y = torch.randn(12, 2, dtype=D), torch.randn(12, 1, dtype=D)

    def loss(p, b):  # type: ignore[no-untyped-def]
        return ((functional_call(net, p, (b[0],)) - b[1]) ** 2).mean()

    return net, loss, (x, y)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_inner_steps_match_torch_optim(name):
    net, loss, batch = _problem()
    params = dict(net.named_parameters())
    copies = [p.detach().clone().requires_grad_() for p in params.values()]
    reference = OPTIMIZERS[name](copies)
    for _ in range(K):
        reference.zero_grad()
        loss(dict(zip(params, copies, strict=True)), batch).backward()
        reference.step()
    opt = OPTIMIZERS[name](list(params.values()))
    out = tmg.adapt(loss, params, batch, steps=K, rule=tmg.Exact(), optimizer=opt)
    for got, want in zip(out.values(), copies, strict=True):
        torch.testing.assert_close(got, want.detach(), rtol=RTOL.get(name, 1e-10), atol=1e-12)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_exact_equals_unrolled_through_each_optimizer(name):
    net, loss, batch = _problem()
    params = dict(net.named_parameters())
    grads = {}
    for rule in (tmg.Exact(), tmg.Unrolled()):
        opt = OPTIMIZERS[name](list(params.values()))
        out = tmg.adapt(loss, params, batch, steps=K, rule=rule, optimizer=opt)
        grads[str(rule)] = torch.autograd.grad(
            loss(out, (batch[0] * 0.5, batch[1])), list(params.values())
        )
    for a, b in zip(*grads.values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_unsupported_optimizers_and_settings_are_refused_by_name():
    net, loss, batch = _problem()
    params = dict(net.named_parameters())
    leaves = list(params.values())

    def run(opt):  # type: ignore[no-untyped-def]
        return tmg.adapt(loss, params, batch, steps=2, rule=tmg.Exact(), optimizer=opt)

    with pytest.raises(TypeError, match=r"torch\.optim\.LBFGS has no differentiable equivalent"):
        run(torch.optim.LBFGS(leaves))
    stepped = torch.optim.SGD(leaves, lr=0.1, momentum=0.9)
    loss(params, batch).backward()
    stepped.step()
    with pytest.raises(ValueError, match="SGD has already taken steps"):
        run(stepped)
    two = torch.optim.SGD([{"params": leaves[:2], "lr": 0.1}, {"params": leaves[2:], "lr": 0.2}])
    out = run(two)  # different settings: placed by name
    assert set(out) == set(params)
    same = torch.optim.SGD([{"params": leaves[:2]}, {"params": leaves[2:]}], lr=0.1)
    assert set(run(same)) == set(params)


def test_param_groups_with_different_settings_match_torch_optim():
    net, loss, batch = _problem()
    params = dict(net.named_parameters())
    leaves = list(params.values())
    copies = [p.detach().clone().requires_grad_() for p in leaves]

    def make(ps):  # type: ignore[no-untyped-def]
        return torch.optim.Adam(
            [{"params": ps[:2], "lr": 0.02, "weight_decay": 0.1}, {"params": ps[2:]}], lr=0.01
        )

    reference = make(copies)
    for _ in range(K):
        reference.zero_grad()
        loss(dict(zip(params, copies, strict=True)), batch).backward()
        reference.step()
    out = tmg.adapt(loss, params, batch, steps=K, rule=tmg.Exact(), optimizer=make(leaves))
    for got, want in zip(out.values(), copies, strict=True):
        torch.testing.assert_close(got, want.detach(), rtol=1e-10, atol=1e-12)


def test_an_update_that_is_not_a_pure_function_is_refused():
    """torchopt.sgd with momentum and dampening keeps a first-step flag in a closure: a
    replayed step would differ from the forward, so the meta-gradient would be wrong."""
    net, loss, batch = _problem()
    params = dict(net.named_parameters())
    with pytest.raises(ValueError, match="not a function of"):
        tmg.adapt(
            loss,
            params,
            batch,
            steps=2,
            rule=tmg.Exact(),
            optimizer=torchopt.sgd(0.05, momentum=0.5, dampening=0.3),
        )
    # torch.optim.SGD's dampening runs as a pure transform (the step count in its state)
    out = tmg.adapt(
        loss,
        params,
        batch,
        steps=2,
        rule=tmg.Exact(),
        optimizer=torch.optim.SGD(list(params.values()), lr=0.05, momentum=0.5, dampening=0.3),
    )
    assert set(out) == set(params)
    with pytest.raises(ValueError, match="dampening with a learning-rate schedule"):
        tmg.MetaSGD(net, lr=lambda count: 0.05, momentum=0.5, dampening=0.3, rule=tmg.Exact())
