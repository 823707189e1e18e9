"""Meta-parameters through ``tmg.adapt``: every tensor the inner loop depends on besides
the adapted params gets its meta-gradient under every rule.

Meta-parameters covered (float64 tanh MLP 3 -> 5 -> 2, d = 32, K = 4 inner steps):

* a learned step size: per-parameter dict (Meta-SGD), per-step ``(steps,)`` tensor
  (MAML++), scalar 0-dim tensor; leaves, non-leaves (``log_lr.exp()``), constant tensors;
* ``adapt=[head]``: a frozen body passed as fixed entries of ``params`` (leaves requiring
  grad, a non-leaf, a constant), and precomputed features from a body outside;
* tensors ``loss_fn`` closes over: a body's parameters, a weight-decay coefficient
  (the library may refuse them, naming their shape);
* a weight-decay coefficient passed as a fixed entry of ``params``.

Oracles (``tests/meta_oracles.py``, independent of the library): the brute-force float64
adjoint estimates of every rule (``dL/dw = direct + sum_k B_k^T vhat_{k+1}``), validated
here against plain autograd through a hand-written unrolled loop; and the closed form
of the proximal minimizer of a quadratic for the implicit rules.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
import torchopt
from meta_oracles import (
    BODY,
    DTYPE,
    HEAD,
    MLP_NAMES,
    Inner,
    MetaOracle,
    MetaProblem,
    ProximalQuadratic,
    init_mlp,
    make_data,
    mlp,
    mse,
    rel_err,
    unrolled_reference,
)
from torch import Tensor

import torchopt_metagrad as tmg

K = 4
LR = 0.3
RTOL = 1e-10

GD = Inner()
MOMENTUM = Inner("momentum", lr=0.1)
ADAM = Inner("adam", lr=0.05)
INNERS = {"gd": GD, "momentum": MOMENTUM, "adam": ADAM}

# initial learned step sizes
LR_STEPS_ALL = torch.tensor([0.3, 0.2, 0.25, 0.15, 0.3, 0.2, 0.1], dtype=DTYPE)
LR_STEPS = LR_STEPS_ALL[:K]
LR_SCALAR = torch.tensor(0.25, dtype=DTYPE)


def _lr_dict_values() -> dict[str, Tensor]:
    gen = torch.Generator().manual_seed(7)
    init = init_mlp()
    return {
        "body.weight": 0.1
        + 0.2 * torch.rand(init["body.weight"].shape, generator=gen, dtype=DTYPE),
        "body.bias": torch.tensor(0.2, dtype=DTYPE),
        "head.weight": 0.1
        + 0.2 * torch.rand(init["head.weight"].shape, generator=gen, dtype=DTYPE),
        "head.bias": torch.tensor(0.15, dtype=DTYPE),
    }


LR_DICT = _lr_dict_values()
WD = torch.tensor(0.2, dtype=DTYPE)


# ------------------------------------------------------------------------------ the cases
@dataclass
class Instance:
    """Fresh library inputs for one case, and what to compare after the outer backward.

    ``targets``: label -> (tensor whose ``.grad`` is read, expected value from the oracle's
    ``{"theta": ..., "meta": ...}``); ``closed``: closed-over tensors requiring grad (a
    refusal must name one of their shapes); ``fixed``: names of ``params`` held fixed.
    """

    params: dict[str, Tensor]
    kwargs: dict[str, Any]
    loss_fn: Callable[[dict[str, Tensor], Any], Tensor]
    outer: Callable[[dict[str, Tensor]], Tensor]
    targets: dict[str, tuple[Tensor, Callable[[dict], Tensor]]]
    closed: list[Tensor] = field(default_factory=list)
    fixed: list[str] = field(default_factory=list)
    steps: int = K


def _theta(n: str) -> Callable[[dict], Tensor]:
    return lambda G: G["theta"][n]


def _meta(n: str, scale: Any = 1.0) -> Callable[[dict], Tensor]:
    return lambda G: G["meta"][n] * scale


def _leaves(values: dict[str, Tensor], names=None) -> dict[str, Tensor]:
    names = list(values) if names is None else names
    return {n: values[n].clone().requires_grad_(True) for n in names}


def _l2(p: dict[str, Tensor], names) -> Tensor:
    return sum((p[n] * p[n]).sum() for n in names)


CASES = (
    "lr_dict",
    "lr_dict_partial",
    "lr_steps",
    "lr_scalar",
    "frozen_body",
    "frozen_body_lr_dict",
    "frozen_nonleaf",
    "features",
    "closed_body",
    "wd_closed",
    "wd_closed_nonleaf",
    "wd_fixed",
)
#: cases whose fixed / closed-over tensors are parameters or loss hyperparameters
#: (no learned lr): they run with momentum and Adam too
STATEFUL_CASES = ("frozen_body", "features", "closed_body", "wd_closed", "wd_fixed")
#: precomputed features are one tensor for one batch
SHARED_ONLY = ("features",)


def build(
    case: str, per_step: bool, inner: Inner = GD, steps: int = K
) -> tuple[Instance, MetaProblem]:
    """Fresh library inputs and the oracle's problem (same values) for one case."""
    inst, prob = _build(case, per_step, inner, steps)
    inst.steps = steps
    return inst, prob


def _build(case: str, per_step: bool, inner: Inner, steps: int) -> tuple[Instance, MetaProblem]:
    data = make_data(steps, per_step=per_step)
    init = init_mlp()
    bs = data.inner

    def model_loss(p: dict[str, Tensor], batch) -> Tensor:
        return mse(mlp(p, batch[0]), batch[1])

    kw: dict[str, Any] = {"batches": list(bs)} if per_step else {"batch": bs[0]}
    if inner.kind == "gd":
        kw["lr"] = LR
        const_lr = lambda w, k, n: LR  # noqa: E731
    else:
        kw["optimizer"] = inner.torchopt()
        const_lr = None
    outer_batch = data.outer

    def problem(theta, meta, inner_loss, outer_loss, step_size=const_lr) -> MetaProblem:
        return MetaProblem(theta, meta, inner_loss, outer_loss, steps, step_size, inner)

    def theta_targets(params: dict[str, Tensor], names) -> dict:
        return {f"theta:{n}": (params[n], _theta(n)) for n in names}

    plain_inner = lambda phi, w, k: model_loss(phi, bs[k])  # noqa: E731
    plain_outer = lambda phi, w: model_loss(phi, outer_batch)  # noqa: E731

    if case in ("lr_dict", "lr_dict_partial", "lr_steps", "lr_scalar"):
        assert inner.kind == "gd"
        params = _leaves(init)
        targets = theta_targets(params, MLP_NAMES)
        if case == "lr_dict":
            lr = _leaves(LR_DICT)
            meta = {f"lr:{n}": LR_DICT[n] for n in MLP_NAMES}
            step_size = lambda w, k, n: w[f"lr:{n}"]  # noqa: E731
            targets |= {f"lr:{n}": (lr[n], _meta(f"lr:{n}")) for n in MLP_NAMES}
        elif case == "lr_dict_partial":  # body's step sizes are constant tensors
            lr = _leaves(LR_DICT, HEAD) | {n: LR_DICT[n].clone() for n in BODY}
            meta = {f"lr:{n}": LR_DICT[n] for n in HEAD}
            step_size = lambda w, k, n: w[f"lr:{n}"] if n in HEAD else LR_DICT[n]  # noqa: E731
            targets |= {f"lr:{n}": (lr[n], _meta(f"lr:{n}")) for n in HEAD}
        elif case == "lr_steps":
            lr = LR_STEPS_ALL[:steps].clone().requires_grad_(True)
            meta = {"lr": LR_STEPS_ALL[:steps]}
            step_size = lambda w, k, n: w["lr"][k]  # noqa: E731
            targets["lr"] = (lr, _meta("lr"))
        else:
            lr = LR_SCALAR.clone().requires_grad_(True)
            meta = {"lr": LR_SCALAR}
            step_size = lambda w, k, n: w["lr"]  # noqa: E731
            targets["lr"] = (lr, _meta("lr"))
        kw["lr"] = lr
        inst = Instance(params, kw, model_loss, lambda a: model_loss(a, outer_batch), targets)
        return inst, problem(init, meta, plain_inner, plain_outer, step_size)

    if case in ("frozen_body", "frozen_body_lr_dict"):
        params = _leaves(init)
        kw["adapt"] = list(HEAD)
        targets = theta_targets(params, HEAD)
        targets |= {f"fixed:{n}": (params[n], _meta(f"fixed:{n}")) for n in BODY}
        meta = {f"fixed:{n}": init[n] for n in BODY}
        step_size = const_lr
        if case == "frozen_body_lr_dict":
            assert inner.kind == "gd"
            lr = _leaves(LR_DICT, HEAD)
            kw["lr"] = lr
            meta |= {f"lr:{n}": LR_DICT[n] for n in HEAD}
            step_size = lambda w, k, n: w[f"lr:{n}"]  # noqa: E731
            targets |= {f"lr:{n}": (lr[n], _meta(f"lr:{n}")) for n in HEAD}

        def with_body(phi, w):
            return {**phi, **{n: w[f"fixed:{n}"] for n in BODY}}

        inst = Instance(
            params, kw, model_loss, lambda a: model_loss(a, outer_batch), targets, fixed=list(BODY)
        )
        prob = problem(
            {n: init[n] for n in HEAD},
            meta,
            lambda phi, w, k: model_loss(with_body(phi, w), bs[k]),
            lambda phi, w: model_loss(with_body(phi, w), outer_batch),
            step_size,
        )
        return inst, prob

    if case == "frozen_nonleaf":
        # body.weight a non-leaf (2 * raw), body.bias a constant that does not require grad
        raw = (init["body.weight"] / 2).requires_grad_(True)
        params = _leaves(init, HEAD) | {
            "body.weight": raw * 2,
            "body.bias": init["body.bias"].clone(),
        }
        kw["adapt"] = list(HEAD)
        targets = theta_targets(params, HEAD)
        targets["fixed:body.weight"] = (params["body.weight"], _meta("fixed:body.weight"))
        targets["raw"] = (raw, _meta("fixed:body.weight", 2.0))

        def with_body(phi, w):
            return {**phi, "body.weight": w["fixed:body.weight"], "body.bias": init["body.bias"]}

        inst = Instance(
            params, kw, model_loss, lambda a: model_loss(a, outer_batch), targets, fixed=list(BODY)
        )
        prob = problem(
            {n: init[n] for n in HEAD},
            {"fixed:body.weight": init["body.weight"]},
            lambda phi, w, k: model_loss(with_body(phi, w), bs[k]),
            lambda phi, w: model_loss(with_body(phi, w), outer_batch),
        )
        return inst, prob

    if case == "features":
        # ANIL-style: the body runs outside, its features are a fixed (non-leaf) entry
        assert not per_step
        body = _leaves(init, BODY)
        x = bs[0][0]
        feats = torch.tanh(x @ body["body.weight"].T + body["body.bias"])
        params = _leaves(init, HEAD) | {"feats": feats}
        kw["adapt"] = list(HEAD)

        def head_loss(p, batch):
            return mse(p["feats"] @ p["head.weight"].T + p["head.bias"], batch[1])

        targets = theta_targets(params, HEAD)
        targets |= {f"body:{n}": (body[n], _meta(n)) for n in BODY}

        def body_feats(w):
            return torch.tanh(x @ w["body.weight"].T + w["body.bias"])

        inst = Instance(
            params,
            kw,
            head_loss,
            lambda a: model_loss({**a, **body}, outer_batch),
            targets,
            fixed=["feats"],
        )
        prob = problem(
            {n: init[n] for n in HEAD},
            {n: init[n] for n in BODY},
            lambda phi, w, k: head_loss({**phi, "feats": body_feats(w)}, bs[k]),
            lambda phi, w: model_loss({**phi, **w}, outer_batch),
        )
        return inst, prob

    if case == "closed_body":
        body = _leaves(init, BODY)  # like a body's nn.Parameters, closed over by loss_fn
        params = _leaves(init, HEAD)
        targets = theta_targets(params, HEAD)
        targets |= {f"closed:{n}": (body[n], _meta(f"closed:{n}")) for n in BODY}

        def with_closed(phi, w):
            return {**phi, **{n: w[f"closed:{n}"] for n in BODY}}

        inst = Instance(
            params,
            kw,
            lambda p, batch: model_loss({**p, **body}, batch),
            lambda a: model_loss({**a, **body}, outer_batch),
            targets,
            closed=list(body.values()),
        )
        prob = problem(
            {n: init[n] for n in HEAD},
            {f"closed:{n}": init[n] for n in BODY},
            lambda phi, w, k: model_loss(with_closed(phi, w), bs[k]),
            lambda phi, w: model_loss(with_closed(phi, w), outer_batch),
        )
        return inst, prob

    if case in ("wd_closed", "wd_closed_nonleaf", "wd_fixed"):
        params = _leaves(init)
        targets = theta_targets(params, MLP_NAMES)

        def inner_loss(phi, w, k):
            return model_loss(phi, bs[k]) + 0.5 * w["wd"] * _l2(phi, MLP_NAMES)

        def outer_loss(phi, w):
            return model_loss(phi, outer_batch) + w["wd"] ** 2

        prob = problem(init, {"wd": WD}, inner_loss, outer_loss)
        if case == "wd_fixed":
            wd = WD.clone().requires_grad_(True)
            params["wd"] = wd
            kw["adapt"] = list(MLP_NAMES)
            targets["wd"] = (wd, _meta("wd"))
            inst = Instance(
                params,
                kw,
                lambda p, b: model_loss(p, b) + 0.5 * p["wd"] * _l2(p, MLP_NAMES),
                lambda a: model_loss(a, outer_batch) + a["wd"] ** 2,  # the input tensor itself
                targets,
                fixed=["wd"],
            )
            return inst, prob
        if case == "wd_closed":
            wd = WD.clone().requires_grad_(True)
            targets["wd"] = (wd, _meta("wd"))
        else:
            log_wd = WD.log().requires_grad_(True)
            wd = log_wd.exp()
            targets["wd"] = (wd, _meta("wd"))
            targets["log_wd"] = (log_wd, _meta("wd", float(WD)))
        inst = Instance(
            params,
            kw,
            lambda p, b: model_loss(p, b) + 0.5 * wd * _l2(p, MLP_NAMES),
            lambda a: model_loss(a, outer_batch) + wd**2,
            targets,
            closed=[wd],
        )
        return inst, prob

    raise ValueError(case)


@functools.cache
def oracle(case: str, per_step: bool, inner: str = "gd", steps: int = K) -> MetaOracle:
    return MetaOracle(build(case, per_step, INNERS[inner], steps)[1])


# ------------------------------------------------------------------------------ running
def shape_pattern(shape: torch.Size) -> re.Pattern:
    """How an error message may spell a tensor's shape."""
    dims = list(shape)
    if not dims:
        return re.compile(r"\(\)|\[\]|0-dim|zero-dim|scalar|shape \(\)", re.IGNORECASE)
    sep = r",\s*"
    inner = sep.join(str(s) for s in dims)
    one = r",?" if len(dims) == 1 else ""
    return re.compile(rf"\(\s*{inner}{one}\s*\)|\[\s*{inner}\s*\]|{'x'.join(map(str, dims))}")


class Refused(Exception):
    """The library refused the closed-over tensors, as the spec allows."""


def run_lib(inst: Instance, rule: tmg.AbstractRule, *, use_autograd_grad: bool = False):
    """Run ``tmg.adapt``, the outer backward; ``{label: meta-gradient}``.

    Raises :class:`Refused` when the library refuses closed-over tensors with an error
    naming one of their shapes (any other error propagates).
    """
    for t, _ in inst.targets.values():
        if not t.is_leaf:
            t.retain_grad()
    try:
        adapted = tmg.adapt(inst.loss_fn, inst.params, rule=rule, steps=inst.steps, **inst.kwargs)
        assert set(adapted) == set(inst.params)
        for n in inst.fixed:
            assert adapted[n] is inst.params[n], f"fixed entry {n!r} is not the input tensor"
        outer = inst.outer(adapted)
        if use_autograd_grad:
            labels = list(inst.targets)
            grads = torch.autograd.grad(outer, [inst.targets[lb][0] for lb in labels])
            return dict(zip(labels, grads))
        outer.backward()
    except (ValueError, TypeError) as e:
        if not inst.closed:
            raise
        msg = str(e)
        assert any(shape_pattern(t.shape).search(msg) for t in inst.closed), (
            f"refusal of a closed-over tensor does not name its shape: {msg}"
        )
        raise Refused(msg) from e
    return {label: t.grad for label, (t, _) in inst.targets.items()}


def check(got: dict[str, Tensor | None], expected: dict, targets, rtol: float = RTOL) -> None:
    errors = {}
    for label, (_, exp_fn) in targets.items():
        exp = exp_fn(expected)
        g = got[label]
        assert g is not None, f"{label}: no meta-gradient (.grad is None)"
        assert g.shape == exp.shape, (label, g.shape, exp.shape)
        err = float((g - exp).norm() / exp.norm().clamp_min(1e-300))
        if err > rtol:
            errors[label] = f"rel err {err:.2e} (|expected| {float(exp.norm()):.3e})"
    assert not errors, errors


def expected_for(case: str, per_step: bool, inner: str, kind: str, order: int | None):
    return oracle(case, per_step, inner).grads(kind, order)


# ------------------------------------------------------------------------------ rules
def _rules(steps: int) -> list[tuple[str, str, int | None, tmg.AbstractRule]]:
    rows = [("FirstOrder", "first_order", None, tmg.FirstOrder())]
    rows += [(f"Truncated{L}", "truncated", L, tmg.Truncated(L)) for L in range(steps + 1)]
    rows += [(f"Binomial{L}", "binomial", L, tmg.Binomial(L)) for L in range(steps + 1)]
    rows += [("Exact", "exact", None, tmg.Exact()), ("Unrolled", "exact", None, tmg.Unrolled())]
    return rows


RULES = _rules(K)
RULE_PARAMS = [pytest.param(kind, order, rule, id=name) for name, kind, order, rule in RULES]


def _case_params(cases=CASES):
    out = []
    for case in cases:
        for per_step in (True, False):
            if per_step and case in SHARED_ONLY:
                continue
            out.append(
                pytest.param(case, per_step, id=f"{case}-{'batches' if per_step else 'batch'}")
            )
    return out


def _case_inner_params(*, all_batchings: bool):
    """(case, per_step, inner): GD for every case; momentum and Adam for the cases without
    a learned lr (per-step batches only unless ``all_batchings``)."""
    out = []
    for p in _case_params():
        case, per_step = p.values
        for inner in INNERS:
            if inner != "gd" and case not in STATEFUL_CASES:
                continue  # a learned lr is plain gradient descent only
            if inner != "gd" and not (all_batchings or per_step or case in SHARED_ONLY):
                continue
            out.append(pytest.param(case, per_step, inner, id=f"{p.id}-{inner}"))
    return out


# ------------------------------------------------- 0. the oracle itself (no new library API)
@pytest.mark.parametrize(("case", "per_step", "inner"), _case_inner_params(all_batchings=True))
def test_oracle_exact_equals_unrolled_autograd(case, per_step, inner):
    o = oracle(case, per_step, inner)
    ref = unrolled_reference(o.problem)
    exact = o.grads("exact")
    for part in ("theta", "meta"):
        assert set(exact[part]) == set(ref[part])
        for n in ref[part]:
            assert rel_err(exact[part][n], ref[part][n]) <= 1e-12, (part, n)


@pytest.mark.parametrize(("case", "per_step"), _case_params(("lr_dict", "frozen_body", "wd_fixed")))
def test_oracle_identities(case, per_step):
    o = oracle(case, per_step)
    ex, fo = o.grads("exact"), o.grads("first_order")
    for a, b in [
        (o.grads("binomial", K), ex),
        (o.grads("truncated", K), ex),
        (o.grads("binomial", 0), fo),
        (o.grads("truncated", 0), fo),
    ]:
        for part in a:
            for n in a[part]:
                assert rel_err(a[part][n], b[part][n]) <= 1e-12, (part, n)
    # Binomial(1) and Truncated(1) differ from each other and from both ends
    b1, t1 = o.grads("binomial", 1)["meta"], o.grads("truncated", 1)["meta"]
    n = next(iter(b1))
    assert rel_err(b1[n], t1[n]) > 1e-6 and rel_err(b1[n], ex["meta"][n]) > 1e-6


def test_oracle_implicit_formula_equals_closed_form():
    q = ProximalQuadratic.make()
    for reg in (2.0, 10.0):
        a, b = q.closed_form(reg), q.implicit_formula(reg)
        for k in a:
            assert rel_err(b[k], a[k]) <= 1e-12, (reg, k)


# ------------------------------------------------- 1. every rule and order vs the oracle
@pytest.mark.parametrize(("kind", "order", "rule"), RULE_PARAMS)
@pytest.mark.parametrize(("case", "per_step"), _case_params())
def test_rule_matches_oracle(case, per_step, kind, order, rule):
    inst, _ = build(case, per_step)
    try:
        got = run_lib(inst, rule)
    except Refused:
        return  # allowed for closed-over tensors (the message names the shape)
    check(got, expected_for(case, per_step, "gd", kind, order), inst.targets)


@pytest.mark.parametrize(("kind", "order", "rule"), RULE_PARAMS)
@pytest.mark.parametrize("inner", ["momentum", "adam"])
@pytest.mark.parametrize("case", ["frozen_body", "wd_fixed", "wd_closed"])
def test_rule_matches_oracle_with_momentum_and_adam(case, inner, kind, order, rule):
    inst, _ = build(case, True, INNERS[inner])
    try:
        got = run_lib(inst, rule)
    except Refused:
        return
    check(got, expected_for(case, True, inner, kind, order), inst.targets)


LONG = 6


@pytest.mark.parametrize(
    ("kind", "order", "rule"),
    [
        pytest.param("binomial", 2, tmg.Binomial(2), id="Binomial2"),
        pytest.param("binomial", 3, tmg.Binomial(3, chunk_size=2), id="Binomial3-chunk2"),
        pytest.param("binomial", 2, tmg.Binomial(2, vectorize=False), id="Binomial2-loop"),
        pytest.param("binomial", LONG, tmg.Binomial(LONG), id=f"Binomial{LONG}"),
        pytest.param("truncated", 3, tmg.Truncated(3), id="Truncated3"),
        pytest.param("exact", None, tmg.Exact(), id="Exact"),
    ],
)
@pytest.mark.parametrize("case", ["frozen_body_lr_dict", "lr_steps", "wd_closed"])
def test_longer_loop_and_binomial_options_match_oracle(case, kind, order, rule):
    """K = 6 (up to 64 subsets per adjoint), Binomial's chunked and looped stages."""
    inst, _ = build(case, True, steps=LONG)
    try:
        got = run_lib(inst, rule)
    except Refused:
        return
    check(got, oracle(case, True, "gd", LONG).grads(kind, order), inst.targets)


# ------------------------------------------------- 2. exact rules vs unrolled autograd
@pytest.mark.parametrize("rule", [tmg.Exact(), tmg.Unrolled()], ids=repr)
@pytest.mark.parametrize(("case", "per_step", "inner"), _case_inner_params(all_batchings=False))
def test_exact_rules_match_unrolled_autograd(case, per_step, inner, rule):
    inst, prob = build(case, per_step, INNERS[inner])
    try:
        got = run_lib(inst, rule)
    except Refused:
        return
    check(got, unrolled_reference(prob), inst.targets)


@pytest.mark.parametrize("rule", [tmg.Exact(), tmg.Binomial(2), tmg.Unrolled()], ids=repr)
@pytest.mark.parametrize("case", ["lr_dict", "lr_steps", "frozen_body", "wd_fixed", "wd_closed"])
def test_autograd_grad_equals_backward(case, rule):
    kind = {"Unrolled": "exact", "Exact": "exact", "Binomial": "binomial"}[type(rule).__name__]
    order = 2 if kind == "binomial" else None
    inst, _ = build(case, True)
    try:
        got = run_lib(inst, rule, use_autograd_grad=True)
    except Refused:
        return
    check(got, expected_for(case, True, "gd", kind, order), inst.targets)


# ------------------------------------------------- 3. identities between rules
@pytest.mark.parametrize(("case", "per_step"), _case_params())
def test_identities_between_rules(case, per_step):
    def run(rule):
        inst, _ = build(case, per_step)
        try:
            got = run_lib(inst, rule)
        except Refused:
            pytest.skip("closed-over tensors refused")
        return got

    low = [run(r) for r in (tmg.FirstOrder(), tmg.Truncated(0), tmg.Binomial(0))]
    high = [run(r) for r in (tmg.Unrolled(), tmg.Truncated(K), tmg.Binomial(K), tmg.Exact())]
    for group in (low, high):
        ref = group[0]
        for other in group[1:]:
            for label in ref:
                assert rel_err(other[label], ref[label]) <= RTOL, label


# ------------------------------------------------- 4. a non-leaf lr (log_lr.exp())
NONLEAF_RULES = ("FirstOrder", "Truncated2", "Binomial2", "Exact", "Unrolled")


@pytest.mark.parametrize(
    ("kind", "order", "rule"),
    [p for p in RULE_PARAMS if p.id in NONLEAF_RULES],
)
@pytest.mark.parametrize("lr_case", ["lr_scalar", "lr_steps", "lr_dict"])
def test_nonleaf_lr_gets_the_chain_ruled_gradient(lr_case, kind, order, rule):
    inst, _ = build(lr_case, True)
    expected = expected_for(lr_case, True, "gd", kind, order)
    if lr_case == "lr_dict":
        log_lr = {n: LR_DICT[n].log().requires_grad_(True) for n in MLP_NAMES}
        lr = {n: t.exp() for n, t in log_lr.items()}
        targets = {f"log_lr:{n}": (log_lr[n], _meta(f"lr:{n}", LR_DICT[n])) for n in MLP_NAMES}
        targets |= {f"lr:{n}": (lr[n], _meta(f"lr:{n}")) for n in MLP_NAMES}
    else:
        value = LR_SCALAR if lr_case == "lr_scalar" else LR_STEPS
        log_lr = value.log().requires_grad_(True)
        lr = log_lr.exp()
        targets = {"log_lr": (log_lr, _meta("lr", value)), "lr": (lr, _meta("lr"))}
    inst.kwargs["lr"] = lr
    inst.targets = {k: v for k, v in inst.targets.items() if k.startswith("theta:")} | targets
    check(run_lib(inst, rule), expected, inst.targets)


# ------------------------------------------------- 5. implicit rules and a loss hyperparameter
IMPLICIT = [
    pytest.param(tmg.ImplicitCG(2.0, maxiter=100, tol=1e-12), 2.0, 0.2, 60, id="ImplicitCG"),
    pytest.param(tmg.ImplicitNeumann(10.0, terms=120), 10.0, 1 / 13.5, 60, id="ImplicitNeumann"),
]


@pytest.mark.parametrize("how", ["closed", "fixed"])
@pytest.mark.parametrize(("rule", "reg", "lr", "steps"), IMPLICIT)
def test_implicit_hypergradient_matches_the_closed_form(rule, reg, lr, steps, how):
    """``dL/dw = direct - l_{phi w}^T (I + H/reg)^{-1} g / reg`` at the proximal minimizer,
    for a center ``c`` (a vector) and a weight-decay coefficient ``wd`` (0-dim)."""
    q = ProximalQuadratic.make()
    expected = q.closed_form(reg)
    theta = q.theta.clone().requires_grad_(True)
    c = q.c.clone().requires_grad_(True)
    wd = q.wd.clone().requires_grad_(True)
    if how == "closed":
        params = {"phi": theta}
        loss_fn = lambda p, b: q.inner(p["phi"], c, wd)  # noqa: E731
        kw: dict[str, Any] = {}
        closed = [c, wd]
    else:
        params = {"phi": theta, "c": c, "wd": wd}
        loss_fn = lambda p, b: q.inner(p["phi"], p["c"], p["wd"])  # noqa: E731
        kw = {"adapt": ["phi"]}
        closed = []
    with tmg.diagnostics.collect() as reports:
        try:
            adapted = tmg.adapt(loss_fn, params, None, steps=steps, lr=lr, rule=rule, **kw)
            # the inner loop converged to the proximal minimizer
            assert rel_err(adapted["phi"].detach(), expected["phi"]) <= 1e-12
            if how == "fixed":
                assert adapted["c"] is c and adapted["wd"] is wd
            q.outer(adapted["phi"], c, wd).backward()
        except (ValueError, TypeError) as e:
            if not closed:
                raise
            assert any(shape_pattern(t.shape).search(str(e)) for t in closed), str(e)
            return
    for name, t in (("theta", theta), ("c", c), ("wd", wd)):
        assert t.grad is not None, name
        assert rel_err(t.grad, expected[name]) <= 1e-9, (name, rel_err(t.grad, expected[name]))
    if isinstance(rule, tmg.ImplicitCG):
        infos = [r.info for r in reports if isinstance(r.info, tmg.CGInfo)]
        assert infos and all(i.converged and i.residual <= 1e-12 for i in infos), infos


@pytest.mark.parametrize(
    "rule",
    [tmg.ImplicitCG(2.0), tmg.ImplicitNeumann(10.0, terms=10), tmg.Adjoint()],
    ids=lambda r: type(r).__name__,
)
@pytest.mark.parametrize("lr_case", ["lr_scalar", "lr_steps", "lr_dict"])
def test_learned_lr_with_implicit_or_flow_rules_raises(rule, lr_case):
    inst, _ = build(lr_case, False)
    with pytest.raises(ValueError, match=r"(?i)\blr\b|learn|step size"):
        adapted = tmg.adapt(inst.loss_fn, inst.params, rule=rule, steps=K, **inst.kwargs)
        inst.outer(adapted).backward()


# ------------------------------------------------- 6. bad input
def _bad_inputs():
    init = init_mlp()
    lr_leaves = lambda names=MLP_NAMES: {n: LR_DICT[n].clone().requires_grad_() for n in names}  # noqa: E731
    wrong_shape = lr_leaves()
    wrong_shape["body.weight"] = torch.full((3, 5), 0.1, dtype=DTYPE, requires_grad=True)
    both = lambda a, b: rf"{a}.*{b}|{b}.*{a}"  # noqa: E731
    return [
        ("lr-dict-missing-key", {"lr": lr_leaves(MLP_NAMES[:3])}, both(r"\blr\b", r"head\.bias")),
        (
            "lr-dict-extra-key",
            {"lr": lr_leaves() | {"nope": torch.tensor(0.1, dtype=DTYPE)}},
            both(r"\blr\b", "nope"),
        ),
        ("lr-dict-wrong-shape", {"lr": wrong_shape}, both(r"\blr\b", r"body\.weight")),
        (
            "lr-dict-keys-not-adapted",
            {"lr": lr_leaves(), "adapt": list(HEAD)},
            both(r"\blr\b", r"body\.weight"),
        ),
        ("lr-dict-not-tensor", {"lr": {n: 0.1 for n in MLP_NAMES}}, None),
        ("lr-steps-too-short", {"lr": torch.full((K - 1,), 0.1, dtype=DTYPE)}, r"\blr\b"),
        ("lr-steps-too-long", {"lr": torch.full((K + 1,), 0.1, dtype=DTYPE)}, r"\blr\b"),
        ("lr-2d", {"lr": torch.full((K, 2), 0.1, dtype=DTYPE)}, r"\blr\b"),
        ("lr-int-tensor", {"lr": torch.tensor(1)}, r"\blr\b"),
        ("adapt-unknown", {"adapt": ["head.weight", "nope"]}, both(r"\badapt\b", "nope")),
        ("adapt-empty", {"adapt": []}, r"\badapt\b"),
        ("adapt-not-list", {"adapt": "head.weight"}, r"\badapt\b"),
        (
            "lr-tensor-with-optimizer",
            {"lr": LR_SCALAR.clone().requires_grad_(), "optimizer": torchopt.sgd(0.1)},
            r"\blr\b",
        ),
        (
            "lr-dict-with-optimizer",
            {"lr": lr_leaves(), "optimizer": torchopt.adam(0.01)},
            r"\blr\b",
        ),
    ], init


_BAD, _ = _bad_inputs()


@pytest.mark.parametrize(("kw", "match"), [pytest.param(k, m, id=i) for i, k, m in _BAD])
def test_bad_meta_arguments_raise_naming_them(kw, match):
    init = init_mlp()
    data = make_data(K, per_step=False)
    params = _leaves(init)
    kw = dict(kw)
    if "optimizer" not in kw:
        kw.setdefault("lr", LR)
    loss_fn = lambda p, b: mse(mlp(p, b[0]), b[1])  # noqa: E731
    if match is None:  # a dict of floats: either fine (values as step sizes) or refused by name
        try:
            adapted = tmg.adapt(loss_fn, params, data.inner[0], steps=K, rule=tmg.Exact(), **kw)
        except (TypeError, ValueError) as e:
            assert re.search(r"\blr\b", str(e)), str(e)
        else:
            assert set(adapted) == set(MLP_NAMES)
        return
    with pytest.raises((TypeError, ValueError), match=match) as info:
        tmg.adapt(loss_fn, params, data.inner[0], steps=K, rule=tmg.Exact(), **kw)
    assert "unexpected keyword" not in str(info.value), str(info.value)


def test_fixed_entries_need_not_require_grad():
    """``adapt=[head]``: body entries that do not require grad are constants, returned as is."""
    init = init_mlp()
    data = make_data(K, per_step=False)
    loss_fn = lambda p, b: mse(mlp(p, b[0]), b[1])  # noqa: E731
    params = _leaves(init, HEAD) | {n: init[n].clone() for n in BODY}
    adapted = tmg.adapt(
        loss_fn, params, data.inner[0], steps=K, lr=LR, rule=tmg.Exact(), adapt=list(HEAD)
    )
    assert all(adapted[n] is params[n] for n in BODY)
    assert all(adapted[n] is not params[n] for n in HEAD)
    loss_fn(adapted, data.outer).backward()
    prob = MetaProblem(
        {n: init[n] for n in HEAD},
        {},
        lambda phi, w, k: loss_fn({**phi, **{n: init[n] for n in BODY}}, data.inner[k]),
        lambda phi, w: loss_fn({**phi, **{n: init[n] for n in BODY}}, data.outer),
        K,
        lambda w, k, n: LR,
    )
    ref = unrolled_reference(prob)["theta"]
    for n in HEAD:
        assert rel_err(params[n].grad, ref[n]) <= RTOL, n
