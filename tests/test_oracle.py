"""Independent float64 oracle tests for every meta-gradient rule of ``torchopt_metagrad``.

Tests named ``test_oracle_self_*`` validate the brute-force oracle in ``tests/oracles.py``
(they never touch the library).  Tests named ``test_library_*`` compare the library's
meta-gradient estimates against the oracle with relative error <= 1e-10.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torchopt

import torchopt_metagrad as tmg

try:
    from tests import oracles
except ImportError:  # tests/ is not a package: pytest puts tests/ itself on sys.path
    import oracles  # type: ignore[no-redef]

RTOL = 1e-10
GD_LR = 0.2
MOMENTUM_LR = 0.1
MOMENTUM = 0.9
ADAM_LR = 0.05

STEPS = (1, 3, 5, 7)
MODES = ("same_batch", "per_step_batches")
OPTIMIZERS = ("momentum", "adam")


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """Everything here is tiny (<= 114 x 114): intra-op threads only add contention."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def step_map(kind: str) -> oracles.StepMap:
    if kind == "gd":
        return oracles.gd_map(GD_LR)
    if kind == "momentum":
        return oracles.momentum_map(MOMENTUM_LR, MOMENTUM)
    if kind == "adam":
        return oracles.adam_map(ADAM_LR)
    raise ValueError(kind)


def make_torchopt(kind: str) -> torchopt.base.GradientTransformation:
    """A *fresh* torchopt functional optimizer (torchopt's sgd trace keeps closure state)."""
    if kind == "momentum":
        return torchopt.sgd(MOMENTUM_LR, momentum=MOMENTUM)
    if kind == "adam":
        return torchopt.adam(ADAM_LR)
    raise ValueError(kind)


@functools.cache
def problem(steps: int, mode: str, activation: str = "tanh") -> oracles.Problem:
    return oracles.make_problem(
        steps, per_step_batches=(mode == "per_step_batches"), activation=activation, seed=steps
    )


@functools.cache
def oracle(kind: str, steps: int, mode: str, activation: str = "tanh") -> oracles.Oracle:
    return oracles.build_oracle(problem(steps, mode, activation), step_map(kind))


def assert_close(est: torch.Tensor, ref: torch.Tensor, rtol: float = RTOL, what: str = "") -> None:
    assert est.dtype == torch.float64, f"{what}: dtype {est.dtype}"
    assert est.shape == ref.shape, f"{what}: shape {tuple(est.shape)} vs {tuple(ref.shape)}"
    err = oracles.rel_err(est, ref)
    assert err <= rtol, f"{what}: relative error {err:.3e} > {rtol:.0e}"


def make_rule(rule: str, order: int | None) -> object:
    if rule == "first_order":
        return tmg.FirstOrder()
    if rule == "truncated":
        return tmg.Truncated(order)
    if rule == "binomial":
        return tmg.Binomial(order)
    if rule == "exact":
        return tmg.Exact()
    if rule == "unrolled":
        return tmg.Unrolled()
    raise ValueError(rule)


def run_library(
    prob: oracles.Problem,
    rule: object,
    *,
    lr: float | None = None,
    optimizer_kind: str | None = None,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Call ``tmg.adapt`` the way a user would; returns (adapted params, flat meta-gradient)."""
    params = prob.fresh_params()
    kwargs: dict[str, object] = {"steps": prob.steps, "rule": rule}
    if optimizer_kind is None:
        kwargs["lr"] = lr
    else:
        kwargs["optimizer"] = make_torchopt(optimizer_kind)
    batches = prob.inner_batches
    if all(b is batches[0] for b in batches):
        adapted = tmg.adapt(prob.inner_loss, params, batches[0], **kwargs)
    else:
        adapted = tmg.adapt(prob.inner_loss, params, batches=list(batches), **kwargs)
    assert isinstance(adapted, dict)
    assert list(adapted) == list(params), "adapted dict must have the same keys (and order)"
    grads = torch.autograd.grad(prob.outer_loss(adapted), list(params.values()))
    return adapted, prob.flatten(grads)


def rule_cases(steps_values: tuple[int, ...], modes: tuple[str, ...]) -> list:
    """(steps, mode, rule, order) for Binomial/Truncated of every order 0..K and the rest."""
    cases = []
    for K in steps_values:
        for mode in modes:
            for L in range(K + 1):
                cases.append(pytest.param(K, mode, "binomial", L, id=f"K{K}-{mode}-binomial{L}"))
            for L in range(K + 1):
                cases.append(pytest.param(K, mode, "truncated", L, id=f"K{K}-{mode}-truncated{L}"))
            for rule in ("first_order", "exact", "unrolled"):
                cases.append(pytest.param(K, mode, rule, None, id=f"K{K}-{mode}-{rule}"))
    return cases


ALL_KINDS_CASES = [
    pytest.param(kind, K, mode, id=f"{kind}-K{K}-{mode}")
    for kind in ("gd", *OPTIMIZERS)
    for K in STEPS
    for mode in MODES
]


# --------------------------------------------------------------------------------------
# oracle self-validation (independent of the library)
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("kind", "K", "mode"), ALL_KINDS_CASES)
def test_oracle_self_exact_product_equals_autograd_through_flat_loop(kind, K, mode):
    orc = oracle(kind, K, mode)
    ref = oracles.autograd_through_loop(problem(K, mode), step_map(kind))
    assert_close(orc.exact(), ref, 1e-12, "exact product of explicit Jacobians vs autograd")


@pytest.mark.parametrize(("kind", "K", "mode"), ALL_KINDS_CASES)
def test_oracle_self_enumeration_and_truncation_limits(kind, K, mode):
    """Binomial(K) (all 2^K subsets) == Truncated(K) == exact; Binomial(0) == Truncated(0) == g."""
    orc = oracle(kind, K, mode)
    exact = orc.exact()
    assert oracles.n_subsets(K, K) == 2**K
    assert_close(orc.binomial(K), exact, 1e-12, "binomial(K) enumeration vs product")
    assert_close(orc.truncated(K), exact, 1e-12, "truncated(K) vs exact")
    assert torch.equal(orc.binomial(0), orc.g)
    assert torch.equal(orc.truncated(0), orc.g)
    # orders beyond K change nothing
    assert_close(orc.binomial(K + 2), exact, 1e-12, "binomial(K+2)")


@pytest.mark.parametrize("K", STEPS)
@pytest.mark.parametrize("mode", MODES)
def test_oracle_self_gd_hessian_form_matches_step_jacobian_form(K, mode):
    """For GD, A_k = -lr H_k (explicit Hessians) agrees with J_k^T - I (explicit Jacobians)."""
    orc_j = oracle("gd", K, mode)
    orc_h = oracles.build_gd_oracle_from_hessians(problem(K, mode), GD_LR)
    assert orc_h.hessians is not None
    for A_j, A_h, H in zip(orc_j.As, orc_h.As, orc_h.hessians, strict=True):
        assert_close(A_j, A_h, 1e-12, "J^T - I vs -lr H")
        assert_close(H, H.T, 1e-13, "Hessian symmetry")
    for L in range(K + 1):
        assert_close(orc_h.binomial(L), orc_j.binomial(L), 1e-12, f"binomial({L})")
        assert_close(orc_h.truncated(L), orc_j.truncated(L), 1e-12, f"truncated({L})")


@pytest.mark.parametrize("K", STEPS)
@pytest.mark.parametrize("mode", MODES)
def test_oracle_self_dict_loop_matches_flat_loop(K, mode):
    prob = problem(K, mode)
    assert_close(
        oracles.autograd_through_dict_gd_loop(prob, GD_LR),
        oracles.autograd_through_loop(prob, oracles.gd_map(GD_LR)),
        1e-13,
        "dict-based vs flat hand-written GD loop",
    )


def test_oracle_self_momentum_jacobian_has_expected_block_structure():
    """J = [[I - lr H, -lr mu I], [H, mu I]] for b' = mu b + g, p' = p - lr b'."""
    orc = oracle("momentum", 3, "per_step_batches")
    prob = orc.problem
    d = prob.dim
    eye = torch.eye(d, dtype=torch.float64)
    Hs = oracles.explicit_hessians(prob, [z[:d] for z in orc.traj])
    for J, H in zip(orc.Js, Hs, strict=True):
        expected = torch.cat(
            [
                torch.cat([eye - MOMENTUM_LR * H, -MOMENTUM_LR * MOMENTUM * eye], dim=1),
                torch.cat([H, MOMENTUM * eye], dim=1),
            ],
            dim=0,
        )
        assert_close(J, expected, 1e-12, "momentum step Jacobian")


@pytest.mark.parametrize("kind", OPTIMIZERS)
@pytest.mark.parametrize("K", STEPS)
@pytest.mark.parametrize("mode", MODES)
def test_oracle_self_handwritten_step_matches_torchopt(kind, K, mode):
    """Hand-written momentum/Adam steps reproduce torchopt's trajectory and unrolled meta-grad."""
    prob = problem(K, mode)
    orc = oracle(kind, K, mode)
    ref = oracles.torchopt_unrolled(prob, lambda: make_torchopt(kind))
    d = prob.dim
    assert len(ref["params_traj"]) == K + 1
    for k, (z, p_ref) in enumerate(zip(orc.traj, ref["params_traj"], strict=True)):
        assert_close(z[:d], p_ref, 1e-14, f"params after step {k}")
    assert_close(orc.exact(), ref["metagrad"], 1e-12, "exact oracle vs autograd through torchopt")


@pytest.mark.parametrize(("kind", "K", "mode"), [c for c in ALL_KINDS_CASES if c.values[1] > 1])
def test_oracle_self_estimators_are_distinct(kind, K, mode):
    """Sanity: the problem is not degenerate, so a 1e-10 test can tell orders/rules apart."""
    orc = oracle(kind, K, mode)
    for L in range(K):
        assert oracles.rel_err(orc.binomial(L), orc.binomial(L + 1)) > 1e-5
        assert oracles.rel_err(orc.truncated(L), orc.truncated(L + 1)) > 1e-5
    for L in range(1, K):
        assert oracles.rel_err(orc.binomial(L), orc.truncated(L)) > 1e-5


# --------------------------------------------------------------------------------------
# library vs oracle: plain gradient descent
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("K", "mode", "rule", "order"), rule_cases(STEPS, MODES))
def test_library_gd_rule_matches_bruteforce_oracle(K, mode, rule, order):
    orc = oracle("gd", K, mode)
    _, est = run_library(orc.problem, make_rule(rule, order), lr=GD_LR)
    assert_close(est, orc.estimate(rule, order), what=f"gd {rule}({order}) K={K} {mode}")


@pytest.mark.parametrize(("K", "mode", "rule", "order"), rule_cases((3,), MODES))
def test_library_gd_rule_matches_bruteforce_oracle_softplus_mlp(K, mode, rule, order):
    orc = oracle("gd", K, mode, "softplus")
    _, est = run_library(orc.problem, make_rule(rule, order), lr=GD_LR)
    assert_close(est, orc.estimate(rule, order), what=f"softplus gd {rule}({order}) K={K} {mode}")


@pytest.mark.parametrize(("kind", "K", "mode"), ALL_KINDS_CASES)
@pytest.mark.parametrize(
    ("rule", "order"),
    [("first_order", None), ("truncated", 1), ("binomial", 1), ("exact", None), ("unrolled", None)],
    ids=["first_order", "truncated1", "binomial1", "exact", "unrolled"],
)
def test_library_adapted_params_match_oracle_trajectory(kind, K, mode, rule, order):
    """The forward value (params after K steps) is the same for every rule and is right."""
    orc = oracle(kind, K, mode)
    if kind == "gd":
        adapted, _ = run_library(orc.problem, make_rule(rule, order), lr=GD_LR)
    else:
        adapted, _ = run_library(orc.problem, make_rule(rule, order), optimizer_kind=kind)
    for name, t in adapted.items():
        assert t.shape == orc.problem.theta0[name].shape
    assert_close(orc.problem.flatten(adapted).detach(), orc.adapted_flat, 1e-13, "adapted params")


@pytest.mark.parametrize("K", STEPS)
@pytest.mark.parametrize("mode", MODES)
def test_library_binomial_zero_equals_first_order(K, mode):
    prob = problem(K, mode)
    _, b0 = run_library(prob, tmg.Binomial(0), lr=GD_LR)
    _, fo = run_library(prob, tmg.FirstOrder(), lr=GD_LR)
    assert_close(b0, fo, what="Binomial(0) vs FirstOrder")


@pytest.mark.parametrize("K", STEPS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", ("gd", *OPTIMIZERS))
def test_library_full_order_rules_agree(kind, K, mode):
    """Binomial(K) == Truncated(K) == Exact == Unrolled (library against itself)."""
    prob = problem(K, mode)
    kw: dict = {"lr": GD_LR} if kind == "gd" else {"optimizer_kind": kind}
    ests = {
        "binomial(K)": run_library(prob, tmg.Binomial(K), **kw)[1],
        "truncated(K)": run_library(prob, tmg.Truncated(K), **kw)[1],
        "exact": run_library(prob, tmg.Exact(), **kw)[1],
    }
    unrolled = run_library(prob, tmg.Unrolled(), **kw)[1]
    for name, est in ests.items():
        assert_close(est, unrolled, what=f"{kind} {name} vs unrolled")


@pytest.mark.parametrize("K", STEPS)
@pytest.mark.parametrize("mode", MODES)
def test_library_unrolled_equals_handwritten_autograd_loop(K, mode):
    prob = problem(K, mode)
    _, est = run_library(prob, tmg.Unrolled(), lr=GD_LR)
    assert_close(
        est, oracles.autograd_through_dict_gd_loop(prob, GD_LR), what="Unrolled vs hand loop"
    )


# --------------------------------------------------------------------------------------
# library vs oracle: torchopt optimizers (state-space oracle)
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", OPTIMIZERS)
@pytest.mark.parametrize(("K", "mode", "rule", "order"), rule_cases(STEPS, MODES))
def test_library_optimizer_rule_matches_state_space_oracle(kind, K, mode, rule, order):
    orc = oracle(kind, K, mode)
    _, est = run_library(orc.problem, make_rule(rule, order), optimizer_kind=kind)
    assert_close(est, orc.estimate(rule, order), what=f"{kind} {rule}({order}) K={K} {mode}")


@pytest.mark.parametrize("kind", OPTIMIZERS)
@pytest.mark.parametrize("K", STEPS)
@pytest.mark.parametrize("mode", MODES)
def test_library_optimizer_unrolled_equals_autograd_through_torchopt(kind, K, mode):
    prob = problem(K, mode)
    _, est = run_library(prob, tmg.Unrolled(), optimizer_kind=kind)
    ref = oracles.torchopt_unrolled(prob, lambda: make_torchopt(kind))["metagrad"]
    assert_close(est, ref, what=f"{kind} Unrolled vs autograd through torchopt")


# --------------------------------------------------------------------------------------
# library: registry names, knobs and batch plumbing against the same oracle
# --------------------------------------------------------------------------------------

REGISTRY_CASES = [
    ("first_order", {}, "first_order", None),
    ("truncated", {"order": 2}, "truncated", 2),
    ("binomial", {"order": 2}, "binomial", 2),
    ("exact", {}, "exact", None),
    ("unrolled", {}, "unrolled", None),
]


@pytest.mark.parametrize("kind", ("gd", "adam"))
@pytest.mark.parametrize(
    ("name", "knobs", "rule", "order"), REGISTRY_CASES, ids=[c[0] for c in REGISTRY_CASES]
)
def test_library_make_rule_by_name_matches_oracle(kind, name, knobs, rule, order):
    assert name in tmg.available_rules()
    orc = oracle(kind, 3, "per_step_batches")
    kw: dict = {"lr": GD_LR} if kind == "gd" else {"optimizer_kind": kind}
    _, est = run_library(orc.problem, tmg.make_rule(name, **knobs), **kw)
    assert_close(est, orc.estimate(rule, order), what=f"make_rule({name!r}, {knobs}) {kind}")


@pytest.mark.parametrize("kind", ("gd", "momentum"))
@pytest.mark.parametrize("order", (2, 4))
@pytest.mark.parametrize(
    "knobs",
    [{"vectorize": False}, {"chunk_size": 1}, {"chunk_size": 2}],
    ids=["loop", "chunk1", "chunk2"],
)
def test_library_binomial_knobs_do_not_change_the_estimate(kind, order, knobs):
    orc = oracle(kind, 5, "per_step_batches")
    kw: dict = {"lr": GD_LR} if kind == "gd" else {"optimizer_kind": kind}
    _, est = run_library(orc.problem, tmg.Binomial(order, **knobs), **kw)
    assert_close(est, orc.binomial(order), what=f"Binomial({order}, {knobs}) {kind}")


@pytest.mark.parametrize("rule", ("binomial", "truncated", "exact"))
def test_library_batches_list_of_one_batch_equals_single_batch(rule):
    """``batches=[b] * K`` and ``batch=b`` are the same problem."""
    K = 3
    orc = oracle("gd", K, "same_batch")
    prob = orc.problem
    params = prob.fresh_params()
    adapted = tmg.adapt(
        prob.inner_loss,
        params,
        batches=[prob.inner_batches[0]] * K,
        steps=K,
        lr=GD_LR,
        rule=make_rule(rule, 2),
    )
    est = prob.flatten(torch.autograd.grad(prob.outer_loss(adapted), list(params.values())))
    assert_close(est, orc.estimate(rule, 2), what=f"{rule} with batches=[b]*K")
