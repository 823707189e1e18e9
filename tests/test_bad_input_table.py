"""The README's "Bad inputs and what they get" table: the rows no other test file checks,
and a check that every test the table names exists (so the table cannot rot)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

import torchopt_metagrad as tmg
from tests.test_bad_inputs import _problem  # the same tiny ReLU net and loss

D = torch.float64
ROOT = Path(__file__).resolve().parent.parent


def _meta_grad(net, loss, x, y, **kw):  # type: ignore[no-untyped-def]
    params = dict(net.named_parameters())
    out = tmg.adapt(loss, params, (x, y), lr=0.1, **kw)
    return torch.autograd.grad(loss(out, (x * 0.5, y)), list(params.values()))


def test_numpy_integers_are_accepted_wherever_an_int_is():
    net, loss, x, y = _problem()
    for numpy_kw, int_kw in [
        ({"steps": np.int64(3), "rule": tmg.Exact()}, {"steps": 3, "rule": tmg.Exact()}),
        ({"steps": 3, "rule": tmg.Binomial(np.int64(2))}, {"steps": 3, "rule": tmg.Binomial(2)}),
        ({"steps": 3, "rule": tmg.Truncated(np.int32(2))}, {"steps": 3, "rule": tmg.Truncated(2)}),
        (
            {"steps": 3, "rule": tmg.Binomial(2, chunk_size=np.int64(1))},
            {"steps": 3, "rule": tmg.Binomial(2, chunk_size=1)},
        ),
    ]:
        got, ref = _meta_grad(net, loss, x, y, **numpy_kw), _meta_grad(net, loss, x, y, **int_kw)
        assert all(torch.equal(a, b) for a, b in zip(got, ref, strict=True))

    theta = torch.tensor([1.0, -2.0], dtype=D, requires_grad=True)
    solve = tmg.ImplicitCG(1.0, maxiter=np.int64(5))
    for argnums in (np.int64(1), (np.int32(1),)):

        @tmg.custom_root(lambda x, t: x - t, argnums=argnums, solve=solve)
        def root(x0, t):  # type: ignore[no-untyped-def]
            return t.detach().clone()

        (grad,) = torch.autograd.grad((root(torch.zeros(2, dtype=D), theta) ** 2).sum(), theta)
        assert torch.allclose(grad, 2 * theta.detach())  # x*(theta) = theta


def test_a_complex_loss_is_refused_naming_its_dtype():
    net, loss, x, y = _problem()
    with pytest.raises(TypeError, match=r"real scalar tensor, got dtype torch\.complex128"):
        tmg.adapt(
            lambda p, b: loss(p, b).to(torch.complex128),
            dict(net.named_parameters()),
            (x, y),
            steps=2,
            lr=0.1,
            rule=tmg.Exact(),
        )


@pytest.mark.parametrize("data", ["nan", "empty"])
@pytest.mark.parametrize("front", ["adapt", "MetaSGD", "flow"])
def test_nan_data_or_an_empty_batch_raise_naming_the_likely_causes(front, data):
    net, loss, x, y = _problem()
    if data == "nan":
        x = x.clone()
        x[3, 1] = float("nan")
    else:
        x, y = x[:0], y[:0]
    params = dict(net.named_parameters())
    with pytest.raises(tmg.NonFiniteError, match=r"NaN or inf in the batch .* an empty batch"):
        if front == "adapt":
            tmg.adapt(loss, params, (x, y), steps=2, lr=0.1, rule=tmg.Exact())
        elif front == "MetaSGD":
            tmg.MetaSGD(net, lr=0.1, rule=tmg.Exact()).step(F.mse_loss(net(x), y))
        else:  # without the check: an ODE error at t=nan, or (empty) params returned unchanged
            tmg.flow(loss, params, (x, y), T=0.1, solver=tmg.ODE("euler"))


def test_flow_checks_its_loss_at_the_start():
    net, _, x, y = _problem()
    params = dict(net.named_parameters())
    with pytest.raises(ValueError, match=r"functional_call\(net, params, \(x,\)\) rather than"):
        tmg.flow(lambda p, b: F.mse_loss(net(b[0]), b[1]), params, (x, y), T=0.1)
    with pytest.raises(ValueError, match=r"scalar tensor, got shape \(8, 1\)"):
        tmg.flow(lambda p, b: (functional_call(net, p, (b[0],)) - b[1]) ** 2, params, (x, y), T=0.1)


@pytest.mark.parametrize("rule", [tmg.Exact(), tmg.Binomial(2), tmg.Binomial("auto")], ids=str)
def test_implicit_decorator_refuses_step_rules_up_front(rule):
    """Before the fix, Exact() here returned the outer gradient g with no error."""
    _, loss, _, _ = _problem()
    with pytest.raises(ValueError, match=r"differentiates discrete inner steps.*tmg\.implicit"):
        tmg.implicit(loss, rule)


@pytest.mark.parametrize("front", ["MetaAdam", "innerloop_ctx(torch.optim.Adam)"])
def test_adam_at_a_dead_unit_names_eps_root_through_the_module_front_ends(front):
    net, _, x, y = _problem()
    with torch.no_grad():
        net[0].bias[:3] = -100.0  # three dead ReLU units: zero gradients, sqrt at zero
    with pytest.raises(tmg.NonFiniteError, match=r"dead ReLU unit.*eps_root"):
        if front == "MetaAdam":
            opt = tmg.MetaAdam(net, lr=0.01, rule=tmg.Exact())
            for _ in range(2):
                opt.step(F.mse_loss(net(x), y))
            F.mse_loss(net(x), y).backward()
        else:
            inner = torch.optim.Adam(net.parameters(), lr=0.01)
            with tmg.innerloop_ctx(net, inner, rule=tmg.Exact()) as (fnet, diffopt):
                for _ in range(2):
                    diffopt.step(F.mse_loss(fnet(x), y))
                F.mse_loss(fnet(x), y).backward()


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (lambda n: tmg.MetaSGD(n, 0.1, rule=tmg.Exact(), momentum=-1), ValueError, "momentum"),
        (lambda n: tmg.MetaSGD(n, 0.1, rule=tmg.Exact(), dampening=-0.1), ValueError, "dampen"),
        (lambda n: tmg.MetaSGD(n, 0.1, rule=tmg.Exact(), weight_decay=np.nan), ValueError, "wei"),
        (lambda n: tmg.MetaSGD(n, 0.1, rule=tmg.Exact(), momentum="a"), TypeError, "momentum"),
        (lambda n: tmg.MetaAdam(n, rule=tmg.Exact(), eps_root=-1.0), ValueError, "eps_root"),
        (lambda n: tmg.MetaAdam(n, rule=tmg.Exact(), eps=-1.0), ValueError, "eps must"),
        (lambda n: tmg.MetaAdam(n, rule=tmg.Exact(), betas=(0.9,)), TypeError, "betas must"),
        (lambda n: tmg.MetaAdam(n, rule=tmg.Exact(), betas=(1.0, 0.9)), ValueError, r"betas\[0\]"),
    ],
)
def test_module_optimizer_knobs_are_refused_naming_them(make, error, match):
    """Before the fix: torch.optim's errors from inside the library, and eps_root < 0
    (a square root of a negative number later) accepted."""
    net, _, _, _ = _problem()
    with pytest.raises(error, match=match):
        make(net)


def test_innerloop_ctx_with_an_unknown_device_names_device():
    net, _, _, _ = _problem()
    with (
        pytest.raises(ValueError, match=r"device must be a torch\.device or a device string"),
        tmg.innerloop_ctx(net, 0.1, rule=tmg.Exact(), device="nodevice"),
    ):
        pass


def test_distributed_helpers_refuse_bad_input_naming_it():
    cpu = torch.device("cpu")
    alone = tmg.distributed.RankInfo(0, 1, 0, cpu)
    with pytest.raises(TypeError, match=r"global_batch must be an int, got 2\.5"):
        tmg.distributed.share(2.5, alone)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="global_batch must be an int"):
        tmg.distributed.task_range(4.0, alone)  # type: ignore[arg-type]
    assert tmg.distributed.share(np.int64(5), tmg.distributed.RankInfo(0, 2, 0, cpu)) == 3
    with pytest.raises(ValueError, match="backend must be 'nccl' or 'gloo', got 'mpi'"):
        tmg.distributed.setup("mpi")  # refused alone too, not only under torchrun
    w = torch.ones(2, requires_grad=True)
    with pytest.raises(TypeError, match=r"got one tensor \(wrap it in a list\)"):
        tmg.distributed.average_meta_gradients(w)  # would iterate rows without .grad
    with pytest.raises(TypeError, match="params must be a module or an iterable of tensors"):
        tmg.distributed.average_meta_gradients(3)  # type: ignore[arg-type]


# ---- the table itself -------------------------------------------------------------------

TEST_ID = re.compile(r"`(tests/[\w/]+\.py)::(\w+)`")


def _table_rows() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Bad inputs and what they get", 1)[1].split("\n## ", 1)[0]
    return [line for line in section.splitlines() if line.startswith("| ") and "---" not in line]


def test_every_test_the_readme_bad_input_table_names_exists():
    rows = _table_rows()[1:]  # past the header
    assert len(rows) >= 30
    for row in rows:
        ids = TEST_ID.findall(row.rsplit("|", 2)[-2])  # the last column
        assert ids, f"a row names no test: {row}"
        for path, name in ids:
            tree = ast.parse((ROOT / path).read_text())
            defined = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
            assert name in defined, f"{path}::{name} (named in the README table) does not exist"
