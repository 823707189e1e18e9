"""``torch.func.vmap`` over a function that calls ``tmg.adapt`` (one task): every rule.

The meta-gradient under vmap must equal the loop over the same tasks (float64, 1e-10),
for every rule of the table, with shared and per-step batches, meta-parameters (a
learned lr, a frozen body, a closed-over coefficient) and per-task initial parameters.
"""

from __future__ import annotations

import pytest
import torch
import torchopt
from torch import nn
from torch.func import functional_call

import torchopt_metagrad as tmg
from tests.rules_under_test import ADAPT, for_each_rule

D = torch.float64
B, K = 3, 3
STEP_RULES = [tmg.Exact(), tmg.Binomial(2), tmg.Truncated(1), tmg.FirstOrder(), tmg.Unrolled()]


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(2, 6), nn.Tanh(), nn.Linear(6, 1)).to(D)


def _tasks(per_step: bool = False) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    shape = (B, K, 8, 2) if per_step else (B, 8, 2)
    x = torch.randn(*shape, dtype=D, generator=g)
    xq = torch.randn(B, 8, 2, dtype=D, generator=g)
    return {"x": x, "y": x.sum(-1, keepdim=True).sin(), "xq": xq, "yq": xq.sum(-1).sin()[..., None]}


def _rel(got: list[torch.Tensor], ref: list[torch.Tensor]) -> float:
    num = sum(float((a - b).norm() ** 2) for a, b in zip(got, ref, strict=True)) ** 0.5
    return num / sum(float(b.norm() ** 2) for b in ref) ** 0.5


def _vmap_vs_loop(task, data: dict[str, torch.Tensor], leaves: list[torch.Tensor]) -> float:  # type: ignore[no-untyped-def]
    names = list(data)
    vm = torch.func.vmap(lambda *a: task(**dict(zip(names, a, strict=True))))(*data.values())
    got = torch.autograd.grad(vm.sum(), leaves)
    loop = sum(task(**{n: t[b] for n, t in data.items()}) for b in range(B))
    ref = torch.autograd.grad(loop, leaves)
    assert vm.shape == (B,)
    return _rel(list(got), list(ref))


def _row_kwargs(row) -> dict:  # type: ignore[no-untyped-def]
    # Fixed-point rules need a converged inner loop; flow rules plain descent.
    if row.family == "fixed_point":
        return {"steps": 60, "lr": 0.1}
    return {"steps": K, "lr": 0.05}


@for_each_rule(front_end=ADAPT)
def test_every_rule_under_vmap_equals_the_loop_over_tasks(row):
    net = _net()
    params = dict(net.named_parameters())
    kw = _row_kwargs(row)

    def loss(p, b):  # type: ignore[no-untyped-def]
        return ((functional_call(net, p, (b[0],)) - b[1]) ** 2).mean()

    def task(x, y, xq, yq):  # type: ignore[no-untyped-def]
        out = tmg.adapt(loss, params, (x, y), rule=row.rule, **kw)
        return loss(out, (xq, yq))

    assert _vmap_vs_loop(task, _tasks(), list(params.values())) < 1e-10


@pytest.mark.parametrize("rule", STEP_RULES, ids=str)
def test_per_step_batches_and_meta_parameters_under_vmap(rule):
    """Per-step batches, a learned per-parameter lr shared by the tasks, a closed-over
    coefficient, and only the head adapted (the body a fixed entry)."""
    net = _net()
    params = dict(net.named_parameters())
    lr = {n: torch.full_like(params[n], 0.05, requires_grad=True) for n in ("2.weight", "2.bias")}
    coef = torch.tensor(0.01, dtype=D, requires_grad=True)

    def loss(p, b):  # type: ignore[no-untyped-def]
        value = ((functional_call(net, p, (b[0],)) - b[1]) ** 2).mean()
        return value + coef * (p["2.weight"] ** 2).sum()

    def task(x, y, xq, yq):  # type: ignore[no-untyped-def]
        batches = [(x[k], y[k]) for k in range(K)]
        out = tmg.adapt(loss, params, batches=batches, steps=K, lr=lr, rule=rule, adapt=list(lr))
        return loss(out, (xq, yq))

    leaves = [*params.values(), *lr.values(), coef]
    assert _vmap_vs_loop(task, _tasks(per_step=True), leaves) < 1e-10


@pytest.mark.parametrize("rule", [tmg.Exact(), tmg.Binomial(1), tmg.Unrolled()], ids=str)
def test_per_task_initial_parameters_and_torchopt_inner_optimizer(rule):
    """Initial parameters batched over tasks (in_dims=0), momentum SGD as the inner step."""
    net = _net()
    names = [n for n, _ in net.named_parameters()]
    base = torch.cat([p.detach().reshape(-1) for p in net.parameters()])
    shift = torch.linspace(-0.1, 0.1, B, dtype=D)[:, None]
    thetas = (base + shift).requires_grad_(True)  # (B, d): one init per task
    shapes = [p.shape for p in net.parameters()]

    def unflat(flat):  # type: ignore[no-untyped-def]
        return dict(
            zip(
                names,
                [
                    t.view(s)
                    for t, s in zip(flat.split([s.numel() for s in shapes]), shapes, strict=True)
                ],
                strict=True,
            )
        )

    def loss(p, b):  # type: ignore[no-untyped-def]
        return ((functional_call(net, p, (b[0],)) - b[1]) ** 2).mean()

    def task(theta, x, y, xq, yq):  # type: ignore[no-untyped-def]
        out = tmg.adapt(
            loss,
            unflat(theta),
            (x, y),
            steps=K,
            rule=rule,
            optimizer=torchopt.sgd(0.05, momentum=0.9),
        )
        return loss(out, (xq, yq))

    data = _tasks()
    vm = torch.func.vmap(task)(thetas, *data.values())
    (got,) = torch.autograd.grad(vm.sum(), thetas)
    loop = sum(task(thetas[b], *(t[b] for t in data.values())) for b in range(B))
    (ref,) = torch.autograd.grad(loop, thetas)
    assert _rel([got], [ref]) < 1e-10


def test_func_transforms_around_the_vmap_are_refused_with_a_clear_error():
    net = _net()
    x = torch.randn(B, 8, 2, dtype=D)

    def outer(flat):  # type: ignore[no-untyped-def]
        params = {"0.weight": flat.view(6, 2)} | {
            n: p for n, p in net.named_parameters() if n != "0.weight"
        }

        def task(xb):  # type: ignore[no-untyped-def]
            out = tmg.adapt(
                lambda p, b: functional_call(net, p, (b,)).pow(2).mean(),
                params,
                xb,
                steps=2,
                lr=0.1,
                rule=tmg.Exact(),
                adapt=["0.weight"],
            )
            return out["0.weight"].sum()

        return torch.func.vmap(task)(x).sum()

    with pytest.raises(RuntimeError, match="plain autograd outside the vmap"):
        torch.func.grad(outer)(net[0].weight.detach().reshape(-1).clone())


def test_module_optimizers_under_vmap_are_refused_with_a_clear_error():
    net = _net()
    x = torch.randn(B, 8, 2, dtype=D)

    def task(xb):  # type: ignore[no-untyped-def]
        opt = tmg.MetaSGD(net, lr=0.1, rule=tmg.Exact())
        opt.step(net(xb).pow(2).mean())
        return net(xb).sum()

    with pytest.raises(ValueError, match=r"inside torch\.func\.vmap"):
        torch.func.vmap(task)(x)


def test_flow_and_the_decorators_under_vmap_equal_the_loop():
    a = torch.tensor([[2.0, 0.3], [0.3, 1.0]], dtype=D)

    def loss(p, b):  # type: ignore[no-untyped-def]
        d = p["u"] - b
        return 0.5 * d @ a @ d

    u0 = torch.tensor([0.5, -0.2], dtype=D, requires_grad=True)
    centres = torch.randn(B, 2, dtype=D, generator=torch.Generator().manual_seed(3))
    solver = tmg.ODE("dopri5", rtol=1e-10, atol=1e-12)

    def task(c):  # type: ignore[no-untyped-def]
        out = tmg.flow(loss, {"u": u0}, c, T=1.0, solver=solver, save_every=0.25)
        return (out["u"] ** 2).sum()

    vm = torch.func.vmap(task)(centres)
    (got,) = torch.autograd.grad(vm.sum(), u0)
    (ref,) = torch.autograd.grad(sum(task(centres[b]) for b in range(B)), u0)
    assert _rel([got], [ref]) < 1e-10

    @tmg.implicit(loss, rule=tmg.ImplicitCG(1.0, tol=1e-12, maxiter=50))
    def solve(params, c):  # type: ignore[no-untyped-def]
        # The proximal minimizer of loss + 1/2 ||u - u0||^2 in closed form.
        eye = torch.eye(2, dtype=D)
        return {"u": torch.linalg.solve(a + eye, a @ c + params["u"])}

    def task2(c):  # type: ignore[no-untyped-def]
        return (solve({"u": u0}, c)["u"] ** 2).sum()

    vm = torch.func.vmap(task2)(centres)
    (got,) = torch.autograd.grad(vm.sum(), u0)
    (ref,) = torch.autograd.grad(sum(task2(centres[b]) for b in range(B)), u0)
    assert _rel([got], [ref]) < 1e-10


@pytest.mark.parametrize("rule", STEP_RULES, ids=str)
@pytest.mark.parametrize("per_step", [False, True], ids=["shared batch", "per-step batches"])
def test_tasks_run_together_when_the_loss_is_a_pure_function(rule, per_step):
    """The batched path: the loss runs once per step for all tasks (traced by vmap), not
    once per task, and the meta-gradient still equals the loop's. Unrolled runs task by
    task (plain autograd through torch.func.grad is wrong on conv + batch norm nets in
    torch 2.13: tests/test_functorch_example.py)."""
    net = _net()
    params = dict(net.named_parameters())
    calls = {"n": 0}

    def loss(p, b):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        return ((functional_call(net, p, (b[0],)) - b[1]) ** 2).mean()

    def task(x, y, xq, yq):  # type: ignore[no-untyped-def]
        batches = [(x[k], y[k]) for k in range(K)] if per_step else None
        batch = None if per_step else (x, y)
        out = tmg.adapt(loss, params, batch, batches=batches, steps=K, lr=0.05, rule=rule)
        return loss(out, (xq, yq))

    data = _tasks(per_step=per_step)
    vm = torch.func.vmap(task)(*data.values())
    forward_calls = calls["n"]
    if isinstance(rule, tmg.Unrolled):
        assert forward_calls >= B * K
    else:
        # K batched steps, one probe per distinct batch (1 or K), the query loss
        assert forward_calls <= 2 * K + 2
    got = torch.autograd.grad(vm.sum(), list(params.values()))
    loop = sum(task(*(t[b] for t in data.values())) for b in range(B))
    ref = torch.autograd.grad(loop, list(params.values()))
    assert _rel(list(got), list(ref)) < 1e-10


def test_a_loss_with_dropout_runs_task_by_task_with_its_own_masks():
    net = nn.Sequential(nn.Linear(2, 6), nn.Tanh(), nn.Dropout(0.5), nn.Linear(6, 1)).to(D)
    params = dict(net.named_parameters())

    def loss(p, b):  # type: ignore[no-untyped-def]
        return ((functional_call(net, p, (b[0],)) - b[1]) ** 2).mean()

    def task(x, y, xq, yq):  # type: ignore[no-untyped-def]
        out = tmg.adapt(loss, params, (x, y), steps=K, lr=0.05, rule=tmg.Exact())
        net.eval()
        value = loss(out, (xq, yq))
        net.train()
        return value

    data = _tasks()
    torch.manual_seed(5)
    vm = torch.func.vmap(task)(*data.values())
    got = torch.autograd.grad(vm.sum(), list(params.values()))
    torch.manual_seed(5)  # the same draws, task after task
    loop = sum(task(*(t[b] for t in data.values())) for b in range(B))
    ref = torch.autograd.grad(loop, list(params.values()))
    assert _rel(list(got), list(ref)) < 1e-10


def test_batch_norm_in_the_loss_runs_task_by_task_and_updates_the_statistics_once():
    def make():  # type: ignore[no-untyped-def]
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(2, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 1)).to(D)

    def run(vmapped: bool):  # type: ignore[no-untyped-def]
        net = make()
        params = dict(net.named_parameters())

        def loss(p, b):  # type: ignore[no-untyped-def]
            return ((functional_call(net, p, (b[0],)) - b[1]) ** 2).mean()

        def task(x, y, xq, yq):  # type: ignore[no-untyped-def]
            out = tmg.adapt(loss, params, (x, y), steps=K, lr=0.05, rule=tmg.Exact())
            # (an outer loss through the net would read running statistics, which a
            # vmap updates for all tasks before any outer loss, a loop task by task)
            return sum(((t - 0.1) ** 2).sum() for t in out.values()) * xq.mean() + yq.mean()

        data = _tasks()
        if vmapped:
            total = torch.func.vmap(task)(*data.values()).sum()
        else:
            total = sum(task(*(t[b] for t in data.values())) for b in range(B))
        grads = torch.autograd.grad(total, list(params.values()))
        return list(grads), net[1].running_mean.clone()

    (got, stats), (ref, ref_stats) = run(True), run(False)
    assert torch.allclose(stats, ref_stats, rtol=0, atol=1e-14)
    assert _rel(got, ref) < 1e-10
