"""Adversarial review of custom_root / ImplicitCG, innerloop_ctx and Binomial's budget.

Each test is a minimal reproduction of a defect found in review, now fixed: custom_root's
``aux`` kept a graph that did not reach the argnums arguments (its gradient silently lost;
now detached, as in torchopt); a NaN in the linear system gave a zero meta-gradient through
CG (now NonFiniteError); custom_root under vmap and a nested innerloop_ctx failed inside
torch (now errors naming them). Float64 throughout; oracles are explicit linear algebra
(``torch.linalg.solve``) or ``higher`` 0.2.1's own behaviour.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import torchopt_metagrad as tmg

DT = torch.float64


def _spd(d: int = 3) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    m = torch.randn(d, d, generator=gen, dtype=DT)
    return m @ m.T + 3 * torch.eye(d, dtype=DT)


def test_custom_root_aux_gradient_not_silently_dropped() -> None:
    m = _spd()
    a = torch.tensor([0.3, -1.0, 0.5], dtype=DT, requires_grad=True)
    g = torch.tensor([1.0, 2.0, -1.0], dtype=DT)

    @tmg.custom_root(lambda x, a: m @ x - a, argnums=1, has_aux=True)
    def solver(params: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.linalg.solve(m, a.detach()), 2 * a  # aux depends on a

    x, aux = solver(torch.zeros(3, dtype=DT), a)
    (grad,) = torch.autograd.grad((x * g).sum() + aux.sum(), a)
    oracle = torch.linalg.solve(m.T, g) + 2  # implicit part + aux's direct use of a
    # either aux is detached (as in torchopt: no silent loss) or its gradient arrives
    assert not aux.requires_grad or torch.allclose(grad, oracle, atol=1e-12)


@pytest.mark.parametrize(
    "solve", [None, tmg.ImplicitCG(1.0, solver="cg")], ids=["default_normal_cg", "ImplicitCG_cg"]
)
def test_custom_root_nan_jacobian_is_reported(solve: object) -> None:
    m = _spd()
    bad = m.clone()
    bad[0, 0] = float("nan")
    a = torch.tensor([0.3, -1.0, 0.5], dtype=DT, requires_grad=True)

    @tmg.custom_root(lambda x, a: bad @ x - a, argnums=1, solve=solve)
    def solver(params: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        return torch.linalg.solve(m, a.detach())  # finite solution, NaN Jacobian

    x = solver(torch.zeros(3, dtype=DT), a)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", tmg.SolverWarning)
        with pytest.raises(tmg.NonFiniteError):
            torch.autograd.grad(x.sum(), a)  # today: (tensor([0., 0., 0.]),)


def test_custom_root_under_vmap_is_refused_clearly() -> None:
    m = _spd()

    @tmg.custom_root(lambda x, a: m @ x - a, argnums=1)
    def solver(params: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        return torch.linalg.solve(m, a.detach())

    batch = torch.randn(4, 3, dtype=DT, requires_grad=True)
    with pytest.raises((TypeError, ValueError, RuntimeError), match="custom_root"):
        torch.func.vmap(lambda a: solver(torch.zeros(3, dtype=DT), a))(batch)


def test_nested_innerloop_ctx_error_names_the_model() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).to(DT)
    x, y = torch.randn(5, 3, dtype=DT), torch.randn(5, 1, dtype=DT)
    with tmg.innerloop_ctx(net, 0.1, copy_initial_weights=False) as (fnet, diffopt):
        diffopt.step(((fnet(x) - y) ** 2).mean())
        with (
            pytest.raises((TypeError, ValueError), match="model"),
            tmg.innerloop_ctx(fnet, 0.2, copy_initial_weights=False),
        ):
            pass


# --- a second review (the session's library diff) ---------------------------------------


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).to(DT)


def _mse(net: nn.Module):
    def loss_fn(params: dict, batch: tuple) -> torch.Tensor:
        x, y = batch
        return ((torch.func.functional_call(net, params, (x,)) - y) ** 2).mean()

    return loss_fn


def test_adapt_refuses_a_torch_optim_optimizer_over_a_subset_of_params() -> None:
    """It adapted every entry of params, ignoring the optimizer's list (innerloop_ctx
    honours it): now a difference is refused; adapt= the optimizer's names works."""
    net = _mlp()
    params = dict(net.named_parameters())
    batch = (torch.randn(5, 3, dtype=DT), torch.randn(5, 1, dtype=DT))
    head = torch.optim.SGD(net[2].parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"optimizer holds other tensors.*0\.weight"):
        tmg.adapt(_mse(net), params, batch, steps=2, optimizer=head, rule=tmg.Exact())
    out = tmg.adapt(_mse(net), params, batch, steps=2, optimizer=head, rule=tmg.Exact(),
                    adapt=["2.weight", "2.bias"])  # fmt: skip
    assert out["0.weight"] is params["0.weight"] and out["2.weight"] is not params["2.weight"]


@pytest.mark.parametrize("lr", [-0.1, float("nan")])
def test_override_lr_of_any_optimizer_is_checked(lr: float) -> None:
    net = _mlp()
    opt = torch.optim.Adam(net.parameters(), lr=0.01)
    x = torch.randn(5, 3, dtype=DT)
    with (
        pytest.raises(ValueError, match="lr must be a finite float"),
        tmg.innerloop_ctx(net, opt, override={"lr": [lr]}) as (fnet, diffopt),
    ):
        diffopt.step(fnet(x).pow(2).mean())


def test_custom_root_default_solve_does_not_warn_at_its_own_tolerance() -> None:
    """torchopt's solve_normal_cg stops at its own tolerance (1e-5); the plugin judged it
    against 1e-6 and warned 'raise maxiter or reg' on every call."""
    n = 30
    gen = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=DT))
    m = q @ torch.diag(torch.logspace(0, 2, n, dtype=DT)) @ q.T
    a = torch.randn(n, generator=gen, dtype=DT, requires_grad=True)

    @tmg.custom_root(lambda x, a: m @ x - a, argnums=1)
    def solver(params: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        return torch.linalg.solve(m, a.detach())

    with warnings.catch_warnings():
        warnings.simplefilter("error", tmg.SolverWarning)
        (grad,) = torch.autograd.grad(solver(torch.zeros(n, dtype=DT), a).sum(), a)
    exact = torch.linalg.solve(m, torch.ones(n, dtype=DT))
    assert float((grad - exact).norm() / exact.norm()) < 1e-4


def test_warm_start_at_the_solution_is_not_far_from_stationary() -> None:
    """The stationarity ratio compared two round-off-sized norms (~1) and warned."""
    gen = torch.Generator().manual_seed(0)
    b = torch.randn(6, 6, generator=gen, dtype=DT)
    m = b @ b.T + torch.eye(6, dtype=DT)
    a = torch.randn(6, generator=gen, dtype=DT, requires_grad=True)
    field = torch.func.grad(lambda x, a: 0.5 * x @ m @ x - a @ x)
    x_star = torch.linalg.solve(m, a.detach())

    @tmg.custom_root(field, argnums=1, solve=tmg.ImplicitCG(1.0))
    def solver(params: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        return torch.linalg.solve(m, a.detach())

    with warnings.catch_warnings():
        warnings.simplefilter("error", tmg.SolverWarning)
        with tmg.diagnostics.collect() as reports:
            torch.autograd.grad(solver(x_star.clone(), a).sum(), a)
    assert reports[0].info.stationarity < 1e-6


# --- session 5 review: a loss linear in the params; torch.inference_mode() -------------


@pytest.mark.parametrize(
    "rule",
    [tmg.Exact(), tmg.Exact(keep_graphs=2), tmg.Exact(snapshots=2), tmg.Binomial(2),
     tmg.Truncated(1), tmg.FirstOrder(), tmg.ImplicitCG(1.0)],
    ids=repr,
)  # fmt: skip
@pytest.mark.parametrize("lr_kind", ["float", "learned", "adam"])
def test_a_loss_linear_in_the_params_equals_unrolled(rule, lr_kind):
    """Its gradient is a constant (no graph): every rule used to fail with autograd's
    'element 0 of tensors does not require grad'; a step's Jacobian is the identity."""
    import torchopt

    d = torch.float64
    w = torch.randn(3, dtype=d, generator=torch.Generator().manual_seed(0)).requires_grad_()
    c = torch.tensor([0.5, -1.0, 2.0], dtype=d)
    lr = torch.tensor(0.1, dtype=d, requires_grad=True)
    if isinstance(rule, tmg.ImplicitCG) and lr_kind != "float":
        pytest.skip("implicit rules take plain descent without a learned lr")
    kw = {"float": {"lr": 0.1}, "learned": {"lr": lr}, "adam": {"optimizer": torchopt.adam(0.1)}}

    def grads(r):  # type: ignore[no-untyped-def]
        out = tmg.adapt(lambda p, b: (p["w"] * b).sum(), {"w": w}, c, steps=3, rule=r,
                        **kw[lr_kind])  # fmt: skip
        leaves = [w, lr] if lr_kind == "learned" else [w]
        outer = ((out["w"] - 1) ** 2).sum()
        return torch.autograd.grad(outer, leaves), 2 * (out["w"].detach() - 1)

    if isinstance(rule, tmg.ImplicitCG):  # H = 0: (I + H/reg)^{-1} g is g itself
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", tmg.SolverWarning)  # 3 steps: not stationary
            (got,), g = grads(rule)
        torch.testing.assert_close(got, g, rtol=1e-12, atol=1e-14)
        return
    ref, _ = grads(tmg.Unrolled())
    for a, b in zip(grads(rule)[0], ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_inference_mode_is_refused_with_a_message_naming_it():
    net = torch.nn.Linear(3, 1).double()
    params = dict(net.named_parameters())
    x = torch.randn(4, 3, dtype=torch.float64)

    def loss(p, b):  # type: ignore[no-untyped-def]
        return (torch.func.functional_call(net, p, (b,)) ** 2).mean()

    calls = [
        lambda: tmg.adapt(loss, params, x, steps=2, lr=0.1, rule=tmg.Exact()),
        lambda: tmg.adapt(loss, params, x, steps=2, lr=0.1, rule=tmg.Unrolled()),
        lambda: tmg.flow(loss, params, x, T=0.1, rule=tmg.Adjoint()),
        lambda: tmg.MetaSGD(net, lr=0.1, rule=tmg.Exact()).step(lambda: (net(x) ** 2).mean()),
    ]
    for call in calls:
        with torch.inference_mode(), pytest.raises(RuntimeError, match="inference_mode"):
            call()
    with torch.no_grad():  # allowed: the inner loop turns gradients on for its steps
        tmg.adapt(loss, params, x, steps=2, lr=0.1, rule=tmg.Exact())


class _ItemScale(torch.nn.Module):
    """Scales its input by a float statistic it updates in place and reads by ``.item()``."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("s", torch.ones((), dtype=torch.float64))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            self.s.mul_(0.9).add_(0.1 * h.detach().abs().mean())
        return h * self.s.item()


def test_a_float_statistic_read_by_item_is_refused_too():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 8), _ItemScale(), torch.nn.Tanh(),
                              torch.nn.Linear(8, 1)).double()  # fmt: skip
    params = dict(net.named_parameters())
    x, y = torch.randn(16, 3, dtype=torch.float64), torch.randn(16, 1, dtype=torch.float64)

    def loss(p, b):  # type: ignore[no-untyped-def]
        return ((torch.func.functional_call(net, p, (b[0],)) - b[1]) ** 2).mean()

    out = tmg.adapt(loss, params, (x, y), steps=3, lr=0.05, rule=tmg.Exact())
    with pytest.raises(RuntimeError, match=r"updates a tensor of shape \(\) in place"):
        torch.autograd.grad(loss(out, (x, y)), list(params.values()))


class _RunningScale(torch.nn.Module):
    """Scales its input by a running statistic it updates in place (and so reads back)."""

    def __init__(self, n: int, read_first: bool) -> None:
        super().__init__()
        self.read_first = read_first
        self.register_buffer("s", torch.ones(n, dtype=torch.float64))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        out = h * self.s if self.read_first else None
        with torch.no_grad():
            self.s.mul_(0.9).add_(0.1 * h.detach().abs().mean(0))
        return out if out is not None else h * self.s


@pytest.mark.parametrize("read_first", [False, True], ids=["write, then read", "read, then write"])
@pytest.mark.parametrize("rule", [tmg.Exact(), tmg.Binomial(2), tmg.Exact(keep_graphs=1),
                                  tmg.Exact(snapshots=2)], ids=repr)  # fmt: skip
def test_a_loss_that_reads_back_a_buffer_it_updates_is_refused(rule, read_first):
    """Each step sees another value of the statistic; a replay sees the last one (shielded
    writes): Exact used to return a meta-gradient 2.8% off, silently."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 8), _RunningScale(8, read_first),
                              torch.nn.Tanh(), torch.nn.Linear(8, 1)).double()  # fmt: skip
    params = dict(net.named_parameters())
    x, y = torch.randn(16, 3, dtype=torch.float64), torch.randn(16, 1, dtype=torch.float64)

    def loss(p, b):  # type: ignore[no-untyped-def]
        return ((torch.func.functional_call(net, p, (b[0],)) - b[1]) ** 2).mean()

    message = r"updates a tensor of shape \(8,\) in place and also reads it"
    if read_first:  # the forward's own gradient fails (autograd's in-place check): explained
        for r in (rule, tmg.FirstOrder()):
            with pytest.raises(RuntimeError, match=message):
                tmg.adapt(loss, params, (x, y), steps=4, lr=0.05, rule=r)
        return
    out = tmg.adapt(loss, params, (x, y), steps=4, lr=0.05, rule=rule)
    with pytest.raises(RuntimeError, match=message):
        torch.autograd.grad(loss(out, (x, y)), list(params.values()))
    first = tmg.adapt(loss, params, (x, y), steps=4, lr=0.05, rule=tmg.FirstOrder())
    torch.autograd.grad(loss(first, (x, y)), list(params.values()))  # recomputes nothing


@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum 0.1", "cumulative"])
def test_batch_norm_is_not_taken_for_a_loss_that_reads_back(momentum):
    """Training-mode batch norm reads and writes its running statistics in one op, and with
    momentum=None reads its counter by .item(): neither changes its output, so it replays."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.BatchNorm1d(8, momentum=momentum),
                              torch.nn.Tanh(), torch.nn.Linear(8, 1)).double()  # fmt: skip
    params = dict(net.named_parameters())
    x, y = torch.randn(16, 3, dtype=torch.float64), torch.randn(16, 1, dtype=torch.float64)

    def loss(p, b):  # type: ignore[no-untyped-def]
        return ((torch.func.functional_call(net, p, (b[0],)) - b[1]) ** 2).mean()

    grads = []
    for rule in (tmg.Unrolled(), tmg.Exact()):
        state = {k: v.clone() for k, v in net.state_dict().items()}
        out = tmg.adapt(loss, params, (x, y), steps=3, lr=0.05, rule=rule)
        grads.append(torch.autograd.grad(loss(out, (x, y)), list(params.values())))
        net.load_state_dict(state)
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_a_buffer_overwritten_then_read_is_refused_not_replayed_wrong():
    """``buf.copy_(x)`` then ``net(buf)``: the shield's replay would read the buffer as the
    forward left it (the last step's batch), not the copy (measured: Exact 0.056 off in
    absolute terms while FirstOrder and Truncated(1) happened to be right). Refused, as any
    outside tensor that the loss both writes and reads."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(),
                              torch.nn.Linear(8, 1)).double()  # fmt: skip
    params = dict(net.named_parameters())
    x, y = torch.randn(16, 3, dtype=torch.float64), torch.randn(16, 1, dtype=torch.float64)
    buf = torch.zeros(16, 3, dtype=torch.float64)

    def through_buffer(p, b):  # type: ignore[no-untyped-def]
        buf.copy_(b[0])
        return ((torch.func.functional_call(net, p, (buf,)) - b[1]) ** 2).mean()

    batches = [(x + k, y) for k in range(3)]
    out = tmg.adapt(through_buffer, params, batches=batches, steps=3, lr=0.05, rule=tmg.Exact())
    with pytest.raises(RuntimeError, match=r"updates a tensor of shape \(16, 3\) in place"):
        torch.autograd.grad(((out["2.bias"] - 1) ** 2).sum(), list(params.values()))
