"""``Exact(keep_graphs=m)``: the last ``m`` steps keep their gradient's graph from the forward.

The meta-gradient must equal ``Exact()`` and ``Unrolled()`` to round-off for every ``m``
(randomness and buffers in the loss, optimizers with state, meta-parameters of every kind,
per-step batches); the backward evaluates the inner loss ``K - m`` times instead of ``K``
(counted); peak memory grows by about one step graph per kept step (live-tensor tracker);
where it cannot apply it says so.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call

import torchopt_metagrad as tmg
from tests.test_checkpoints import CASES, K, _grads, _problem, _rel, loss_calls
from torchopt_metagrad.diagnostics import LiveMemoryTracker

D = torch.float64


@pytest.mark.filterwarnings("ignore::torchopt_metagrad.VectorizationFallbackWarning")
@pytest.mark.parametrize("keep", [1, 2, K - 1, K, K + 5])
@pytest.mark.parametrize("case", list(CASES))
def test_kept_graphs_equal_exact_and_unrolled(case, keep):
    kw = CASES[case]
    ref = _grads(tmg.Exact(), **kw)
    assert _rel(_grads(tmg.Exact(keep_graphs=keep), **kw), ref) < 1e-13
    assert _rel(_grads(tmg.Unrolled(), **kw), ref) < 1e-12


@pytest.mark.parametrize("keep", [0, 3, K])
def test_fixed_params_reach_their_meta_gradient_through_kept_graphs(keep):
    """``adapt=`` a subset: the fixed tensors enter the kept graphs through leaf copies."""
    net, x, y = _problem()
    params = dict(net.named_parameters())
    adapted = ["2.weight", "2.bias"]  # the head; the body is fixed and gets a meta-gradient

    def loss(p, b):  # type: ignore[no-untyped-def]
        return ((functional_call(net, p, (b[0],)) - b[1]) ** 2).mean()

    def grads(rule):  # type: ignore[no-untyped-def]
        out = tmg.adapt(loss, params, (x, y), steps=K, lr=0.3, rule=rule, adapt=adapted)
        return torch.autograd.grad(loss(out, (x * 0.5, y)), list(params.values()))

    ref = grads(tmg.Unrolled())
    assert all(float(g.abs().sum()) > 0 for g in ref)  # every tensor has a meta-gradient
    assert _rel(grads(tmg.Exact(keep_graphs=keep)), ref) < 1e-12


@pytest.mark.parametrize("keep", [0, 1, 4, K])
def test_the_backward_rebuilds_only_the_steps_not_kept(keep):
    """Loss evaluations: K in the forward, and one per step not kept in the backward."""
    assert loss_calls(tmg.Exact(keep_graphs=keep)) == (K, K - keep)


def test_peak_memory_grows_by_a_step_graph_per_kept_step():
    """K = 40 steps of a wide MLP on a large batch (a step's graph >> a snapshot): the peak
    grows about linearly in m, from Exact's (m = 0) towards Unrolled's (m = K)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 256), nn.Tanh(), nn.Linear(256, 1))
    params = dict(net.named_parameters())
    x, y = torch.randn(512, 16), torch.randn(512, 1)

    def loss(p, b):  # type: ignore[no-untyped-def]
        return ((functional_call(net, p, (b[0],)) - b[1]) ** 2).mean()

    def peak(rule) -> float:  # type: ignore[no-untyped-def]
        with LiveMemoryTracker() as mem:
            out = tmg.adapt(loss, params, (x, y), steps=40, lr=1e-3, rule=rule)
            torch.autograd.grad(loss(out, (x, y)), list(params.values()))
        return float(mem.peak_bytes)

    peaks = {m: peak(tmg.Exact(keep_graphs=m)) for m in (0, 10, 20, 40)}
    unrolled = peak(tmg.Unrolled())
    per_step = (peaks[40] - peaks[0]) / 40
    assert per_step > 0.5 * (unrolled - peaks[0]) / 40  # a step graph each, roughly
    for m in (10, 20):  # linear in m within 20% of the full range
        assert abs(peaks[m] - (peaks[0] + m * per_step)) < 0.2 * (peaks[40] - peaks[0])
    assert peaks[0] < 0.5 * unrolled and peaks[40] < 1.5 * unrolled


def test_bad_keep_graphs_and_where_it_cannot_apply():
    with pytest.raises(ValueError, match="keep_graphs must be >= 0"):
        tmg.Exact(keep_graphs=-1)
    with pytest.raises(TypeError, match="keep_graphs must be an int"):
        tmg.Exact(keep_graphs=2.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="go opposite ways"):
        tmg.Exact(snapshots=3, keep_graphs=2)
    net, x, y = _problem()
    opt = tmg.MetaSGD(net, lr=0.1, rule=tmg.Exact(keep_graphs=2))
    with pytest.raises(ValueError, match=r"keep_graphs.*use tmg\.adapt"):
        opt.step(((net(x) - y) ** 2).mean())


def test_second_derivatives_are_still_refused():
    net, x, y = _problem()
    params = dict(net.named_parameters())

    def loss(p, b):  # type: ignore[no-untyped-def]
        return ((functional_call(net, p, (b[0],)) - b[1]) ** 2).mean()

    out = tmg.adapt(loss, params, (x, y), steps=3, lr=0.05, rule=tmg.Exact(keep_graphs=2))
    outer = loss(out, (x, y))
    with pytest.raises(RuntimeError, match="Unrolled"):
        (g,) = torch.autograd.grad(outer, [params["0.weight"]], create_graph=True)
        g.sum().backward()


def test_kept_graphs_live_as_long_as_autograd_keeps_the_node():
    """``retain_graph=True``: a second backward gives the same meta-gradient; without it,
    the kept graphs are freed with the node's saved tensors and a second backward raises
    autograd's own error (never a wrong number)."""
    net, x, y = _problem()
    params = dict(net.named_parameters())

    def loss(p, b):  # type: ignore[no-untyped-def]
        return ((functional_call(net, p, (b[0],)) - b[1]) ** 2).mean()

    out = tmg.adapt(loss, params, (x, y), steps=4, lr=0.05, rule=tmg.Exact(keep_graphs=2))
    outer = loss(out, (x * 0.5, y))
    first = torch.autograd.grad(outer, list(params.values()), retain_graph=True)
    second = torch.autograd.grad(outer, list(params.values()), retain_graph=False)
    assert _rel(list(second), list(first)) == 0.0
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        torch.autograd.grad(outer, list(params.values()))


def test_numpy_integer_and_a_batch_modified_in_place():
    """A numpy ``m`` works as an int; a batch changed in place before the backward gets the
    library's message (as with ``Exact()``), not autograd's version-counter error."""
    import numpy as np

    net, x, y = _problem()
    params = dict(net.named_parameters())

    def loss(p, b):  # type: ignore[no-untyped-def]
        return ((functional_call(net, p, (b[0],)) - b[1]) ** 2).mean()

    rule = tmg.Exact(keep_graphs=np.int64(2))
    assert type(rule.keep_graphs) is int
    got = torch.autograd.grad(
        loss(tmg.adapt(loss, params, (x, y), steps=4, lr=0.05, rule=rule), (x * 0.5, y)),
        list(params.values()),
    )
    ref = _grads_at(loss, params, (x, y), tmg.Unrolled())
    assert _rel(list(got), ref) < 1e-12
    x = x.clone()
    out = tmg.adapt(loss, params, (x, y), steps=3, lr=0.05, rule=tmg.Exact(keep_graphs=1))
    x.mul_(2.0)
    with pytest.raises(RuntimeError, match="modified in place after the inner loop ran"):
        torch.autograd.grad(loss(out, (x.clone(), y)), list(params.values()))


def _grads_at(loss, params, batch, rule):  # type: ignore[no-untyped-def]
    out = tmg.adapt(loss, params, batch, steps=4, lr=0.05, rule=rule)
    return list(torch.autograd.grad(loss(out, (batch[0] * 0.5, batch[1])), list(params.values())))
