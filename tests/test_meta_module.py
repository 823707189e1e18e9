"""Meta-parameters through the module front end: a net with ``body`` and ``head``.

* ``tmg.MetaSGD(net.head, ...)`` (``step(loss)`` and ``step(closure)``) and
  ``tmg.innerloop_ctx(net, torch.optim.SGD(net.head.parameters(), ...))``: the body is
  not adapted but used by the inner loss, so it is a meta-parameter; the meta-gradient of
  EVERY parameter (head and body), summed over two tasks with torchopt's
  extract/recover-state pattern between them, equals ``torchopt.MetaSGD(net.head)``'s,
  ``higher``'s (when importable) and the brute-force oracle of ``tests/meta_oracles.py``
  (which also checks the non-exact rules);
* a learned lr on the module front end (``MetaSGD(net, lr=tensor or dict)``) and
  ``innerloop_ctx(..., override={'lr': [tensor]})`` (higher's convention) against the
  oracle / unrolled autograd.

All float64; relative tolerance 1e-10.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torchopt
from meta_oracles import (
    BODY,
    DTYPE,
    HEAD,
    MLP_NAMES,
    Data,
    MetaOracle,
    MetaProblem,
    init_mlp,
    make_data,
    mlp,
    mse,
    unrolled_reference,
)
from torch import Tensor, nn

import torchopt_metagrad as tmg

K = 3
LR = 0.1
RTOL = 1e-10
TASKS = 2

#: oracle name -> the module's parameter name
MODULE_NAME = {
    "body.weight": "body.0.weight",
    "body.bias": "body.0.bias",
    "head.weight": "head.weight",
    "head.bias": "head.bias",
}


class BodyHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(3, 5), nn.Tanh())
        self.head = nn.Linear(5, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))


def make_net() -> BodyHead:
    net = BodyHead().to(DTYPE)
    init = init_mlp()
    with torch.no_grad():
        params = dict(net.named_parameters())
        for n, m in MODULE_NAME.items():
            params[m].copy_(init[n])
    return net


@functools.cache
def task(t: int) -> Data:
    return make_data(K, per_step=True, seed=10 + t)


# ------------------------------------------------------------------------------ oracles
def frozen_body_problem(t: int, step_size=None, meta_lr: dict[str, Tensor] | None = None):
    """Task t with the head adapted and the body a meta-parameter (optionally a learned lr)."""
    data, init = task(t), init_mlp()
    meta = {n: init[n] for n in BODY} | (meta_lr or {})

    def full(phi, w):
        return {**phi, **{n: w[n] for n in BODY}}

    return MetaProblem(
        {n: init[n] for n in HEAD},
        meta,
        lambda phi, w, k: mse(mlp(full(phi, w), data.inner[k][0]), data.inner[k][1]),
        lambda phi, w: mse(mlp(full(phi, w), data.outer[0]), data.outer[1]),
        K,
        step_size or (lambda w, k, n: LR),
    )


def all_adapted_problem(t: int, step_size, meta_lr: dict[str, Tensor]) -> MetaProblem:
    data, init = task(t), init_mlp()
    return MetaProblem(
        init,
        meta_lr,
        lambda phi, w, k: mse(mlp(phi, data.inner[k][0]), data.inner[k][1]),
        lambda phi, w: mse(mlp(phi, data.outer[0]), data.outer[1]),
        K,
        step_size,
    )


def summed(per_task: list[dict[str, dict[str, Tensor]]]) -> dict[str, Tensor]:
    """Sum over tasks; one dict keyed by oracle names (theta and meta parts merged)."""
    out: dict[str, Tensor] = {}
    for G in per_task:
        for part in ("theta", "meta"):
            for n, g in G[part].items():
                out[n] = out[n] + g if n in out else g.clone()
    return out


@functools.cache
def frozen_body_oracle(t: int) -> MetaOracle:
    return MetaOracle(frozen_body_problem(t))


def frozen_body_expected(kind: str, order: int | None) -> dict[str, Tensor]:
    """Module names -> summed meta-gradients over the tasks."""
    G = summed([frozen_body_oracle(t).grads(kind, order) for t in range(TASKS)])
    return {MODULE_NAME[n]: g for n, g in G.items()}


# ------------------------------------------------------------------------------ runners
def grads_of(net: nn.Module) -> dict[str, Tensor | None]:
    return {n: p.grad for n, p in net.named_parameters()}


def close(got: dict[str, Tensor | None], expected: dict[str, Tensor], rtol: float = RTOL):
    assert set(got) >= set(expected), (set(got), set(expected))
    errors = {}
    for n, e in expected.items():
        g = got[n]
        if g is None:
            errors[n] = "no meta-gradient (.grad is None)"
            continue
        err = float((g - e).norm() / e.norm())
        if err > rtol:
            errors[n] = f"rel err {err:.2e}"
    assert not errors, errors


def step_arg(mode: str, loss: Callable[[], Tensor]) -> Any:
    return loss() if mode == "loss" else loss


def run_module_tasks(
    make_opt: Callable[[nn.Module], Any], mode: str = "loss", tasks: int = TASKS
) -> dict:
    """``tasks`` inner loops from the same initial weights, torchopt's extract/recover pattern."""
    net = make_net()
    opt = make_opt(net)
    net_state = torchopt.extract_state_dict(net, by="reference", detach_buffers=True)
    opt_state = torchopt.extract_state_dict(opt, by="reference")
    for t in range(tasks):
        data = task(t)
        for x, y in data.inner:
            opt.step(step_arg(mode, lambda x=x, y=y: mse(net(x), y)))
        mse(net(data.outer[0]), data.outer[1]).backward()
        torchopt.recover_state_dict(net, net_state)
        torchopt.recover_state_dict(opt, opt_state)
    assert all(p.is_leaf for p in net.parameters())
    return grads_of(net)


def run_ctx_tasks(ctx: Callable[[nn.Module, Any], Any], mode: str, make_opt=None) -> dict:
    net = make_net()
    make_opt = make_opt or (lambda net: torch.optim.SGD(net.head.parameters(), lr=LR))
    for t in range(TASKS):
        data = task(t)
        with ctx(net, make_opt(net)) as (fnet, diffopt):
            for x, y in data.inner:
                diffopt.step(step_arg(mode, lambda x=x, y=y, f=fnet: mse(f(x), y)))
            mse(fnet(data.outer[0]), data.outer[1]).backward()
    return grads_of(net)


def tmg_ctx(rule: tmg.AbstractRule, **kw: Any):
    return lambda net, opt: tmg.innerloop_ctx(net, opt, copy_initial_weights=False, rule=rule, **kw)


def higher_ctx(**kw: Any):
    higher = pytest.importorskip("higher")
    return lambda net, opt: higher.innerloop_ctx(net, opt, copy_initial_weights=False, **kw)


@functools.cache
def torchopt_head_only() -> dict[str, Tensor]:
    got = run_module_tasks(lambda net: torchopt.MetaSGD(net.head, lr=LR))
    return {n: g.clone() for n, g in got.items()}


EXACT_MODES = [
    pytest.param(tmg.Exact(), "loss", id="Exact-loss"),
    pytest.param(tmg.Exact(), "closure", id="Exact-closure"),
    pytest.param(tmg.Unrolled(), "loss", id="Unrolled-loss"),
    pytest.param(tmg.Unrolled(), "closure", id="Unrolled-closure"),
]


# ------------------------------------------------------------------------------ tests
def test_references_agree():
    """torchopt.MetaSGD(net.head) == the oracle's exact meta-gradients (head and body)."""
    close(torchopt_head_only(), frozen_body_expected("exact", None), rtol=1e-12)
    ref = summed([unrolled_reference(frozen_body_problem(t)) for t in range(TASKS)])
    close(torchopt_head_only(), {MODULE_NAME[n]: g for n, g in ref.items()}, rtol=1e-12)


@pytest.mark.parametrize(("rule", "mode"), EXACT_MODES)
def test_metasgd_on_head_equals_torchopt_for_every_parameter(rule, mode):
    got = run_module_tasks(lambda net: tmg.MetaSGD(net.head, lr=LR, rule=rule), mode)
    close(got, torchopt_head_only())


@pytest.mark.parametrize("mode", ["loss", "closure"])
@pytest.mark.parametrize(
    ("rule", "kind", "order"),
    [
        pytest.param(tmg.FirstOrder(), "first_order", None, id="FirstOrder"),
        pytest.param(tmg.Truncated(1), "truncated", 1, id="Truncated1"),
        pytest.param(tmg.Binomial(2), "binomial", 2, id="Binomial2"),
        pytest.param(tmg.Binomial(1, chunk_size=1), "binomial", 1, id="Binomial1-chunk1"),
        pytest.param(tmg.Exact(), "exact", None, id="Exact"),
    ],
)
def test_metasgd_on_head_matches_the_oracle_for_every_rule(rule, kind, order, mode):
    got = run_module_tasks(lambda net: tmg.MetaSGD(net.head, lr=LR, rule=rule), mode)
    close(got, frozen_body_expected(kind, order))


@pytest.mark.parametrize(("rule", "mode"), EXACT_MODES)
def test_innerloop_ctx_on_head_equals_torchopt_for_every_parameter(rule, mode):
    close(run_ctx_tasks(tmg_ctx(rule), mode), torchopt_head_only())


@pytest.mark.parametrize("mode", ["loss", "closure"])
@pytest.mark.parametrize(
    ("rule", "kind", "order"),
    [
        pytest.param(tmg.Binomial(1), "binomial", 1, id="Binomial1"),
        pytest.param(tmg.Truncated(2), "truncated", 2, id="Truncated2"),
    ],
)
def test_innerloop_ctx_on_head_matches_the_oracle(rule, kind, order, mode):
    close(run_ctx_tasks(tmg_ctx(rule), mode), frozen_body_expected(kind, order))


@pytest.mark.parametrize(("rule", "mode"), EXACT_MODES)
def test_innerloop_ctx_on_head_equals_higher(rule, mode):
    expected = run_ctx_tasks(higher_ctx(), "loss")
    close(expected, torchopt_head_only(), rtol=1e-12)
    close(run_ctx_tasks(tmg_ctx(rule), mode), expected)


# ---------------------------------------------------------------- learned lr (module)
LR_SCALAR = torch.tensor(0.15, dtype=DTYPE)


def _lr_dict(names) -> dict[str, Tensor]:
    gen = torch.Generator().manual_seed(3)
    init = init_mlp()
    out = {}
    for i, n in enumerate(names):  # full-shape and 0-dim entries, alternating
        out[n] = (
            0.05 + 0.15 * torch.rand(init[n].shape, generator=gen, dtype=DTYPE)
            if i % 2 == 0
            else torch.tensor(0.12, dtype=DTYPE)
        )
    return out


LR_DICT_ALL = _lr_dict(MLP_NAMES)
LR_DICT_HEAD = _lr_dict(HEAD)


def learned_lr_expected(
    kind: str, which: str, lr_form: str, order=None, tasks: int = TASKS
) -> dict[str, Tensor]:
    """Summed over tasks, keyed by module names and 'lr' / 'lr:<module name>'."""
    names = MLP_NAMES if which == "net" else HEAD
    if lr_form == "scalar":
        meta_lr = {"lr": LR_SCALAR}
        step_size = lambda w, k, n: w["lr"]  # noqa: E731
    else:
        src = LR_DICT_ALL if which == "net" else LR_DICT_HEAD
        meta_lr = {f"lr:{n}": src[n] for n in names}
        step_size = lambda w, k, n: w[f"lr:{n}"]  # noqa: E731
    make = all_adapted_problem if which == "net" else frozen_body_problem
    per_task = []
    for t in range(tasks):
        prob = make(t, step_size=step_size, meta_lr=meta_lr)
        per_task.append(
            unrolled_reference(prob) if kind == "unrolled" else MetaOracle(prob).grads(kind, order)
        )
    G = summed(per_task)
    out = {}
    for n, g in G.items():
        if n in MODULE_NAME:
            out[MODULE_NAME[n]] = g
        elif n.startswith("lr:"):
            out["lr:" + MODULE_NAME[n[3:]]] = g
        else:
            out[n] = g
    return out


def learned_lr(which: str, lr_form: str) -> tuple[Any, dict[str, Tensor]]:
    """(the lr argument, label -> tensor whose .grad is checked)."""
    if lr_form == "scalar":
        lr = LR_SCALAR.clone().requires_grad_(True)
        return lr, {"lr": lr}
    src = LR_DICT_ALL if which == "net" else LR_DICT_HEAD
    # keyed by the names of the module given to MetaSGD
    prefix = "" if which == "net" else "head."
    lr = {MODULE_NAME[n][len(prefix) :]: src[n].clone().requires_grad_(True) for n in src}
    return lr, {"lr:" + prefix + k: t for k, t in lr.items()}


@pytest.mark.parametrize("mode", ["loss", "closure"])
@pytest.mark.parametrize(
    ("rule", "kind", "order"),
    [
        pytest.param(tmg.Exact(), "exact", None, id="Exact"),
        pytest.param(tmg.Unrolled(), "exact", None, id="Unrolled"),
        pytest.param(tmg.Binomial(1), "binomial", 1, id="Binomial1"),
    ],
)
@pytest.mark.parametrize("lr_form", ["scalar", "dict"])
@pytest.mark.parametrize("which", ["net", "head"])
def test_metasgd_learned_lr_matches_the_oracle(which, lr_form, rule, kind, order, mode):
    lr, lr_targets = learned_lr(which, lr_form)
    got = run_module_tasks(
        lambda net: tmg.MetaSGD(net if which == "net" else net.head, lr=lr, rule=rule), mode
    )
    got |= {label: t.grad for label, t in lr_targets.items()}
    close(got, learned_lr_expected(kind, which, lr_form, order))
    if kind == "exact":
        close(got, learned_lr_expected("unrolled", which, lr_form))


@pytest.mark.parametrize("rule", [tmg.Exact(), tmg.Unrolled(), tmg.Binomial(1)], ids=repr)
def test_metasgd_nonleaf_lr_gets_the_chain_ruled_gradient(rule):
    """One task: the graph of ``log_lr.exp()`` is used by one outer backward."""
    log_lr = LR_SCALAR.log().requires_grad_(True)
    lr = log_lr.exp()
    got = run_module_tasks(lambda net: tmg.MetaSGD(net.head, lr=lr, rule=rule), "closure", 1)
    kind, order = ("binomial", 1) if isinstance(rule, tmg.Binomial) else ("exact", None)
    expected = learned_lr_expected(kind, "head", "scalar", order, tasks=1)
    close(got, {n: e for n, e in expected.items() if n != "lr"})
    close({"log_lr": log_lr.grad}, {"log_lr": expected["lr"] * LR_SCALAR})


def _override_expected() -> dict[str, Tensor]:
    return learned_lr_expected("exact", "head", "scalar")


@pytest.mark.parametrize("mode", ["loss", "closure"])
def test_innerloop_ctx_override_lr_in_highers_convention(mode):
    lr = LR_SCALAR.clone().requires_grad_(True)
    got = run_ctx_tasks(tmg_ctx(tmg.Exact(), override={"lr": [lr]}), mode)
    close(got | {"lr": lr.grad}, _override_expected())


def test_higher_override_lr_matches_the_oracle():
    """The convention the test above follows, checked on higher itself."""
    lr = LR_SCALAR.clone().requires_grad_(True)
    got = run_ctx_tasks(higher_ctx(override={"lr": [lr]}), "loss")
    close(got | {"lr": lr.grad}, _override_expected())
