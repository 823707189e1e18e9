"""``tmg.innerloop_ctx`` against ``higher`` 0.2.1 itself (float64).

* every ``torch.optim`` optimizer ``higher`` supports: the same trajectory
  (``fmodel.parameters(time=t)``) and the same meta-gradient under ``Exact``, on the model
  (``copy_initial_weights=False``) and on the copied initial weights (the default);
* param groups with different settings, and ``override`` with one learned lr per group;
* ``track_higher_grads=False`` (``higher``'s test mode), ``params=``, ``time=``, ``device``;
* ``higher``'s ``examples/maml-omniglot.py`` loop rebuilt on Omniglot-shaped synthetic
  data (a tiny conv net), the context line changed: ``Exact`` equals ``higher``'s
  meta-gradient, every rule trains, ``test()`` equals ``higher``'s;
* issue 10's module-front-end inputs: a loss that uses the model's own parameters, and a
  task started without restoring the module.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
import torchopt
from torch import Tensor, nn

import torchopt_metagrad as tmg

higher = pytest.importorskip("higher")
D = torch.float64
K = 3


def close(a: Tensor, b: Tensor, rtol: float = 1e-10) -> None:
    a, b = a.detach(), b.detach()
    torch.testing.assert_close(a, b, rtol=0, atol=rtol * float(b.abs().max()))


def _mlp() -> tuple[nn.Module, Tensor, Tensor]:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2)).to(D)
    return net, torch.randn(6, 3, dtype=D), torch.randn(6, 2, dtype=D)


def _run(ctx: Callable[..., Any], make_opt: Callable[[nn.Module], Any], **kw: Any) -> Any:
    """K inner steps, the outer loss's backward; (trajectory, model grads, time-0 grads)."""
    net, x, y = _mlp()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # higher's RMSprop/Rprop notes
        with ctx(net, make_opt(net), **kw) as (fnet, diffopt):
            for _ in range(K):
                diffopt.step(F.mse_loss(fnet(x), y))
            F.mse_loss(fnet(x * 0.5), y).backward()
            traj = [[p.detach() for p in fnet.parameters(time=t)] for t in range(K + 1)]
            initial = list(fnet.parameters(time=0))
    grads = [p.grad for p in net.parameters()]
    first = [p.grad if p.is_leaf else None for p in initial]
    return traj, grads, first


def _same(got: list[Any], want: list[Any], rtol: float = 1e-10) -> None:
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            close(a, b, rtol)


def _flat(got: list[Tensor], want: list[Tensor], rtol: float) -> None:
    """Relative to the whole vector (the conv bias before batch norm gets ~1e-16 entries)."""
    close(torch.cat([t.reshape(-1) for t in got]), torch.cat([t.reshape(-1) for t in want]), rtol)


OPTIMIZERS = {
    "SGD": lambda n: torch.optim.SGD(n.parameters(), lr=0.1),
    "SGD momentum dampening wd": lambda n: torch.optim.SGD(
        n.parameters(), lr=0.1, momentum=0.9, dampening=0.3, weight_decay=0.01
    ),
    "SGD nesterov": lambda n: torch.optim.SGD(n.parameters(), lr=0.1, momentum=0.9, nesterov=True),
    # eps=0: higher adds eps before the bias correction of the second moment
    "Adam eps=0": lambda n: torch.optim.Adam(n.parameters(), lr=0.05, eps=0.0),
    "Adam amsgrad wd eps=0": lambda n: torch.optim.Adam(
        n.parameters(), lr=0.05, eps=0.0, amsgrad=True, weight_decay=0.1
    ),
    # lr a float32 number: higher's Adagrad computes lr / (1 + ...) with the float32 step
    "Adagrad": lambda n: torch.optim.Adagrad(n.parameters(), lr=0.125, weight_decay=0.01),
    "Adadelta": lambda n: torch.optim.Adadelta(n.parameters(), lr=1.0, weight_decay=0.01),
    "Adamax": lambda n: torch.optim.Adamax(n.parameters(), lr=0.05, weight_decay=0.01),
    "ASGD": lambda n: torch.optim.ASGD(n.parameters(), lr=0.1, lambd=0.1, weight_decay=0.01),
    "RMSprop momentum centered": lambda n: torch.optim.RMSprop(
        n.parameters(), lr=0.01, momentum=0.5, centered=True, weight_decay=0.01
    ),
    "Rprop": lambda n: torch.optim.Rprop(n.parameters(), lr=0.01),
}


@pytest.mark.parametrize("copy", [False, True], ids=["copy=False", "copy=True"])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_each_optimizer_equals_highers_trajectory_and_meta_gradient(name, copy):
    want = _run(higher.innerloop_ctx, OPTIMIZERS[name], copy_initial_weights=copy)
    got = _run(tmg.innerloop_ctx, OPTIMIZERS[name], copy_initial_weights=copy, rule=tmg.Exact())
    for a, b in zip(got[0], want[0], strict=True):
        _same(a, b)
    _same(got[1], want[1])  # on the model: only with copy_initial_weights=False
    _same(got[2], want[2])  # on the copied initial weights: only with the default
    if not copy:
        assert all(g is not None for g in got[1])
    else:
        assert all(g is None for g in got[1]) and all(g is not None for g in got[2])


def test_default_rule_is_unrolled_and_equals_higher():
    make = OPTIMIZERS["SGD momentum dampening wd"]
    _same(_run(tmg.innerloop_ctx, make)[2], _run(higher.innerloop_ctx, make)[2])


def _groups(kind: type) -> Callable[[nn.Module], Any]:
    def make(net: nn.Module) -> Any:
        first, last = net[0], net[2]
        if kind is torch.optim.SGD:
            return torch.optim.SGD(
                [
                    {"params": first.parameters(), "lr": 0.05, "momentum": 0.9},
                    {"params": last.parameters()},
                ],
                lr=0.2,
            )
        return kind(
            [
                {"params": first.parameters(), "lr": 0.02, "weight_decay": 0.1},
                {"params": last.parameters()},
            ],
            lr=0.05,
            eps=0.0,
        )

    return make


@pytest.mark.parametrize("kind", [torch.optim.SGD, torch.optim.Adam])
def test_param_groups_with_different_settings_equal_higher(kind):
    want = _run(higher.innerloop_ctx, _groups(kind), copy_initial_weights=False)
    got = _run(tmg.innerloop_ctx, _groups(kind), copy_initial_weights=False, rule=tmg.Exact())
    _same(got[0][-1], want[0][-1])
    _same(got[1], want[1])


@pytest.mark.parametrize("mode", ["loss", "closure"])
def test_override_one_learned_lr_per_group_equals_higher(mode):
    grads = {}
    for who in ("higher", "tmg"):
        net, x, y = _mlp()
        lrs = [
            torch.tensor(0.1, dtype=D, requires_grad=True),
            torch.tensor(0.3, dtype=D, requires_grad=True),
        ]
        opt = torch.optim.SGD(
            [{"params": net[0].parameters()}, {"params": net[2].parameters()}], lr=1.0
        )
        kw: dict[str, Any] = {"copy_initial_weights": False, "override": {"lr": lrs}}
        ctx = (
            higher.innerloop_ctx(net, opt, **kw)
            if who == "higher"
            else tmg.innerloop_ctx(net, opt, rule=tmg.Exact(), **kw)
        )
        with ctx as (fnet, diffopt):
            for _ in range(K):
                if mode == "closure" and who == "tmg":
                    diffopt.step(lambda x=x, y=y, f=fnet: F.mse_loss(f(x), y))
                else:
                    diffopt.step(F.mse_loss(fnet(x), y))
            F.mse_loss(fnet(x * 0.5), y).backward()
        grads[who] = [p.grad for p in net.parameters()] + [t.grad for t in lrs]
    _same(grads["tmg"], grads["higher"])


def test_track_higher_grads_false_is_highers_test_mode():
    results = {}
    for who, ctx in (("higher", higher.innerloop_ctx), ("tmg", tmg.innerloop_ctx)):
        net, x, y = _mlp()
        opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.5)
        with ctx(net, opt, track_higher_grads=False) as (fnet, diffopt):
            for _ in range(K):
                diffopt.step(F.mse_loss(fnet(x), y))
            F.mse_loss(fnet(x * 0.5), y).backward()
            fast = list(fnet.parameters())
            assert next(iter(fnet.parameters(time=0))) is fast[0]  # only the latest is kept
            with pytest.raises(ValueError, match="not tracking higher"):
                fnet.parameters(time=1)
        assert all(p.grad is None for p in net.parameters())
        assert all(t.is_leaf and t.grad_fn is None for t in fast)
        results[who] = [t.detach() for t in fast] + [t.grad for t in fast]
    _same(results["tmg"], results["higher"])


def test_params_keyword_time_and_device():
    net, x, y = _mlp()
    with tmg.innerloop_ctx(net, 0.1, device="cpu", rule=tmg.Exact()) as (fnet, diffopt):
        new = diffopt.step(F.mse_loss(fnet(x), y))
        assert [t is u for t, u in zip(new, fnet.parameters(), strict=True)] == [True] * 4
        assert fnet.fast_params[0] is new[0]
        assert fnet.init_fast_params[0] is next(iter(fnet.parameters(time=0)))
        close(fnet(x, params=fnet.parameters(time=0)), net(x))  # evaluate the initial weights
        with pytest.raises(ValueError, match="params has 2 tensors"):
            fnet(x, params=new[:2])
        with pytest.raises(RuntimeError, match="called with params= other than"):
            diffopt.step(F.mse_loss(fnet(x), y))  # higher would continue from time=0
    with tmg.innerloop_ctx(net, 0.1, rule=tmg.Exact()) as (fnet, diffopt):
        with pytest.raises(ValueError, match="grad_callback is not supported"):
            diffopt.step(F.mse_loss(fnet(x), y), grad_callback=lambda g: g)
        with pytest.raises(ValueError, match=r"time=5: only 0 step"):
            fnet.parameters(time=5)


def test_refusals_name_the_argument():
    net, _, _ = _mlp()
    with (
        pytest.raises(TypeError, match="NAdam has no differentiable equivalent"),
        tmg.innerloop_ctx(net, torch.optim.NAdam(net.parameters())),
    ):
        pass
    adam = torch.optim.Adam(net.parameters())
    lr = torch.tensor(0.1, dtype=D, requires_grad=True)
    with (
        pytest.raises(ValueError, match=r"override\['lr'\] is a tensor that requires grad"),
        tmg.innerloop_ctx(net, adam, override={"lr": [lr]}),
    ):
        pass
    sgd = torch.optim.SGD(net.parameters(), lr=0.1)
    with (
        pytest.raises(ValueError, match=r"override\['lr'\] has 3 values for 1 param groups"),
        tmg.innerloop_ctx(net, sgd, override={"lr": [0.1] * 3}),
    ):
        pass
    with (
        pytest.raises(ValueError, match=r"override\['foo'\]"),
        tmg.innerloop_ctx(net, adam, override={"foo": [1.0]}),
    ):
        pass


# ----------------------------------------------------------------- issue 10's inputs


def test_a_loss_that_uses_the_models_own_parameters_says_so():
    net, x, y = _mlp()
    params = dict(net.named_parameters())
    for rule in (tmg.Exact(), tmg.Unrolled()):
        with pytest.raises(ValueError, match=r"functional_call\(net, params"):
            tmg.adapt(
                lambda p, b: F.mse_loss(net(b[0]), b[1]), params, (x, y), steps=2, lr=0.1, rule=rule
            )
    for mode in ("loss", "closure"):
        with (
            tmg.innerloop_ctx(net, 0.1, rule=tmg.Exact()) as (_, diffopt),
            pytest.raises(ValueError, match="call fmodel, not the original model"),
        ):
            step = lambda: F.mse_loss(net(x), y)  # noqa: E731  (net, not fnet)
            diffopt.step(step() if mode == "loss" else step)


def test_a_task_started_without_restoring_the_module_raises():
    net, x, y = _mlp()
    opt = tmg.MetaSGD(net, lr=0.1, rule=tmg.Exact())
    net_state = torchopt.extract_state_dict(net, by="reference", detach_buffers=True)
    for _ in range(2):
        opt.step(F.mse_loss(net(x), y))
        F.mse_loss(net(x * 0.5), y).backward()
        torchopt.recover_state_dict(net, net_state)  # what torchopt's examples do: fine
    opt.step(F.mse_loss(net(x), y))
    F.mse_loss(net(x * 0.5), y).backward()
    with pytest.raises(RuntimeError, match="recover_state_dict"):
        opt.step(F.mse_loss(net(x), y))  # forgot to restore: would span both tasks
    opt.reset()
    opt.step(F.mse_loss(net(x), y))


# --------------------------------------------------- higher's maml-omniglot.py, rebuilt
WAYS, SHOTS, QUERIES, SIDE, TASKS = 3, 1, 2, 6, 2


def _conv() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3),
        nn.BatchNorm2d(4, momentum=1.0, affine=True, track_running_stats=False),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2, 2),
        nn.Flatten(),
        nn.Linear(4 * 2 * 2, WAYS),
    ).to(D)


def _episodes(seed: int) -> list[tuple[Tensor, Tensor, Tensor, Tensor]]:
    g = torch.Generator().manual_seed(seed)
    protos = torch.randn(TASKS, WAYS, 1, SIDE, SIDE, generator=g, dtype=D)

    def draw(t: int, n: int) -> tuple[Tensor, Tensor]:
        labels = torch.arange(WAYS).repeat_interleave(n)
        noise = 0.3 * torch.randn(len(labels), 1, SIDE, SIDE, generator=g, dtype=D)
        return protos[t, labels] + noise, labels

    return [(*draw(t, SHOTS), *draw(t, QUERIES)) for t in range(TASKS)]


def _meta_step(net: nn.Module, ctx: Callable[..., Any], episodes: Any, closure: bool) -> None:
    """One meta-step of maml-omniglot.py's train(): per task, an inner loop in the
    context, the query loss's backward accumulating the meta-gradient on net."""
    inner_opt = torch.optim.SGD(net.parameters(), lr=0.4)
    for x_spt, y_spt, x_qry, y_qry in episodes:
        with ctx(net, inner_opt, copy_initial_weights=False) as (fnet, diffopt):
            for _ in range(2):
                if closure:
                    diffopt.step(lambda x=x_spt, y=y_spt, f=fnet: F.cross_entropy(f(x), y))
                else:
                    diffopt.step(F.cross_entropy(fnet(x_spt), y_spt))
            F.cross_entropy(fnet(x_qry), y_qry).backward()


def _test(net: nn.Module, ctx: Callable[..., Any], episodes: Any) -> list[Tensor]:
    """maml-omniglot.py's test(): adapt without a meta-graph, evaluate the query set."""
    inner_opt = torch.optim.SGD(net.parameters(), lr=0.4)
    out = []
    for x_spt, y_spt, x_qry, _ in episodes:
        with ctx(net, inner_opt, track_higher_grads=False) as (fnet, diffopt):
            for _ in range(2):
                diffopt.step(F.cross_entropy(fnet(x_spt), y_spt))
            out.append(fnet(x_qry).detach())
    return out


def _train(ctx: Callable[..., Any], closure: bool = False, meta_steps: int = 2) -> Any:
    net = _conv()
    meta_opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    grads = []
    for step in range(meta_steps):
        meta_opt.zero_grad()
        _meta_step(net, ctx, _episodes(step), closure)
        grads.append([p.grad.clone() for p in net.parameters()])
        meta_opt.step()
    return net, grads


def _with(rule: tmg.AbstractRule) -> Callable[..., Any]:
    return lambda net, opt, **kw: tmg.innerloop_ctx(net, opt, rule=rule, **kw)


@pytest.mark.parametrize("closure", [False, True], ids=["loss", "closure"])
def test_maml_omniglot_pattern_exact_equals_higher(closure):
    net_h, grads_h = _train(higher.innerloop_ctx)
    net_t, grads_t = _train(_with(tmg.Exact()), closure)
    for a, b in zip(grads_t, grads_h, strict=True):
        _flat(a, b, 1e-9)
    test_h = _test(net_h, higher.innerloop_ctx, _episodes(7))
    _flat(_test(net_t, tmg.innerloop_ctx, _episodes(7)), test_h, 1e-9)


RULES = [
    pytest.param(tmg.FirstOrder(), False, id="FirstOrder"),
    pytest.param(tmg.Truncated(1), False, id="Truncated1"),
    pytest.param(tmg.Binomial(1), False, id="Binomial1"),
    pytest.param(tmg.Binomial(2), False, id="Binomial2"),
    pytest.param(tmg.Unrolled(), False, id="Unrolled"),
    pytest.param(tmg.ImplicitCG(reg=2.0, maxiter=30), True, id="ImplicitCG"),
    pytest.param(tmg.Adjoint(solver="heun"), True, id="Adjoint"),
]


@pytest.mark.parametrize(("rule", "closure"), RULES)
def test_maml_omniglot_pattern_trains_with_every_rule(rule, closure):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", tmg.RegimeWarning)
        warnings.simplefilter("ignore", tmg.SolverWarning)
        net, grads = _train(_with(rule), closure, meta_steps=1)
    exact = _train(_with(tmg.Exact()), meta_steps=1)[1]
    if isinstance(rule, (tmg.Unrolled, tmg.Binomial)) and getattr(rule, "order", 2) == 2:
        _flat(grads[0], exact[0], 1e-9)  # Binomial(K) is exact (K = 2 inner steps)
    for g in grads[0]:
        assert torch.isfinite(g).all()
    if isinstance(rule, tmg.FirstOrder):
        # FOMAML: the query gradient at the adapted weights, what higher's test mode gives
        net_h = _conv()
        fo = []
        for x_spt, y_spt, x_qry, y_qry in _episodes(0):
            with higher.innerloop_ctx(
                net_h, torch.optim.SGD(net_h.parameters(), lr=0.4), track_higher_grads=False
            ) as (fnet, diffopt):
                for _ in range(2):
                    diffopt.step(F.cross_entropy(fnet(x_spt), y_spt))
                fo.append(
                    torch.autograd.grad(
                        F.cross_entropy(fnet(x_qry), y_qry), list(fnet.parameters())
                    )
                )
        _flat(grads[0], [a + b for a, b in zip(*fo, strict=True)], 1e-9)
    assert len(_test(net, tmg.innerloop_ctx, _episodes(7))) == TASKS
