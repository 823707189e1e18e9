"""Bad input answered, not silently absorbed: each case of issue 10's list done here."""

from __future__ import annotations

import warnings

import pytest
import torch
import torchopt
from torch import nn
from torch.func import functional_call

import torchopt_metagrad as tmg
from torchopt_metagrad._core import engine
from torchopt_metagrad._core.stack import vmap_failed

D = torch.float64


def _problem():  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(2, 6), nn.ReLU(), nn.Linear(6, 1)).to(D)
    x, y = torch.randn(8, 2, dtype=D), torch.randn(8, 1, dtype=D)

    def loss(p, b):  # type: ignore[no-untyped-def]
        return ((functional_call(net, p, (b[0],)) - b[1]) ** 2).mean()

    return net, loss, x, y


@pytest.mark.parametrize("rule", [tmg.Exact(), tmg.Binomial(2), tmg.Truncated(1)], ids=str)
def test_a_batch_modified_in_place_before_the_backward_is_refused(rule):
    net, loss, x, y = _problem()
    params = dict(net.named_parameters())
    out = tmg.adapt(loss, params, (x, y), steps=3, lr=0.1, rule=rule)
    outer = loss(out, (x * 0.5, y))
    x.add_(1.0)  # the user reuses the buffer for the next task before backward
    with pytest.raises(RuntimeError, match=r"batch \(shape \(8, 2\)\) was modified in place"):
        outer.backward()


def test_module_step_with_a_loss_computed_under_no_grad_says_so():
    net, _, x, y = _problem()
    opt = tmg.MetaSGD(net, lr=0.1, rule=tmg.Exact())
    with torch.no_grad():
        value = ((net(x) - y) ** 2).mean()
        with pytest.raises(ValueError, match=r"under torch\.no_grad\(\)"):
            opt.step(value)


def test_adam_at_a_dead_unit_names_the_cause_and_eps_root():
    net, loss, x, y = _problem()
    with torch.no_grad():
        net[0].bias[:3] = -100.0  # three dead ReLU units: their weights get zero gradients
    params = dict(net.named_parameters())
    out = tmg.adapt(loss, params, (x, y), steps=3, rule=tmg.Exact(), optimizer=torchopt.adam(0.01))
    with pytest.raises(tmg.NonFiniteError, match="eps_root"):
        loss(out, (x, y)).backward()
    fixed = torchopt.adam(0.01, eps_root=1e-8)
    out = tmg.adapt(loss, params, (x, y), steps=3, rule=tmg.Exact(), optimizer=fixed)
    grads = torch.autograd.grad(loss(out, (x, y)), list(params.values()))
    assert all(bool(torch.isfinite(g).all()) for g in grads)


def test_each_different_vmap_fallback_is_reported_once():
    engine.reset_fallback_warnings()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        vmap_failed(RuntimeError("batching rule for op A is missing"))
        vmap_failed(RuntimeError("batching rule for op A is missing"))
        vmap_failed(RuntimeError("data-dependent control flow"))
    messages = [
        str(w.message) for w in caught if issubclass(w.category, tmg.VectorizationFallbackWarning)
    ]
    assert len(messages) == 2
    assert "op A" in messages[0] and "control flow" in messages[1]
    engine.reset_fallback_warnings()
