"""Brute-force float64 oracles for meta-gradient estimators.

This module is deliberately independent of ``torchopt_metagrad``: it never imports it.

Setting (see the design doc).  From ``theta`` run ``K`` inner steps
``z_{k+1} = S_k(z_k)`` where ``z`` is the *state*: the flat parameter vector, optionally
followed by the optimizer's float state (momentum buffer, or Adam's ``mu`` and ``nu``).
For plain gradient descent ``S_k(phi) = phi - alpha * grad l_k(phi)`` and the step Jacobian
is ``J_k = I - alpha H_k`` (``H_k`` the Hessian of ``l_k`` at ``phi_k``).

With ``A_k = J_k^T - I`` (for GD: ``A_k = -alpha H_k``) and ``v = (g, 0)``,
``g = grad L(phi_K)`` of the outer loss, the estimators are

* first order:     ``v``
* truncated(L):    ``(I + A_{K-L}) ... (I + A_{K-1}) v``
* binomial(L):     ``sum_{l <= L} sum_{k_1 < ... < k_l} A_{k_1} ... A_{k_l} v``
* exact:           ``(I + A_0) ... (I + A_{K-1}) v = J_0^T ... J_{K-1}^T v``

and the meta-gradient w.r.t. ``theta`` is the parameter block (the first ``d`` entries)
of the result; the optimizer's initial state is zeros and does not depend on ``theta``.

Everything here is computed the dumb way: explicit Hessians / Jacobians as dense matrices
(``torch.autograd.functional``), explicit matrix products, and enumeration of index subsets
with :func:`itertools.combinations`.  No recursion, no Hessian-vector products.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torchopt
from torch import nn
from torch.func import functional_call

DTYPE = torch.float64

Batch = tuple[torch.Tensor, torch.Tensor]
StepFn = Callable[[int, torch.Tensor], torch.Tensor]


# --------------------------------------------------------------------------------------
# The problem: a tiny float64 MLP regression, inner batches + a separate validation batch
# --------------------------------------------------------------------------------------


@dataclass
class Problem:
    """A tiny meta-learning problem: an MLP, per-step inner batches and an outer batch."""

    model: nn.Module
    theta0: dict[str, torch.Tensor]  # detached initial parameters
    inner_batches: list[Batch]  # one per inner step (may all be the same object)
    outer_batch: Batch  # validation batch (different data)
    names: list[str] = field(init=False)
    shapes: list[torch.Size] = field(init=False)
    numels: list[int] = field(init=False)

    def __post_init__(self) -> None:
        self.names = list(self.theta0)
        self.shapes = [self.theta0[n].shape for n in self.names]
        self.numels = [self.theta0[n].numel() for n in self.names]

    # -- parameter plumbing ----------------------------------------------------------
    @property
    def dim(self) -> int:
        return sum(self.numels)

    @property
    def steps(self) -> int:
        return len(self.inner_batches)

    def flatten(self, params: dict[str, torch.Tensor] | Sequence[torch.Tensor]) -> torch.Tensor:
        if isinstance(params, dict):
            params = [params[n] for n in self.names]
        return torch.cat([p.reshape(-1) for p in params])

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        chunks = torch.split(flat, self.numels)
        return {n: c.reshape(s) for n, c, s in zip(self.names, chunks, self.shapes, strict=True)}

    def theta0_flat(self) -> torch.Tensor:
        return self.flatten(self.theta0).clone()

    def fresh_params(self) -> dict[str, torch.Tensor]:
        """Fresh leaf tensors (requires_grad=True), like ``dict(model.named_parameters())``."""
        return {n: t.detach().clone().requires_grad_(True) for n, t in self.theta0.items()}

    # -- losses ------------------------------------------------------------------------
    def inner_loss(self, params: dict[str, torch.Tensor], batch: Batch) -> torch.Tensor:
        """``loss_fn(params, batch)`` with the signature the library expects (MSE)."""
        x, y = batch
        pred = functional_call(self.model, params, (x,))
        return ((pred - y) ** 2).mean()

    def outer_loss(self, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """Validation MSE on the outer batch."""
        return self.inner_loss(params, self.outer_batch)

    def inner_loss_flat(self, flat: torch.Tensor, k: int) -> torch.Tensor:
        return self.inner_loss(self.unflatten(flat), self.inner_batches[k])

    def outer_loss_flat(self, flat: torch.Tensor) -> torch.Tensor:
        return self.outer_loss(self.unflatten(flat))


def make_problem(
    steps: int,
    *,
    per_step_batches: bool,
    activation: str = "tanh",
    seed: int = 0,
    n_in: int = 3,
    n_hidden: int = 6,
    n_out: int = 2,
    n_inner: int = 8,
    n_outer: int = 10,
) -> Problem:
    """A float64 MLP ``n_in -> n_hidden -> n_out`` (38 params by default), MSE regression.

    Inner data and outer (validation) data are different draws.  With
    ``per_step_batches=False`` the same inner batch object is used at every step.
    """
    gen = torch.Generator().manual_seed(seed)
    act: nn.Module = {"tanh": nn.Tanh(), "softplus": nn.Softplus()}[activation]
    model = nn.Sequential(
        nn.Linear(n_in, n_hidden, dtype=DTYPE),
        act,
        nn.Linear(n_hidden, n_out, dtype=DTYPE),
    )
    theta0 = {
        name: (torch.randn(p.shape, generator=gen, dtype=DTYPE) * 0.7).detach()
        for name, p in model.named_parameters()
    }
    # A fixed "teacher" so that the regression targets have structure.
    w_teacher = torch.randn(n_in, n_out, generator=gen, dtype=DTYPE)

    def draw(n: int) -> Batch:
        x = torch.randn(n, n_in, generator=gen, dtype=DTYPE)
        y = torch.sin(x @ w_teacher) + 0.1 * torch.randn(n, n_out, generator=gen, dtype=DTYPE)
        return x, y

    if per_step_batches:
        inner = [draw(n_inner) for _ in range(steps)]
    else:
        b = draw(n_inner)
        inner = [b] * steps
    outer = draw(n_outer)
    return Problem(model=model, theta0=theta0, inner_batches=inner, outer_batch=outer)


# --------------------------------------------------------------------------------------
# Hand-written inner steps on a flat state vector
# --------------------------------------------------------------------------------------


def _grad_flat(problem: Problem, p: torch.Tensor, k: int) -> torch.Tensor:
    """Gradient of l_k at ``p`` (differentiable: create_graph=True)."""
    if not p.requires_grad:
        p = p.detach().requires_grad_(True)
    loss = problem.inner_loss_flat(p, k)
    (g,) = torch.autograd.grad(loss, p, create_graph=True)
    return g


@dataclass
class StepMap:
    """A differentiable step map ``z_{k+1} = step(k, z_k)`` and its initial state builder."""

    name: str
    n_blocks: int  # state = n_blocks stacked copies of the parameter-vector size
    step: Callable[[Problem, int, torch.Tensor], torch.Tensor]

    def init_state(self, problem: Problem, theta: torch.Tensor) -> torch.Tensor:
        zeros = torch.zeros((self.n_blocks - 1) * problem.dim, dtype=DTYPE)
        return torch.cat([theta, zeros])


def gd_map(lr: float) -> StepMap:
    def step(problem: Problem, k: int, z: torch.Tensor) -> torch.Tensor:
        return z - lr * _grad_flat(problem, z, k)

    return StepMap("gd", 1, step)


def momentum_map(lr: float, momentum: float) -> StepMap:
    """``torchopt.sgd(lr, momentum=mu)``: ``b' = mu b + g``, ``p' = p - lr b'`` (b_0 = 0)."""

    def step(problem: Problem, k: int, z: torch.Tensor) -> torch.Tensor:
        d = problem.dim
        p, b = z[:d], z[d:]
        g = _grad_flat(problem, p, k)
        b_new = momentum * b + g
        p_new = p + (-lr) * b_new
        return torch.cat([p_new, b_new])

    return StepMap("momentum", 2, step)


def torchopt_bias_correction(decay: float, count: int) -> torch.Tensor:
    """``1 - decay**count`` computed exactly as torchopt 0.7.3 does it.

    torchopt evaluates ``pow(decay, count)`` with ``count`` an int64 *tensor*, which makes
    the result a tensor of the *default* dtype (float32 here), so the bias correction
    carries a float32 rounding error (~1e-8 relative) even for float64 parameters.  To match
    torchopt to 1e-10 the oracle must reproduce this rounding (then promote to float64,
    which is exact, as torch's type promotion does for a 0-dim divisor).
    """
    c = torch.tensor(count, dtype=torch.int64)
    return (1 - pow(decay, c)).to(DTYPE)


def adam_map(
    lr: float, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, eps_root: float = 0.0
) -> StepMap:
    """``torchopt.adam(lr, betas=(b1, b2), eps=eps, eps_root=eps_root)``.

    ``mu' = b1 mu + (1-b1) g``, ``nu' = b2 nu + (1-b2) g^2``, ``count = k + 1``,
    ``mu_hat = mu' / (1 - b1^count)``, ``nu_hat = nu' / (1 - b2^count)``,
    ``p' = p - lr * mu_hat / (sqrt(nu_hat + eps_root) + eps)``.
    """

    def step(problem: Problem, k: int, z: torch.Tensor) -> torch.Tensor:
        d = problem.dim
        p, mu, nu = z[:d], z[d : 2 * d], z[2 * d :]
        g = _grad_flat(problem, p, k)
        mu_new = b1 * mu + (1 - b1) * g
        nu_new = b2 * nu + (1 - b2) * g * g
        count = k + 1
        mu_hat = mu_new / torchopt_bias_correction(b1, count)
        nu_hat = nu_new / torchopt_bias_correction(b2, count)
        update = (mu_hat / ((nu_hat + eps_root).sqrt() + eps)) * (-lr)
        return torch.cat([p + update, mu_new, nu_new])

    return StepMap("adam", 3, step)


# --------------------------------------------------------------------------------------
# Trajectories, explicit derivative matrices
# --------------------------------------------------------------------------------------


def state_trajectory(problem: Problem, smap: StepMap) -> list[torch.Tensor]:
    """Detached states ``z_0, ..., z_K``."""
    z = smap.init_state(problem, problem.theta0_flat())
    traj = [z.detach().clone()]
    for k in range(problem.steps):
        z = smap.step(problem, k, z.detach()).detach()
        traj.append(z.clone())
    return traj


def explicit_hessians(problem: Problem, params_traj: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """``H_k = hess l_k(phi_k)`` as dense ``d x d`` matrices, k = 0..K-1."""
    out = []
    for k in range(problem.steps):
        H = torch.autograd.functional.hessian(
            lambda v, k=k: problem.inner_loss_flat(v, k), params_traj[k].detach(), vectorize=True
        )
        out.append(H.detach())
    return out


def explicit_step_jacobians(
    problem: Problem, smap: StepMap, traj: Sequence[torch.Tensor]
) -> list[torch.Tensor]:
    """``J_k = dS_k/dz`` at ``z_k`` as dense matrices, k = 0..K-1.

    (``vectorize=True`` only batches the row-by-row vector-Jacobian products with vmap.)
    """
    out = []
    for k in range(problem.steps):
        J = torch.autograd.functional.jacobian(
            lambda z, k=k: smap.step(problem, k, z), traj[k].detach(), vectorize=True
        )
        out.append(J.detach())
    return out


def outer_grad(problem: Problem, params_flat: torch.Tensor) -> torch.Tensor:
    p = params_flat.detach().requires_grad_(True)
    (g,) = torch.autograd.grad(problem.outer_loss_flat(p), p)
    return g.detach()


# --------------------------------------------------------------------------------------
# Estimators: brute force
# --------------------------------------------------------------------------------------


def _eye(n: int) -> torch.Tensor:
    return torch.eye(n, dtype=DTYPE)


def binomial_by_enumeration(
    As: Sequence[torch.Tensor], v: torch.Tensor, order: int
) -> torch.Tensor:
    """``sum_{l=0}^{order} sum_{k_1<...<k_l} A_{k_1} A_{k_2} ... A_{k_l} v`` by enumeration."""
    K = len(As)
    total = torch.zeros_like(v)
    for l in range(min(order, K) + 1):
        for subset in itertools.combinations(range(K), l):
            # A_{k_1} (A_{k_2} (... (A_{k_l} v))): each term from scratch, nothing shared
            term = v
            for k in reversed(subset):
                term = As[k] @ term
            total = total + term
    return total


def truncated_product(As: Sequence[torch.Tensor], v: torch.Tensor, order: int) -> torch.Tensor:
    """``(I + A_{K-L}) ... (I + A_{K-1}) v`` as an explicit matrix product."""
    K = len(As)
    n = v.numel()
    L = min(order, K)
    M = _eye(n)
    for k in range(K - L, K):
        M = M @ (_eye(n) + As[k])
    return M @ v


def exact_product(Js: Sequence[torch.Tensor], v: torch.Tensor) -> torch.Tensor:
    """``J_0^T J_1^T ... J_{K-1}^T v`` directly from the step Jacobians."""
    n = v.numel()
    M = _eye(n)
    for J in Js:
        M = M @ J.T
    return M @ v


def n_subsets(K: int, order: int) -> int:
    return sum(math.comb(K, l) for l in range(min(order, K) + 1))


# --------------------------------------------------------------------------------------
# Bundled oracle
# --------------------------------------------------------------------------------------


@dataclass
class Oracle:
    """Everything a test needs about one (problem, step map) pair."""

    problem: Problem
    smap: StepMap
    traj: list[torch.Tensor]  # z_0..z_K
    Js: list[torch.Tensor]  # step Jacobians
    As: list[torch.Tensor]  # J_k^T - I
    v: torch.Tensor  # (g, 0)
    hessians: list[torch.Tensor] | None = None  # only from build_gd_oracle_from_hessians

    @property
    def d(self) -> int:
        return self.problem.dim

    @property
    def adapted_flat(self) -> torch.Tensor:
        return self.traj[-1][: self.d]

    @property
    def g(self) -> torch.Tensor:
        return self.v[: self.d]

    _cache: dict = field(default_factory=dict, repr=False)

    def _memo(self, key: tuple, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
        if key not in self._cache:
            self._cache[key] = fn()
        return self._cache[key].clone()

    def first_order(self) -> torch.Tensor:
        return self.g.clone()

    def binomial(self, order: int) -> torch.Tensor:
        return self._memo(
            ("binomial", order), lambda: binomial_by_enumeration(self.As, self.v, order)[: self.d]
        )

    def truncated(self, order: int) -> torch.Tensor:
        return self._memo(
            ("truncated", order), lambda: truncated_product(self.As, self.v, order)[: self.d]
        )

    def exact(self) -> torch.Tensor:
        return self._memo(("exact",), lambda: exact_product(self.Js, self.v)[: self.d])

    def estimate(self, rule: str, order: int | None = None) -> torch.Tensor:
        if rule == "first_order":
            return self.first_order()
        if rule == "binomial":
            assert order is not None
            return self.binomial(order)
        if rule == "truncated":
            assert order is not None
            return self.truncated(order)
        if rule in ("exact", "unrolled"):
            return self.exact()
        raise ValueError(rule)


def build_oracle(problem: Problem, smap: StepMap) -> Oracle:
    traj = state_trajectory(problem, smap)
    Js = explicit_step_jacobians(problem, smap, traj)
    n = traj[0].numel()
    As = [J.T - _eye(n) for J in Js]
    g = outer_grad(problem, traj[-1][: problem.dim])
    v = torch.cat([g, torch.zeros(n - problem.dim, dtype=DTYPE)])
    return Oracle(problem, smap, traj, Js, As, v)


def build_gd_oracle_from_hessians(problem: Problem, lr: float) -> Oracle:
    """GD oracle with ``A_k = -lr H_k`` built from explicit Hessians (not step Jacobians)."""
    smap = gd_map(lr)
    traj = state_trajectory(problem, smap)
    Hs = explicit_hessians(problem, traj)
    d = problem.dim
    As = [-lr * H for H in Hs]
    Js = [_eye(d) - lr * H for H in Hs]  # symmetric, J^T = J
    g = outer_grad(problem, traj[-1])
    return Oracle(problem, smap, traj, Js, As, g, Hs)


# --------------------------------------------------------------------------------------
# Reference: plain autograd through a hand-written unrolled loop
# --------------------------------------------------------------------------------------


def autograd_through_loop(problem: Problem, smap: StepMap) -> torch.Tensor:
    """d L(phi_K) / d theta by backprop through the flat hand-written loop."""
    theta = problem.theta0_flat().requires_grad_(True)
    z = smap.init_state(problem, theta)
    for k in range(problem.steps):
        z = smap.step(problem, k, z)
    (mg,) = torch.autograd.grad(problem.outer_loss_flat(z[: problem.dim]), theta)
    return mg.detach()


def autograd_through_dict_gd_loop(problem: Problem, lr: float) -> torch.Tensor:
    """Same as above for GD, but on a dict of tensors, the way a user would write it."""
    params = problem.fresh_params()
    phi = dict(params)
    for k in range(problem.steps):
        loss = problem.inner_loss(phi, problem.inner_batches[k])
        grads = torch.autograd.grad(loss, list(phi.values()), create_graph=True)
        phi = {n: p - lr * g for (n, p), g in zip(phi.items(), grads, strict=True)}
    mg = torch.autograd.grad(problem.outer_loss(phi), list(params.values()))
    return problem.flatten(mg).detach()


def torchopt_unrolled(problem: Problem, make_optimizer: Callable[[], object]) -> dict:
    """Run a torchopt functional optimizer (inplace=False) differentiably.

    Returns the per-step parameter vectors and the meta-gradient by autograd.
    """
    params = problem.fresh_params()
    opt = make_optimizer()
    names = problem.names
    cur = tuple(params[n] for n in names)
    state = opt.init(cur)  # type: ignore[attr-defined]
    params_traj = [problem.flatten(cur).detach().clone()]
    for k in range(problem.steps):
        loss = problem.inner_loss(dict(zip(names, cur, strict=True)), problem.inner_batches[k])
        grads = torch.autograd.grad(loss, cur, create_graph=True)
        updates, state = opt.update(grads, state, inplace=False)  # type: ignore[attr-defined]
        cur = torchopt.apply_updates(cur, updates, inplace=False)
        params_traj.append(problem.flatten(cur).detach().clone())
    outer = problem.outer_loss(dict(zip(names, cur, strict=True)))
    mg = torch.autograd.grad(outer, [params[n] for n in names])
    return {"params_traj": params_traj, "metagrad": problem.flatten(mg).detach()}


def rel_err(est: torch.Tensor, ref: torch.Tensor) -> float:
    return float(torch.linalg.norm(est - ref) / torch.linalg.norm(ref))
