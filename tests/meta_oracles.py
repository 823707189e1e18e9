"""Brute-force float64 oracle for meta-gradients w.r.t. theta *and* meta-parameters.

Deliberately independent of ``torchopt_metagrad``: it never imports it (nor anything
that does).

Setting.  The inner state ``z`` is the flat vector of the adapted parameters (``d``
entries), optionally followed by the optimizer's float state (momentum buffer, or Adam's
``mu`` and ``nu``).  The meta-parameters ``w`` are every other tensor the inner loop
depends on and the meta-gradient is asked for: a learned step size, parameters held
fixed through the inner loop (a frozen body), tensors the loss closes over (a
weight-decay coefficient).  The loop is ``z_0 = (theta, 0)``, ``z_{k+1} = S_k(z_k; w)``,
and the outer loss is ``L(phi_K, w)`` (``phi_K`` the parameter block of ``z_K``).

With ``J_k = dS_k/dz`` and ``B_k = dS_k/dw`` at ``(z_k, w)`` (dense matrices, by
autograd), ``A_k = J_k^T - I`` and ``v = (dL/dphi_K, 0)``, a rule is a choice of
adjoint estimates ``vhat_j`` (j = 0..K):

* exact / unrolled:  ``vhat_j = (I + A_j) ... (I + A_{K-1}) v``
* first order:       ``vhat_j = v``
* truncated(L):      ``vhat_j = (I + A_{max(j, K-L)}) ... (I + A_{K-1}) v``
* binomial(L):       ``vhat_j = sum_{S subset {j..K-1}, |S| <= L} prod_{i in S, increasing} A_i v``

and the meta-gradients are::

    dL/dtheta = parameter block of vhat_0
    dL/dw     = dL/dw|_direct + sum_{k=0}^{K-1} B_k^T vhat_{k+1}

Every ``vhat_j`` is built from scratch: explicit matrix products, index subsets
enumerated with :func:`itertools.combinations`; no recursion, no vector-Jacobian
products.  :func:`unrolled_reference` is the independent check of the exact case: plain
autograd through a hand-written loop over dicts of tensors (torchopt's functional
optimizers for momentum and Adam).

:class:`ProximalQuadratic` is the closed form used for the implicit rules.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torchopt
from torch import Tensor

DTYPE = torch.float64

Batch = tuple[Tensor, Tensor]
Names = Sequence[str]

__all__ = [
    "DTYPE",
    "Batch",
    "Data",
    "Flat",
    "Inner",
    "MetaOracle",
    "MetaProblem",
    "ProximalQuadratic",
    "init_mlp",
    "make_data",
    "mlp",
    "mse",
    "rel_err",
    "torchopt_bias_correction",
    "unrolled_reference",
]


# --------------------------------------------------------------------------------------
# A tiny float64 MLP (body: Linear + tanh, head: Linear) and its data
# --------------------------------------------------------------------------------------

BODY = ("body.weight", "body.bias")
HEAD = ("head.weight", "head.bias")
MLP_NAMES = BODY + HEAD


def init_mlp(seed: int = 0, n_in: int = 3, hidden: int = 5, n_out: int = 2) -> dict[str, Tensor]:
    """Initial values (detached) of ``body`` (n_in -> hidden, tanh) and ``head`` (-> n_out)."""
    gen = torch.Generator().manual_seed(seed)
    shapes = {
        "body.weight": (hidden, n_in),
        "body.bias": (hidden,),
        "head.weight": (n_out, hidden),
        "head.bias": (n_out,),
    }
    return {n: 0.7 * torch.randn(s, generator=gen, dtype=DTYPE) for n, s in shapes.items()}


def mlp(p: Mapping[str, Tensor], x: Tensor) -> Tensor:
    """``head(tanh(body(x)))`` written out (same math as two ``nn.Linear`` layers)."""
    h = torch.tanh(x @ p["body.weight"].T + p["body.bias"])
    return h @ p["head.weight"].T + p["head.bias"]


def mse(pred: Tensor, y: Tensor) -> Tensor:
    return ((pred - y) ** 2).mean()


@dataclass(frozen=True)
class Data:
    inner: list[Batch]  # one per inner step (all the same object when shared)
    outer: Batch


def make_data(
    steps: int,
    *,
    per_step: bool,
    seed: int = 1,
    n_in: int = 3,
    n_out: int = 2,
    n_inner: int = 8,
    n_outer: int = 10,
) -> Data:
    gen = torch.Generator().manual_seed(seed)
    teacher = torch.randn(n_in, n_out, generator=gen, dtype=DTYPE)

    def draw(n: int) -> Batch:
        x = torch.randn(n, n_in, generator=gen, dtype=DTYPE)
        y = torch.sin(x @ teacher) + 0.1 * torch.randn(n, n_out, generator=gen, dtype=DTYPE)
        return x, y

    if per_step:
        inner = [draw(n_inner) for _ in range(steps)]
    else:
        b = draw(n_inner)
        inner = [b] * steps
    return Data(inner, draw(n_outer))


# --------------------------------------------------------------------------------------
# Flat plumbing
# --------------------------------------------------------------------------------------


class Flat:
    """Flatten / unflatten a dict of tensors in a fixed name order."""

    def __init__(self, tensors: Mapping[str, Tensor]) -> None:
        self.names = list(tensors)
        self.shapes = [tensors[n].shape for n in self.names]
        self.numels = [tensors[n].numel() for n in self.names]

    @property
    def dim(self) -> int:
        return sum(self.numels)

    def flatten(self, tensors: Mapping[str, Tensor]) -> Tensor:
        if not self.names:
            return torch.zeros(0, dtype=DTYPE)
        return torch.cat([tensors[n].reshape(-1) for n in self.names])

    def unflatten(self, flat: Tensor) -> dict[str, Tensor]:
        chunks = torch.split(flat, self.numels) if self.names else []
        return {n: c.reshape(s) for n, c, s in zip(self.names, chunks, self.shapes, strict=True)}


# --------------------------------------------------------------------------------------
# The problem and the inner optimizer
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Inner:
    """The inner optimizer: ``gd`` (step size from the problem), ``momentum``, ``adam``.

    ``momentum``: ``torchopt.sgd(lr, momentum=mu)``: ``b' = mu b + g``, ``p' = p - lr b'``.
    ``adam``: ``torchopt.adam(lr, betas, eps)`` with torchopt's bias correction.
    """

    kind: str = "gd"
    lr: float | None = None  # momentum / adam only (a learned lr is GD-only)
    momentum: float = 0.9
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8

    @property
    def blocks(self) -> int:
        return {"gd": 1, "momentum": 2, "adam": 3}[self.kind]

    def torchopt(self) -> torchopt.base.GradientTransformation:
        if self.kind == "momentum":
            return torchopt.sgd(self.lr, momentum=self.momentum)
        if self.kind == "adam":
            return torchopt.adam(self.lr, betas=self.betas, eps=self.eps)
        raise ValueError(self.kind)


#: inner_loss(phi, w, k) / outer_loss(phi, w) / step_size(w, k, name)
InnerLoss = Callable[[dict[str, Tensor], dict[str, Tensor], int], Tensor]
OuterLoss = Callable[[dict[str, Tensor], dict[str, Tensor]], Tensor]
StepSize = Callable[[dict[str, Tensor], int, str], "Tensor | float"]


@dataclass
class MetaProblem:
    """One inner loop: adapted params ``theta``, meta-parameters ``meta``, losses, step size.

    ``inner_loss(phi, w, k)`` is the loss of step k (anything the library adds, such as
    weight decay, is part of it); ``outer_loss(phi_K, w)`` may use ``w`` directly;
    ``step_size(w, k, name)`` is GD's step size for parameter ``name`` at step k (a float,
    or a tensor taken from ``w``: scalar, per step, or shaped like the parameter).
    """

    theta: dict[str, Tensor]
    meta: dict[str, Tensor]
    inner_loss: InnerLoss
    outer_loss: OuterLoss
    steps: int
    step_size: StepSize | None = None
    inner: Inner = field(default_factory=Inner)

    def __post_init__(self) -> None:
        self.theta = {n: t.detach().to(DTYPE).clone() for n, t in self.theta.items()}
        self.meta = {n: t.detach().to(DTYPE).clone() for n, t in self.meta.items()}
        assert (self.step_size is not None) == (self.inner.kind == "gd"), self.inner


def torchopt_bias_correction(decay: float, count: int) -> Tensor:
    """``1 - decay**count`` as torchopt 0.7.3 computes it (an int64 count tensor makes
    ``pow`` return the *default* dtype, float32; then promoted to float64)."""
    c = torch.tensor(count, dtype=torch.int64)
    return (1 - pow(decay, c)).to(DTYPE)


# --------------------------------------------------------------------------------------
# The oracle
# --------------------------------------------------------------------------------------


def _eye(n: int) -> Tensor:
    return torch.eye(n, dtype=DTYPE)


class MetaOracle:
    """Trajectory, explicit ``J_k``, ``B_k``, ``v`` and the direct term of one problem."""

    def __init__(self, problem: MetaProblem) -> None:
        self.problem = problem
        self.pf = Flat(problem.theta)
        self.mf = Flat(problem.meta)
        self.d = self.pf.dim
        self.m = self.mf.dim
        self.K = problem.steps
        self.n = self.d * problem.inner.blocks
        w = self.mf.flatten(problem.meta)
        z = torch.cat([self.pf.flatten(problem.theta), torch.zeros(self.n - self.d, dtype=DTYPE)])
        self.traj = [z.clone()]
        for k in range(self.K):
            z = self.step(k, z.detach(), w).detach()
            self.traj.append(z.clone())
        self.Js: list[Tensor] = []
        self.Bs: list[Tensor] = []
        for k in range(self.K):
            Jz, Jw = torch.autograd.functional.jacobian(
                lambda z_, w_, k=k: self.step(k, z_, w_), (self.traj[k], w), vectorize=True
            )
            self.Js.append(Jz.detach())
            self.Bs.append(Jw.detach().reshape(self.n, self.m))
        self.As = [J.T - _eye(self.n) for J in self.Js]
        phi = self.traj[-1][: self.d].clone().requires_grad_(True)
        wl = w.clone().requires_grad_(True)
        outer = problem.outer_loss(self.pf.unflatten(phi), self.mf.unflatten(wl))
        g, direct = torch.autograd.grad(outer, (phi, wl), allow_unused=True)
        self.v = torch.cat([g.detach(), torch.zeros(self.n - self.d, dtype=DTYPE)])
        self.direct = torch.zeros(self.m, dtype=DTYPE) if direct is None else direct.detach()
        self._cache: dict[tuple, dict[str, dict[str, Tensor]]] = {}

    # -- the step map S_k(z; w), written out -------------------------------------------
    def step(self, k: int, z: Tensor, w: Tensor) -> Tensor:
        p = self.problem
        d = self.d
        phi_flat = z[:d]
        if not phi_flat.requires_grad:
            phi_flat = phi_flat.detach().requires_grad_(True)
        meta = self.mf.unflatten(w)
        loss = p.inner_loss(self.pf.unflatten(phi_flat), meta, k)
        (g,) = torch.autograd.grad(loss, phi_flat, create_graph=True)
        if p.inner.kind == "gd":
            assert p.step_size is not None
            gs = self.pf.unflatten(g)
            phi = self.pf.unflatten(phi_flat)
            new = {n: phi[n] - p.step_size(meta, k, n) * gs[n] for n in self.pf.names}
            return self.pf.flatten(new)
        lr = p.inner.lr
        if p.inner.kind == "momentum":
            b_new = p.inner.momentum * z[d:] + g
            return torch.cat([phi_flat - lr * b_new, b_new])
        assert p.inner.kind == "adam"
        b1, b2 = p.inner.betas
        mu, nu = z[d : 2 * d], z[2 * d :]
        mu_new = b1 * mu + (1 - b1) * g
        nu_new = b2 * nu + (1 - b2) * g * g
        mu_hat = mu_new / torchopt_bias_correction(b1, k + 1)
        nu_hat = nu_new / torchopt_bias_correction(b2, k + 1)
        update = (mu_hat / (nu_hat.sqrt() + p.inner.eps)) * (-lr)
        return torch.cat([phi_flat + update, mu_new, nu_new])

    # -- adjoint estimates, each from scratch ------------------------------------------
    def adjoint(self, j: int, rule: str, order: int | None = None) -> Tensor:
        """``vhat_j`` of ``rule`` (``exact``, ``first_order``, ``truncated``, ``binomial``)."""
        K, v = self.K, self.v
        if rule in ("exact", "unrolled"):
            M = _eye(self.n)
            for i in range(j, K):
                M = M @ self.Js[i].T  # I + A_i = J_i^T
            return M @ v
        if rule == "first_order":
            return v.clone()
        assert order is not None and order >= 0
        if rule == "truncated":
            M = _eye(self.n)
            for i in range(max(j, K - order), K):
                M = M @ (_eye(self.n) + self.As[i])
            return M @ v
        if rule == "binomial":
            total = torch.zeros_like(v)
            for size in range(min(order, K - j) + 1):
                for subset in itertools.combinations(range(j, K), size):
                    M = _eye(self.n)
                    for i in subset:  # increasing: A_{i_1} A_{i_2} ... A_{i_l}
                        M = M @ self.As[i]
                    total = total + M @ v
            return total
        raise ValueError(rule)

    def grads(self, rule: str, order: int | None = None) -> dict[str, dict[str, Tensor]]:
        """``{"theta": {name: grad}, "meta": {name: grad}}`` under ``rule``."""
        key = (rule, order)
        if key not in self._cache:
            vhat = [self.adjoint(j, rule, order) for j in range(self.K + 1)]
            gw = self.direct.clone()
            for k in range(self.K):
                gw = gw + self.Bs[k].T @ vhat[k + 1]
            self._cache[key] = {
                "theta": self.pf.unflatten(vhat[0][: self.d]),
                "meta": self.mf.unflatten(gw),
            }
        c = self._cache[key]
        return {part: {n: t.clone() for n, t in c[part].items()} for part in c}

    @property
    def adapted(self) -> dict[str, Tensor]:
        return self.pf.unflatten(self.traj[-1][: self.d].clone())


# --------------------------------------------------------------------------------------
# Reference: plain autograd through a hand-written unrolled loop over dicts
# --------------------------------------------------------------------------------------


def unrolled_reference(problem: MetaProblem) -> dict[str, dict[str, Tensor]]:
    """Exact meta-gradients by backprop through the loop a user would write by hand."""
    theta = {n: t.clone().requires_grad_(True) for n, t in problem.theta.items()}
    meta = {n: t.clone().requires_grad_(True) for n, t in problem.meta.items()}
    names = list(theta)
    phi = dict(theta)
    if problem.inner.kind == "gd":
        assert problem.step_size is not None
        for k in range(problem.steps):
            loss = problem.inner_loss(phi, meta, k)
            gs = torch.autograd.grad(loss, [phi[n] for n in names], create_graph=True)
            phi = {n: phi[n] - problem.step_size(meta, k, n) * g for n, g in zip(names, gs)}
    else:
        opt = problem.inner.torchopt()
        cur = tuple(phi[n] for n in names)
        state = opt.init(cur)
        for k in range(problem.steps):
            loss = problem.inner_loss(dict(zip(names, cur)), meta, k)
            gs = torch.autograd.grad(loss, cur, create_graph=True)
            updates, state = opt.update(gs, state, inplace=False)
            cur = tuple(torchopt.apply_updates(cur, updates, inplace=False))
        phi = dict(zip(names, cur))
    outer = problem.outer_loss(phi, meta)
    inputs = [theta[n] for n in names] + list(meta.values())
    grads = torch.autograd.grad(outer, inputs, allow_unused=True)
    grads = [torch.zeros_like(t) if g is None else g for t, g in zip(inputs, grads)]
    return {
        "theta": dict(zip(names, grads[: len(names)])),
        "meta": dict(zip(meta, grads[len(names) :])),
    }


# --------------------------------------------------------------------------------------
# Closed form for the implicit rules: a quadratic inner loss with a proximal term
# --------------------------------------------------------------------------------------


@dataclass
class ProximalQuadratic:
    """``l(phi; c, wd) = 1/2 (phi - c)^T A (phi - c) + wd/2 ||phi||^2`` with meta ``c``, ``wd``.

    The proximal minimizer ``phi*(theta, c, wd) = (A + (wd + reg) I)^{-1} (A c + reg theta)``
    is differentiated by autograd (through ``torch.linalg.solve``), which gives the
    implicit meta-gradients in closed form; the outer loss also uses ``c`` and ``wd``.
    """

    A: Tensor
    theta: Tensor
    c: Tensor
    wd: Tensor
    target: Tensor

    @classmethod
    def make(cls, d: int = 6, eig: tuple[float, float] = (1.0, 3.0), seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        Q, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=DTYPE))
        A = Q @ torch.diag(torch.linspace(*eig, d, dtype=DTYPE)) @ Q.T
        A = (A + A.T) / 2
        draw = lambda: torch.randn(d, generator=gen, dtype=DTYPE)  # noqa: E731
        return cls(A, draw(), draw(), torch.tensor(0.3, dtype=DTYPE), draw())

    def inner(self, phi: Tensor, c: Tensor, wd: Tensor) -> Tensor:
        r = phi - c
        return 0.5 * r @ self.A @ r + 0.5 * wd * (phi * phi).sum()

    def outer(self, phi: Tensor, c: Tensor, wd: Tensor) -> Tensor:
        return (
            torch.sin(phi).sum()
            + 0.5 * ((phi - self.target) ** 2).sum()
            + 0.2 * (c * c).sum()
            + 0.5 * wd**2
        )

    def minimizer(self, reg: float, theta: Tensor, c: Tensor, wd: Tensor) -> Tensor:
        d = theta.numel()
        M = self.A + (wd + reg) * _eye(d)
        return torch.linalg.solve(M, self.A @ c + reg * theta)

    def closed_form(self, reg: float) -> dict[str, Tensor]:
        """``phi*`` and ``dL(phi*, c, wd)/d(theta, c, wd)``."""
        theta = self.theta.clone().requires_grad_(True)
        c = self.c.clone().requires_grad_(True)
        wd = self.wd.clone().requires_grad_(True)
        phi = self.minimizer(reg, theta, c, wd)
        gt, gc, gw = torch.autograd.grad(self.outer(phi, c, wd), (theta, c, wd))
        return {"phi": phi.detach(), "theta": gt, "c": gc, "wd": gw}

    def implicit_formula(self, reg: float) -> dict[str, Tensor]:
        """The same by the formula: ``x = (I + H/reg)^{-1} g``,
        ``dL/dw = direct - l_{phi w}^T x / reg`` (explicit matrices)."""
        d = self.theta.numel()
        phi_star = self.minimizer(reg, self.theta, self.c, self.wd)
        phi = phi_star.clone().requires_grad_(True)
        c = self.c.clone().requires_grad_(True)
        wd = self.wd.clone().requires_grad_(True)
        g, dc, dw = torch.autograd.grad(self.outer(phi, c, wd), (phi, c, wd))
        H = self.A + self.wd * _eye(d)
        x = torch.linalg.solve(_eye(d) + H / reg, g)
        # mixed second derivatives of l, explicitly: d/dc grad_phi l = -A, d/dwd = phi
        l_phi_c = -self.A
        l_phi_wd = phi_star.reshape(d, 1)
        return {
            "phi": phi_star,
            "theta": x,
            "c": dc - (l_phi_c.T @ x) / reg,
            "wd": dw - (l_phi_wd.T @ x).reshape(()) / reg,
        }


def rel_err(est: Tensor, ref: Tensor) -> float:
    return float(torch.linalg.norm(est - ref) / torch.linalg.norm(ref))
