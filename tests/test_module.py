"""The module front end: tmg.MetaSGD / MetaAdam / MetaOptimizer and tmg.innerloop_ctx.

Oracles: torchopt.MetaSGD / MetaAdam (and ``higher`` when installed) for the exact rules,
tmg.adapt on the same problem for the others; all in float64.
"""

from __future__ import annotations

import copy
import gc
import importlib.util
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
import torchopt
from torch import nn
from torch.func import functional_call

import torchopt_metagrad as tmg

DT = torch.float64
K = 3


# --- problems ---------------------------------------------------------------------------


Data = Callable[[torch.Generator], tuple[torch.Tensor, torch.Tensor]]


class Problem:
    """A seeded net factory, one (x, y) batch per inner step, a query batch and a loss."""

    def __init__(self, make: Callable[[], nn.Module], data: Data, loss: Any) -> None:
        self._make = make
        gen = torch.Generator().manual_seed(1)
        self.batches = [data(gen) for _ in range(K)]
        self.query = data(gen)
        self.loss = loss

    def net(self) -> nn.Module:
        torch.manual_seed(0)
        return self._make().to(DT)

    def with_net(self, make: Callable[[], nn.Module]) -> Problem:
        """The same data and loss with another network."""
        other = copy.copy(self)
        other._make = make
        return other


def mlp_problem() -> Problem:
    def make() -> nn.Module:
        return nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1))

    def data(gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(10, 3, generator=gen, dtype=DT)
        return x, torch.sin(x.sum(1, keepdim=True))

    return Problem(make, data, F.mse_loss)


def conv4(channels: int = 8, n_way: int = 5, bn: Callable[[int], nn.Module] | None = None):
    """The 4-conv few-shot net (conv3x3-BN-ReLU-maxpool x4, linear head), small."""
    bn = bn or (lambda c: nn.BatchNorm2d(c, track_running_stats=False))
    layers: list[nn.Module] = []
    for c_in in (1, channels, channels, channels):
        layers += [
            nn.Conv2d(c_in, channels, 3, padding=1),
            bn(channels),
            nn.ReLU(),
            nn.MaxPool2d(2),
        ]
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(channels, n_way))


def conv_problem() -> Problem:
    def data(gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.rand(5, 1, 28, 28, generator=gen, dtype=DT), torch.arange(5)

    return Problem(conv4, data, F.cross_entropy)


PROBLEMS = {"mlp": mlp_problem, "conv4": conv_problem}


# --- runners ----------------------------------------------------------------------------


def flat_grads(params: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat(
        [(torch.zeros_like(p) if p.grad is None else p.grad).reshape(-1) for p in params]
    )


def run_module(p: Problem, make_opt: Callable[[nn.Module], Any], mode: str = "loss", steps=K):
    """Inner loop with a module optimizer, query loss backward; meta-gradient on theta."""
    net = p.net()
    theta = list(net.parameters())
    opt = make_opt(net)
    for x, y in p.batches[:steps]:
        if mode == "loss":
            opt.step(p.loss(net(x), y))
        else:
            opt.step(lambda x=x, y=y: p.loss(net(x), y))
    p.loss(net(p.query[0]), p.query[1]).backward()
    return flat_grads(theta)


def run_adapt(p: Problem, rule: tmg.AbstractRule, steps: int = K, **kw: Any) -> torch.Tensor:
    """The same problem through the functional front end."""
    net = p.net()
    params = {n: t for n, t in net.named_parameters() if t.requires_grad}

    def loss_fn(params: dict[str, torch.Tensor], batch: Any) -> torch.Tensor:
        return p.loss(functional_call(net, params, (batch[0],)), batch[1])

    if "optimizer" not in kw:
        kw.setdefault("lr", 0.1)
    adapted = tmg.adapt(loss_fn, params, batches=p.batches[:steps], steps=steps, rule=rule, **kw)
    loss_fn(adapted, p.query).backward()
    return flat_grads(list(net.parameters()))


def close(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-10) -> None:
    torch.testing.assert_close(a, b, rtol=0, atol=rtol * float(b.abs().max()))


def sgd(rule: tmg.AbstractRule, **kw: Any) -> Callable[[nn.Module], Any]:
    return lambda net: tmg.MetaSGD(net, lr=0.1, rule=rule, **kw)


# --- equal to torchopt where the rule is exact ------------------------------------------


@pytest.mark.parametrize("net", list(PROBLEMS))
@pytest.mark.parametrize(
    ("rule", "mode"),
    [(tmg.Unrolled(), "loss"), (tmg.Exact(), "loss"), (tmg.Exact(), "closure")],
    ids=["Unrolled", "Exact-loss", "Exact-closure"],
)
def test_metasgd_equals_torchopt_metasgd(net, rule, mode):
    p = PROBLEMS[net]()
    expected = run_module(p, lambda n: torchopt.MetaSGD(n, lr=0.1))
    close(run_module(p, sgd(rule), mode), expected)


@pytest.mark.parametrize(
    ("make", "ref"),
    [
        (
            lambda r: lambda n: tmg.MetaAdam(n, lr=0.01, rule=r),
            lambda n: torchopt.MetaAdam(n, 0.01),
        ),
        (
            lambda r: lambda n: tmg.MetaSGD(n, lr=0.1, rule=r, momentum=0.9),
            lambda n: torchopt.MetaSGD(n, lr=0.1, momentum=0.9),
        ),
    ],
    ids=["MetaAdam", "MetaSGD-momentum"],
)
@pytest.mark.parametrize("rule", [tmg.Unrolled(), tmg.Exact()], ids=repr)
def test_stateful_optimizers_equal_torchopt(make, ref, rule):
    p = mlp_problem()
    close(run_module(p, make(rule)), run_module(p, ref))


# --- equal to tmg.adapt for every rule --------------------------------------------------


@pytest.mark.parametrize("mode", ["loss", "closure"])
@pytest.mark.parametrize(
    "rule",
    [tmg.FirstOrder(), tmg.Truncated(2), tmg.Binomial(1), tmg.Binomial(K), tmg.Exact()],
    ids=repr,
)
def test_rules_equal_adapt(rule, mode):
    p = mlp_problem()
    close(run_module(p, sgd(rule), mode), run_adapt(p, rule))


@pytest.mark.parametrize("mode", ["loss", "closure"])
@pytest.mark.parametrize(
    ("make", "optimizer"),
    [
        (lambda r: lambda n: tmg.MetaAdam(n, lr=0.01, rule=r), lambda: torchopt.adam(0.01)),
        (
            lambda r: lambda n: tmg.MetaOptimizer(n, torchopt.sgd(0.1, momentum=0.9), rule=r),
            lambda: torchopt.sgd(0.1, momentum=0.9),
        ),
    ],
    ids=["MetaAdam", "MetaOptimizer-sgd-momentum"],
)
@pytest.mark.parametrize("rule", [tmg.Exact(), tmg.Binomial(1)], ids=repr)
def test_optimizers_equal_adapt(make, optimizer, rule, mode):
    p = mlp_problem()
    close(run_module(p, make(rule), mode), run_adapt(p, rule, optimizer=optimizer()))


def test_binomial_on_conv_net_in_closure_mode_equals_adapt():
    p = conv_problem()
    close(run_module(p, sgd(tmg.Binomial(1)), "closure"), run_adapt(p, tmg.Binomial(1)))


@pytest.mark.parametrize(
    "rule",
    [tmg.ImplicitCG(1.0, maxiter=50, tol=1e-12), tmg.Adjoint()],
    ids=["ImplicitCG", "Adjoint"],
)
def test_single_objective_rules_in_closure_mode_equal_adapt(rule):
    p = mlp_problem()
    p.batches = [p.batches[0]] * K  # one inner objective
    net = p.net()
    opt = tmg.MetaSGD(net, lr=0.1, rule=rule)
    x, y = p.batches[0]
    with pytest.raises(ValueError, match=f"{type(rule).__name__} needs .*closure"):
        opt.step(p.loss(net(x), y))

    def adapt_same(p: Problem, rule: tmg.AbstractRule) -> torch.Tensor:
        net = p.net()
        params = dict(net.named_parameters())
        loss_fn = lambda ps, b: p.loss(functional_call(net, ps, (b[0],)), b[1])  # noqa: E731
        adapted = tmg.adapt(loss_fn, params, p.batches[0], steps=K, lr=0.1, rule=rule)
        loss_fn(adapted, p.query).backward()
        return flat_grads(list(net.parameters()))

    close(run_module(p, sgd(rule), "closure"), adapt_same(p, rule))


# --- torchopt's MAML Omniglot pattern ---------------------------------------------------


def load_example(name: str) -> Any:
    path = Path(__file__).resolve().parent.parent / "examples" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("rule", [tmg.Unrolled(), tmg.Exact()], ids=repr)
def test_maml_omniglot_pattern_only_the_constructor_changes(rule):
    example = load_example("maml_omniglot_pattern")
    ref_net, ref_log = example.run(lambda net: torchopt.MetaSGD(net, lr=1e-1))
    net, log = example.run(lambda net: tmg.MetaSGD(net, lr=1e-1, rule=rule))
    assert log == pytest.approx(ref_log, rel=1e-12)
    for (name, a), b in zip(net.named_parameters(), ref_net.parameters()):
        # The last meta-gradient to round-off; the params to Adam's amplification of the
        # round-off in the conv biases' (zero) gradient, which batch norm cancels.
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=1e-13, msg=name)
        torch.testing.assert_close(a, b, rtol=0, atol=1e-9, msg=name)
    for a, b in zip(net.buffers(), ref_net.buffers()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-9)
    assert all(p.is_leaf for p in net.parameters())  # restored, as with torchopt


def test_state_dict_round_trip_through_torchopt_helpers():
    net = mlp_problem().net()
    opt = tmg.MetaSGD(net, lr=0.1, rule=tmg.Exact(), momentum=0.9)
    assert isinstance(opt, torchopt.MetaOptimizer)
    saved = torchopt.extract_state_dict(opt, by="reference")
    assert isinstance(saved[0], torchopt.base.UninitializedState)
    x = torch.randn(4, 3, dtype=DT)
    opt.step(net(x).pow(2).mean())
    mid = torchopt.extract_state_dict(opt, by="copy")
    assert any(isinstance(t, torch.Tensor) and t.abs().sum() > 0 for t in _leaves(mid))
    torchopt.stop_gradient(opt)
    with pytest.raises(ValueError, match="before the first inner step"):
        torchopt.recover_state_dict(opt, mid)
    torchopt.recover_state_dict(opt, saved)  # starts a new inner loop from the current params
    assert opt.state_dict() == saved


def _leaves(tree: Any) -> list[Any]:
    import optree

    return optree.tree_leaves(tree)


def test_restore_between_tasks_sums_independent_meta_gradients():
    """Two tasks with a momentum inner loop and a restore between them (torchopt's pattern)."""
    p = mlp_problem()
    net = p.net()
    theta = list(net.parameters())
    opt = tmg.MetaSGD(net, lr=0.1, rule=tmg.Exact(), momentum=0.9)
    net_state = torchopt.extract_state_dict(net, by="reference", detach_buffers=True)
    opt_state = torchopt.extract_state_dict(opt, by="reference")
    for _ in range(2):
        for x, y in p.batches:
            opt.step(lambda x=x, y=y: p.loss(net(x), y))
        p.loss(net(p.query[0]), p.query[1]).backward()
        torchopt.recover_state_dict(net, net_state)
        torchopt.recover_state_dict(opt, opt_state)
    one = run_adapt(p, tmg.Exact(), optimizer=torchopt.sgd(0.1, momentum=0.9))
    close(flat_grads(theta), 2 * one)


# --- outer losses, shared/frozen params, buffers, randomness ----------------------------


@pytest.mark.parametrize("mode", ["loss", "closure"])
def test_outer_loss_over_several_steps_sums_their_meta_gradients(mode):
    p = mlp_problem()

    def run(rule: tmg.AbstractRule) -> torch.Tensor:
        net = p.net()
        names = [n for n, _ in net.named_parameters()]
        theta = list(net.parameters())
        opt = tmg.MetaSGD(net, lr=0.1, rule=rule)
        seen = []
        for x, y in p.batches:
            opt.step(p.loss(net(x), y) if mode == "loss" else lambda x=x, y=y: p.loss(net(x), y))
            seen.append(dict(zip(names, net.parameters())))
        xq, yq = p.query
        outer = sum(p.loss(functional_call(net, seen[k], (xq,)), yq) for k in (0, 2))
        outer = outer + p.loss(xq @ theta[0].T.sum(1, keepdim=True), yq)  # theta itself too
        outer.backward()
        return flat_grads(theta)

    close(run(tmg.Exact()), run(tmg.Unrolled()))


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)
        self.b.weight = self.a.weight
        self.head = nn.Linear(4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.b(torch.tanh(self.a(x)))))


@pytest.mark.parametrize(
    ("rule", "mode"),
    [
        (tmg.Unrolled(), "loss"),
        (tmg.Exact(), "loss"),
        (tmg.Exact(), "closure"),
        (tmg.Binomial(1), "closure"),
    ],
    ids=["Unrolled", "Exact-loss", "Exact-closure", "Binomial1-closure"],
)
def test_shared_parameters_are_one_parameter(rule, mode):
    def data(gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(6, 4, generator=gen, dtype=DT)
        return x, x.sum(1, keepdim=True).cos()

    p = Problem(Tied, data, F.mse_loss)
    close(run_module(p, sgd(rule), mode), run_adapt(p, rule))
    net = p.net()
    opt = tmg.MetaSGD(net, lr=0.1, rule=rule)
    opt.step(p.loss(net(p.batches[0][0]), p.batches[0][1]))
    assert net.a.weight is net.b.weight and not net.a.weight.is_leaf


@pytest.mark.parametrize("mode", ["loss", "closure"])
def test_frozen_parameter_is_left_alone(mode):
    def frozen() -> nn.Module:
        net = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1))
        net[0].bias.requires_grad_(False)
        return net

    p = mlp_problem().with_net(frozen)
    net = p.net()
    bias = net[0].bias
    opt = tmg.MetaSGD(net, lr=0.1, rule=tmg.Exact())
    for x, y in p.batches:
        opt.step(p.loss(net(x), y) if mode == "loss" else lambda x=x, y=y: p.loss(net(x), y))
    assert net[0].bias is bias and bias.grad is None
    close(run_module(p, sgd(tmg.Exact()), mode), run_adapt(p, tmg.Exact()))


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_batch_norm_with_running_stats(train):
    """Recomputing HVPs re-runs the forward without touching the running statistics."""

    def make() -> nn.Module:
        return nn.Sequential(nn.Linear(3, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 1))

    p = mlp_problem().with_net(make)
    results = {}
    for name, rule, mode in [
        ("unrolled", tmg.Unrolled(), "loss"),
        ("closure", tmg.Exact(), "closure"),
    ]:
        net = p.net()
        net.train(train)
        theta = list(net.parameters())
        opt = tmg.MetaSGD(net, lr=0.1, rule=rule)
        for x, y in p.batches:
            step = lambda x=x, y=y, net=net: p.loss(net(x), y)  # noqa: E731
            opt.step(step() if mode == "loss" else step)
        p.loss(net(p.query[0]), p.query[1]).backward()
        results[name] = (flat_grads(theta), [b.clone() for b in net.buffers()])
    close(results["closure"][0], results["unrolled"][0])
    for a, b in zip(results["closure"][1], results["unrolled"][1]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    if train:
        assert int(results["closure"][1][-1]) == K + 1  # num_batches_tracked: K steps + query


def test_dropout_is_replayed_with_the_recorded_rng_state():
    def make() -> nn.Module:
        return nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Dropout(0.3), nn.Linear(16, 1))

    p = mlp_problem().with_net(make)
    close(run_module(p, sgd(tmg.Exact()), "closure"), run_module(p, sgd(tmg.Unrolled())))


# --- higher-style context ---------------------------------------------------------------


def run_ctx(p: Problem, make_opt: Callable[[nn.Module], Any], mode: str, ctx: Any = None):
    net = p.net()
    theta = list(net.parameters())
    ctx = ctx or (
        lambda model, opt: tmg.innerloop_ctx(
            model, opt, copy_initial_weights=False, rule=tmg.Exact()
        )
    )
    with ctx(net, make_opt(net)) as (fnet, diffopt):
        for x, y in p.batches:
            if mode == "loss":
                diffopt.step(p.loss(fnet(x), y))
            else:
                diffopt.step(lambda x=x, y=y: p.loss(fnet(x), y))
        p.loss(fnet(p.query[0]), p.query[1]).backward()
    assert list(net.parameters()) == theta  # the model itself is not changed
    return flat_grads(theta)


@pytest.mark.parametrize("mode", ["loss", "closure"])
@pytest.mark.parametrize(
    "make_opt",
    [
        lambda net: torch.optim.SGD(net.parameters(), lr=0.1),
        lambda net: torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9),
    ],
    ids=["SGD", "SGD-momentum"],
)
def test_innerloop_ctx_equals_higher(make_opt, mode):
    higher = pytest.importorskip("higher")
    p = mlp_problem()

    def higher_ctx(model: nn.Module, opt: Any) -> Any:
        return higher.innerloop_ctx(model, opt, copy_initial_weights=False)

    close(run_ctx(p, make_opt, mode), run_ctx(p, make_opt, "loss", higher_ctx))


def test_innerloop_ctx_adam_is_torch_optims_adam():
    """torch.optim.Adam runs torch.optim's own formula (float64 throughout); torchopt.adam
    computes its bias correction in float32, so torchopt.MetaAdam agrees to ~1e-5 only.
    higher's Adam adds eps before the bias correction of the second moment: it is
    compared with eps=0 in tests/test_higher_compat.py."""
    p = mlp_problem()
    expected = run_module(p, lambda n: torchopt.MetaAdam(n, lr=0.01))
    got = run_ctx(p, lambda net: torch.optim.Adam(net.parameters(), lr=0.01), "closure")
    close(got, expected, rtol=3e-5)


def test_innerloop_ctx_equals_metasgd_and_takes_a_float_lr():
    p = mlp_problem()
    expected = run_module(p, lambda n: torchopt.MetaSGD(n, lr=0.1))
    close(run_ctx(p, lambda net: 0.1, "closure"), expected)
    close(run_ctx(p, lambda net: torchopt.sgd(0.1), "loss"), expected)


def test_innerloop_ctx_adapts_only_the_optimizers_params_and_copies_by_default():
    p = mlp_problem()
    net = p.net()
    head_only = torch.optim.SGD(net[2].parameters(), lr=0.1)
    with tmg.innerloop_ctx(net, head_only, copy_initial_weights=False, rule=tmg.Exact()) as (
        fnet,
        diffopt,
    ):
        diffopt.step(p.loss(fnet(p.batches[0][0]), p.batches[0][1]))
        before = list(fnet.parameters(time=0))
        assert fnet[0].weight is before[0] and fnet[2].weight is not before[2]
    with tmg.innerloop_ctx(net, 0.1, rule=tmg.Exact()) as (fnet, diffopt):  # higher's default
        diffopt.step(p.loss(fnet(p.batches[0][0]), p.batches[0][1]))
        p.loss(fnet(p.query[0]), p.query[1]).backward()
        initial = list(fnet.parameters(time=0))
    assert all(t.grad is None for t in net.parameters())
    assert all(t.grad is not None for t in initial)  # where higher puts it too


def test_innerloop_ctx_closure_mode_releases_the_inner_loop_at_exit():
    p = mlp_problem()
    net = p.net()
    refs = []
    for _ in range(2):
        with tmg.innerloop_ctx(net, 0.1, copy_initial_weights=False, rule=tmg.Exact()) as (
            fnet,
            diffopt,
        ):
            for x, y in p.batches:
                diffopt.step(lambda x=x, y=y, f=fnet: p.loss(f(x), y))
            outer = p.loss(fnet(p.query[0]), p.query[1])
        outer.backward()  # after the block: the records live as long as the outer graph
        refs.append(weakref.ref(fnet))
        with pytest.raises(RuntimeError, match="after its innerloop_ctx block"):
            fnet(p.query[0])
        with pytest.raises(RuntimeError, match="after its innerloop_ctx block"):
            diffopt.step(lambda o=outer: o)
        del fnet, diffopt, outer
    assert all(r() is None for r in refs)  # no reference cycle keeps them alive
    gc.collect()


@pytest.mark.parametrize("mode", ["loss", "closure"])
def test_restore_releases_the_inner_loop(mode):
    p = mlp_problem()
    net = p.net()
    opt = tmg.MetaSGD(net, lr=0.1, rule=tmg.Exact())
    net_state = torchopt.extract_state_dict(net, by="reference")
    opt_state = torchopt.extract_state_dict(opt, by="reference")
    for x, y in p.batches:
        opt.step(p.loss(net(x), y) if mode == "loss" else lambda x=x, y=y: p.loss(net(x), y))
    session = weakref.ref(opt._session)
    kept = opt._session.loop.entries[0]  # the first step's record entry
    kept = weakref.ref(kept.grads[0] if mode == "loss" else kept.loss)
    outer = p.loss(net(p.query[0]), p.query[1])
    torchopt.recover_state_dict(net, net_state)
    torchopt.recover_state_dict(opt, opt_state)
    assert session() is None and kept() is not None  # the outer graph still needs it
    outer.backward()
    del outer
    assert kept() is None


# --- errors -----------------------------------------------------------------------------


def test_replaced_or_modified_parameter_raises_naming_it():
    p = mlp_problem()
    net = p.net()
    opt = tmg.MetaSGD(net, lr=0.1, rule=tmg.Exact())
    x, y = p.batches[0]
    opt.step(p.loss(net(x), y))
    net[0].weight = nn.Parameter(torch.zeros(8, 3, dtype=DT))
    with pytest.raises(RuntimeError, match=r"'0\.weight' is not the tensor MetaSGD set"):
        opt.step(p.loss(net(x), y))
    net = p.net()
    opt = tmg.MetaSGD(net, lr=0.1, rule=tmg.Exact())
    opt.step(p.loss(net(x), y))
    with torch.no_grad():
        net[2].bias.add_(1.0)
    with pytest.raises(RuntimeError, match=r"'2\.bias' was modified in place"):
        opt.step(p.loss(net(x), y))
    opt.reset()  # an explicit new inner loop from whatever the module holds is fine
    opt.step(p.loss(net(x), y))


def test_bad_arguments_raise_naming_them():
    net = mlp_problem().net()
    with pytest.raises(ValueError, match="lr"):
        tmg.MetaSGD(net, lr=0.0, rule=tmg.Exact())
    with pytest.raises(TypeError, match="lr"):
        tmg.MetaSGD(net, lr=True, rule=tmg.Exact())
    with pytest.raises(ValueError, match="lr"):
        tmg.MetaAdam(net, lr=-1.0, rule=tmg.Exact())
    with pytest.raises(TypeError, match="module"):
        tmg.MetaSGD("net", lr=0.1, rule=tmg.Exact())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="rule"):
        tmg.MetaSGD(net, lr=0.1, rule="exact")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="impl"):
        tmg.MetaOptimizer(net, torch.optim.SGD, rule=tmg.Exact())
    with pytest.raises(ValueError, match="no parameters that require grad"):
        tmg.MetaSGD(nn.ReLU(), lr=0.1, rule=tmg.Exact())
    with pytest.raises(ValueError, match=r"Adjoint .*plain gradient descent"):
        tmg.MetaSGD(net, lr=0.1, rule=tmg.Adjoint(), momentum=0.9).step(
            lambda: net(torch.ones(2, 3, dtype=DT)).sum()
        )
    lbfgs = torch.optim.LBFGS(net.parameters())
    with (
        pytest.raises(TypeError, match=r"LBFGS has no differentiable equivalent"),
        tmg.innerloop_ctx(net, lbfgs, rule=tmg.Exact()),
    ):
        pass
    opt = tmg.MetaSGD(net, lr=0.1, rule=tmg.Exact())
    x = torch.randn(4, 3, dtype=DT)
    with pytest.raises(TypeError, match="step takes"):
        opt.step("loss")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="scalar"):
        opt.step(net(x).sum(1))
    with pytest.raises(ValueError, match="does not depend"):
        opt.step(x.sum().requires_grad_())
    with pytest.raises(TypeError, match="closure's return value"):
        opt.step(lambda: 1.0)


def test_rule_order_is_checked_against_the_steps_the_outer_loss_uses():
    p = mlp_problem()
    with pytest.raises(ValueError, match=r"order=3 is larger than steps=2.*after 2 inner step"):
        run_module(p, sgd(tmg.Truncated(3)), steps=2)


def test_non_finite_inner_loss_names_the_step():
    net = mlp_problem().net()
    opt = tmg.MetaSGD(net, lr=0.1, rule=tmg.Exact())
    x = torch.randn(4, 3, dtype=DT)
    opt.step(net(x).pow(2).mean())
    with pytest.raises(tmg.NonFiniteError, match="inner step 1"):
        opt.step(lambda: net(x).pow(2).mean() * float("nan"))
