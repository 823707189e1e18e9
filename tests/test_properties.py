"""Property-based tests (hypothesis) on random small problems: random widths, activations,
batch sizes, step counts, step sizes and orders.

* every step rule returns a finite meta-gradient shaped like each parameter (and like a
  learned step size);
* the rules that are exact agree with each other (Exact, Unrolled, Binomial(K),
  Truncated(K), Exact with two snapshots), for the network and a learned lr;
* order 0 is first order for both truncated families;
* the module front end (``tmg.MetaSGD(...).step(loss)``) equals the functional one.

Examples are derandomized (the same ones on every run), so CI never flakes.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn
from torch.func import functional_call

import torchopt_metagrad as tmg

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

DT = torch.float64
SETTINGS = settings(max_examples=25, deadline=None, derandomize=True)
ACTIVATIONS = {"tanh": nn.Tanh, "softplus": nn.Softplus, "sigmoid": nn.Sigmoid}


@st.composite
def problems(draw: Any) -> dict[str, Any]:
    return {
        "n_in": draw(st.integers(1, 4)),
        "hidden": draw(st.integers(1, 6)),
        "n_out": draw(st.integers(1, 3)),
        "act": draw(st.sampled_from(sorted(ACTIVATIONS))),
        "batch": draw(st.integers(1, 5)),
        "steps": draw(st.integers(1, 4)),
        "lr": draw(st.floats(1e-3, 0.2)),
        "seed": draw(st.integers(0, 2**16)),
    }


def build(p: dict[str, Any]) -> tuple[nn.Module, Any, list[Any], Any]:
    """A seeded MLP, its loss, one batch per inner step, a query batch."""
    torch.manual_seed(p["seed"])
    net = nn.Sequential(
        nn.Linear(p["n_in"], p["hidden"]),
        ACTIVATIONS[p["act"]](),
        nn.Linear(p["hidden"], p["n_out"]),
    ).to(DT)
    gen = torch.Generator().manual_seed(p["seed"] + 1)

    def data() -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(p["batch"], p["n_in"], generator=gen, dtype=DT)
        return x, torch.randn(p["batch"], p["n_out"], generator=gen, dtype=DT)

    def loss_fn(params: dict[str, torch.Tensor], batch: Any) -> torch.Tensor:
        x, y = batch
        return ((functional_call(net, params, (x,)) - y) ** 2).mean()

    return net, loss_fn, [data() for _ in range(p["steps"])], data()


def meta_grads(p: dict[str, Any], rule: tmg.AbstractRule, learn_lr: bool = False):
    net, loss_fn, batches, query = build(p)
    params = dict(net.named_parameters())
    lr: Any = p["lr"]
    if learn_lr:
        lr = torch.tensor(p["lr"], dtype=DT, requires_grad=True)
    adapted = tmg.adapt(loss_fn, params, batches=batches, steps=p["steps"], lr=lr, rule=rule)
    wrt = [*params.values(), *([lr] if learn_lr else [])]
    return torch.autograd.grad(loss_fn(adapted, query), wrt, allow_unused=True)


def step_rules(K: int) -> list[tmg.AbstractRule]:
    orders = sorted({0, 1, K - 1, K} & set(range(K + 1)))
    return [
        tmg.FirstOrder(),
        tmg.Exact(),
        tmg.Unrolled(),
        *[tmg.Truncated(L) for L in orders],
        *[tmg.Binomial(L, check=False) for L in orders],
    ]


def close(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-9) -> None:
    torch.testing.assert_close(a, b, rtol=0, atol=rtol * max(float(b.abs().max()), 1e-12))


@SETTINGS
@given(problems(), st.booleans())
def test_every_step_rule_is_finite_and_shaped(p, learn_lr):
    net, *_ = build(p)
    shapes = [t.shape for t in net.parameters()] + ([torch.Size([])] if learn_lr else [])
    for rule in step_rules(p["steps"]):
        grads = meta_grads(p, rule, learn_lr)
        assert [g.shape for g in grads] == shapes, rule
        assert all(bool(torch.isfinite(g).all()) for g in grads), rule


@SETTINGS
@given(problems(), st.booleans())
def test_exact_rules_agree(p, learn_lr):
    K = p["steps"]
    exact = meta_grads(p, tmg.Exact(), learn_lr)
    others = [tmg.Unrolled(), tmg.Binomial(K, check=False), tmg.Truncated(K)]
    if K >= 3:
        others.append(tmg.Exact(snapshots=2))
    for rule in others:
        for g, e in zip(meta_grads(p, rule, learn_lr), exact, strict=True):
            close(g, e)


@SETTINGS
@given(problems())
def test_order_zero_is_first_order(p):
    first = meta_grads(p, tmg.FirstOrder())
    for rule in (tmg.Truncated(0), tmg.Binomial(0, check=False)):
        for g, e in zip(meta_grads(p, rule), first, strict=True):
            close(g, e)


@SETTINGS
@given(problems(), st.integers(0, 4))
def test_module_front_end_equals_functional(p, pick):
    rule = step_rules(p["steps"])[pick % len(step_rules(p["steps"]))]
    functional = meta_grads(p, rule)
    net, _, batches, query = build(p)
    theta = list(net.parameters())  # the optimizer swaps the module's tensors as it steps
    opt = tmg.MetaSGD(net, lr=p["lr"], rule=rule)
    for x, y in batches:
        opt.step(((net(x) - y) ** 2).mean())
    x, y = query
    module = torch.autograd.grad(((net(x) - y) ** 2).mean(), theta)
    for g, e in zip(module, functional, strict=True):
        close(g, e)
