"""One inner loop of the module front end: what it records and how gradients reach theta.

A :class:`Session` starts at the first step after a module optimizer is built, reset,
or after the module's parameters were restored to the ones the session started from.
It records ``theta`` (the tensors the module held then), the flat state
``z_k`` after every step (parameters plus optimizer state, see
:mod:`torchopt_metagrad.steps`), and per step either

* ``step(loss)``: the graph of ``Delta_k = S_k(z_k) - z_k``, built from the gradient
  of the user's loss with ``create_graph=True`` and kept, so ``A_k v`` is one VJP
  through it (what ``torchopt.MetaSGD`` keeps, minus the chaining); or
* ``step(closure)``: the closure, the RNG state and the train/eval flags, so ``A_k v``
  is recomputed at the snapshot (:func:`torchopt_metagrad.engine.vjp_delta`) with the
  module's parameters temporarily replaced; no graph outlives the step.

The parameters after step ``n`` come out of :class:`_AdaptedParams`, an autograd
node whose inputs are ``theta`` itself and whose backward runs ``rule.meta_gradient``
on the first ``n`` steps. So whichever step's parameters an outer loss uses, the
rule's meta-gradient lands on ``theta``, summed over the steps used, and nothing
chains through earlier steps. Rule ``Unrolled`` keeps the whole graph instead,
exactly as torchopt does.

Reference hygiene: an autograd node holds a :class:`_Prefix` (immutable; the records
of earlier steps only), never the session, so kept graphs (which reference earlier
steps' parameters, hence earlier nodes) form no reference cycle. Closures usually
reference the module, so in closure mode the module and the last node reference each
other until the module's parameters are replaced (restore, next step, or the
context exit of :func:`~torchopt_metagrad.innerloop_ctx`).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import optree
import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from torchopt_metagrad import engine
from torchopt_metagrad._flat import FlatSpec
from torchopt_metagrad.bridge import run_rule
from torchopt_metagrad.rules.base import AbstractRule
from torchopt_metagrad.steps import AbstractStepMap, Aux, GradientDescent
from torchopt_metagrad.trajectory import BatchSchedule, InnerProblem, check_inner_finite

__all__ = ["Session", "Slots", "StepMapFactory", "is_replaying", "needs_recomputation"]

#: ``(spec, proximal_reg) -> step map`` for the parameters of one session.
StepMapFactory = Callable[[FlatSpec, "float | None"], AbstractStepMap]

_thread = threading.local()


def is_replaying() -> bool:
    """True while a recorded closure is being re-run (inside a backward)."""
    return getattr(_thread, "depth", 0) > 0


def needs_recomputation(rule: AbstractRule) -> bool:
    """True for rules that need the inner loss where no step took a gradient (final params)."""
    return rule.uses_hessians or rule.proximal_reg is not None


class Slots:
    """Where each adapted tensor lives in a module (shared parameters: one tensor, many places).

    Only parameters that require grad (and, with ``include``, whose name is in it)
    are adapted; the others are left alone.
    """

    def __init__(self, module: nn.Module, include: frozenset[str] | None = None) -> None:
        self.modules = tuple(m for _, m in module.named_modules())
        groups: dict[int, list[tuple[nn.Module, str, str]]] = {}
        tensors: dict[int, Tensor] = {}
        for prefix, sub in module.named_modules():
            for attr, t in sub._parameters.items():
                if t is None or not t.requires_grad:
                    continue
                qual = f"{prefix}.{attr}" if prefix else attr
                groups.setdefault(id(t), []).append((sub, attr, qual))
                tensors[id(t)] = t
        if include is not None:
            groups = {k: v for k, v in groups.items() if any(q in include for *_, q in v)}
        self.locations = tuple(tuple(v) for v in groups.values())
        self.names = tuple(v[0][2] for v in self.locations)
        first: Tensor | None = None
        for key, name in zip(groups, self.names, strict=True):
            t = tensors[key]
            if not t.is_floating_point():
                raise TypeError(f"module parameter {name!r} must be floating point, got {t.dtype}")
            if first is None:
                first = t
            elif (t.dtype, t.device) != (first.dtype, first.device):
                raise ValueError(
                    f"module parameter {name!r} is {t.dtype} on {t.device} but "
                    f"{self.names[0]!r} is {first.dtype} on {first.device}; all adapted "
                    "parameters must share dtype and device"
                )

    def __len__(self) -> int:
        return len(self.locations)

    def read(self) -> list[Tensor]:
        """The tensors now at the first location of each adapted parameter."""
        return [locs[0][0]._parameters[locs[0][1]] for locs in self.locations]  # type: ignore[misc]

    def write(self, tensors: Sequence[Tensor]) -> None:
        """Put ``tensors`` at every location (like ``torchopt.MetaOptimizer``)."""
        for locs, t in zip(self.locations, tensors, strict=True):
            for module, attr, _ in locs:
                module._parameters[attr] = t  # type: ignore[assignment]

    @contextlib.contextmanager
    def replaced(self, tensors: Sequence[Tensor]) -> Iterator[None]:
        """Temporarily put ``tensors`` in the module (restores what was there)."""
        old = [[m._parameters[a] for m, a, _ in locs] for locs in self.locations]
        try:
            self.write(tensors)
            yield
        finally:
            for locs, olds in zip(self.locations, old, strict=True):
                for (module, attr, _), t in zip(locs, olds, strict=True):
                    module._parameters[attr] = t

    @contextlib.contextmanager
    def replaying_at(self, tensors: Sequence[Tensor], modes: tuple[bool, ...]) -> Iterator[None]:
        """Re-run a recorded step: params replaced, train/eval flags as recorded, buffers
        swapped for copies (a re-run forward must not update running statistics again)."""
        buffers = [
            (m, name, b) for m in self.modules for name, b in m._buffers.items() if b is not None
        ]
        flags = [m.training for m in self.modules]
        _thread.depth = getattr(_thread, "depth", 0) + 1
        try:
            for m, name, b in buffers:
                m._buffers[name] = b.clone()
            for m, flag in zip(self.modules, modes, strict=True):
                m.training = flag
            with self.replaced(tensors):
                yield
        finally:
            _thread.depth -= 1
            for m, flag in zip(self.modules, flags, strict=True):
                m.training = flag
            for m, name, b in buffers:
                m._buffers[name] = b


class _Replay:
    """A closure-mode step: enough to recompute its inner loss at any parameters."""

    __slots__ = ("closure", "cuda_rng", "device", "modes", "rng", "slots")

    def __init__(self, closure: Callable[[], Any], slots: Slots, device: torch.device) -> None:
        self.closure = closure
        self.slots = slots
        self.device = device
        self.modes = tuple(m.training for m in slots.modules)
        self.rng = torch.get_rng_state()
        self.cuda_rng = torch.cuda.get_rng_state(device) if device.type == "cuda" else None

    def run(self, params: Sequence[Tensor]) -> Tensor:
        devices = [self.device] if self.cuda_rng is not None else []
        with (
            torch.random.fork_rng(devices=devices),
            self.slots.replaying_at(params, self.modes),
        ):
            torch.set_rng_state(self.rng)
            if self.cuda_rng is not None:
                torch.cuda.set_rng_state(self.cuda_rng, self.device)
            return self.closure()


def _replay_loss(params: dict[str, Tensor], replay: Any) -> Tensor:
    if not isinstance(replay, _Replay):
        raise RuntimeError(
            "this step was taken with step(loss), whose graph gives Hessian-vector products "
            "only at that step's parameters; use step(closure) for this rule"
        )
    return replay.run(list(params.values()))


@dataclass(frozen=True, eq=False)
class _Kept:
    """A loss-mode step: its parameters, the inner gradient with its graph, the state.

    ``Delta_k`` is rebuilt from these at backward time (its graph lives for one
    product), so a step keeps one parameter-sized vector beyond its autograd graph.
    """

    params: tuple[Tensor, ...]
    grads: tuple[Tensor, ...]  # d loss_k / d params, with create_graph=True
    state: Tensor | None  # the optimizer state before the step, as a leaf
    aux: Aux

    @property
    def inputs(self) -> tuple[Tensor, ...]:
        return self.params if self.state is None else (*self.params, self.state)


def _pull(out: Sequence[Tensor], inputs: Sequence[Tensor], v: Sequence[Tensor]) -> Tensor:
    grads = torch.autograd.grad(
        out, inputs, v, retain_graph=True, allow_unused=True, materialize_grads=True
    )
    return torch.cat([g.reshape(-1) for g in grads])


@dataclass(frozen=True, eq=False)
class _Context:
    spec: FlatSpec
    step_map: AbstractStepMap
    rule: AbstractRule
    time_step: float | None
    owner: str


@dataclass(frozen=True, eq=False)
class _Prefix:
    """Steps ``0..steps-1`` of a session as one node's backward needs them.

    ``states`` holds ``z_first..z_steps`` where a step recomputes from its snapshot
    (``None`` elsewhere); ``records`` the steps from ``rec_first``.
    """

    context: _Context
    steps: int
    first: int
    states: tuple[Tensor | None, ...]
    auxs: tuple[Aux, ...]
    rec_first: int
    records: tuple[_Kept | _Replay | None, ...]


class _ModuleSteps:
    """:class:`~torchopt_metagrad.rules.base.StepJacobians` of a module inner loop.

    ``A_k v`` is a VJP through the kept gradient graph (``step(loss)``; ``Delta_k`` is
    rebuilt on it for the product) or recomputed at the snapshot (``step(closure)``,
    with :func:`torchopt_metagrad.engine.vjp_delta`). ``apply_many`` runs the products
    one by one: neither closures nor kept graphs can be stacked for ``vmap``.
    """

    def __init__(self, prefix: _Prefix) -> None:
        self._p = prefix
        ctx = prefix.context
        replays = [None] * prefix.rec_first + list(prefix.records)
        self._problem = InnerProblem(
            _replay_loss, ctx.spec, ctx.step_map, BatchSchedule(None, replays, prefix.steps)
        )

    @property
    def num_steps(self) -> int:
        return self._p.steps

    @property
    def param_dim(self) -> int:
        return self._p.context.spec.numel

    @property
    def time_step(self) -> float | None:
        return self._p.context.time_step

    def snapshot(self, k: int) -> Tensor:
        if not self._p.first <= k <= self._p.steps:
            raise IndexError(f"state {k} was not stored (stored: {self._p.first}..{self._p.steps})")
        z = self._p.states[k - self._p.first]
        if z is None:
            raise IndexError(f"state {k} was not stored: step(loss) keeps the step's graph instead")
        return z

    def _record(self, k: int) -> _Kept | _Replay | None:
        if not self._p.rec_first <= k < self._p.steps:
            raise IndexError(f"step {k} was not stored")
        return self._p.records[k - self._p.rec_first]

    def apply(self, k: int, v: Tensor) -> Tensor:
        rec = self._record(k)
        if isinstance(rec, _Kept):
            spec = self._p.context.spec
            with torch.enable_grad():
                z = spec.flatten(rec.params)
                if rec.state is not None:
                    z = torch.cat([z, rec.state])
                delta = self._p.context.step_map.delta(z, spec.flatten(rec.grads), rec.aux)
            return _pull([delta], rec.inputs, [v])
        aux = self._p.auxs[k - self._p.first]
        return engine.vjp_delta(self._problem, self.snapshot(k), aux, k, v)

    def apply_many(
        self,
        start: int,
        vectors: Tensor,
        *,
        chunk_size: int | None = None,
        vectorize: bool = True,
    ) -> Tensor:
        return torch.stack([self.apply(start + r, v) for r, v in enumerate(vectors)])

    def hvp(self, k: int, v: Tensor) -> Tensor:
        rec = self._record(k) if k < self.num_steps else None
        if isinstance(rec, _Kept):
            return _pull(rec.grads, rec.params, self._p.context.spec.split(v))
        return self.hvp_at(self.snapshot(k)[: self.param_dim], v, k=min(k, self.num_steps - 1))

    def hvp_at(self, params: Tensor, v: Tensor, *, k: int = 0) -> Tensor:
        return engine.hvp(self._problem, params, self._problem.schedule.at(k), v)

    def vector_field(self, params: Tensor, *, create_graph: bool = False) -> Tensor:
        with torch.enable_grad():
            leaf = params if create_graph else params.detach().requires_grad_(True)
            loss = self._problem.loss(leaf, self._problem.schedule.at(0))
            (grad,) = torch.autograd.grad(loss, leaf, create_graph=create_graph)
        return -grad


class _AdaptedParams(torch.autograd.Function):
    """``(prefix, z_n, *theta) -> params of z_n`` (after ``n = prefix.steps`` steps).

    The backward runs ``rule.meta_gradient`` on the prefix and returns the result for
    ``theta``; it is once-differentiable (use ``Unrolled`` for higher-order derivatives).
    """

    @staticmethod
    def forward(ctx: Any, prefix: _Prefix, z: Tensor, *theta: Tensor) -> tuple[Tensor, ...]:
        ctx.prefix = prefix
        spec = prefix.context.spec
        return tuple(t.clone() for t in spec.split(z[: spec.numel]))

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, *grad_outputs: Tensor | None) -> tuple[Tensor | None, ...]:
        prefix: _Prefix = ctx.prefix
        c = prefix.context
        spec = c.spec
        try:
            c.rule.validate(prefix.steps)
        except ValueError as err:
            raise ValueError(
                f"{err} (the outer loss uses the module's parameters after {prefix.steps} "
                f"inner step(s) of {c.owner})"
            ) from None
        meta = run_rule(
            c.rule,
            _ModuleSteps(prefix),
            spec,
            grad_outputs,
            c.step_map.dim,
            f"the outer loss's gradient w.r.t. the module's parameters after inner step "
            f"{prefix.steps} is not finite",
        )
        return (None, None, *(t.clone() for t in spec.split(meta)))


def _checked(loss: Any, k: int, what: str) -> Tensor:
    if not isinstance(loss, Tensor):
        raise TypeError(f"{what} must be a scalar tensor, got {type(loss).__name__} at step {k}")
    if loss.numel() != 1:
        raise ValueError(f"{what} must be a scalar tensor, got shape {tuple(loss.shape)}")
    if not loss.requires_grad:
        raise ValueError(
            f"{what} does not depend on the module's adapted parameters at inner step {k}; "
            "compute it with the module after the last step (and with grad enabled)"
        )
    return loss.reshape(())


class Session:
    """The records of one inner loop over a module's parameters."""

    def __init__(
        self, slots: Slots, rule: AbstractRule, make_step_map: StepMapFactory, owner: str
    ) -> None:
        self.slots = slots
        self.theta = slots.read()
        self.rule = rule
        self.owner = owner
        spec = FlatSpec.from_tensors(dict(zip(slots.names, self.theta, strict=True)))
        step_map = make_step_map(spec, rule.proximal_reg)
        time_step = None
        if isinstance(step_map, GradientDescent) and step_map.proximal is None:
            time_step = step_map.lr
        if rule.supports_flow and time_step is None:
            raise ValueError(
                f"{type(rule).__name__} treats the iterates as samples of a gradient flow: use "
                "plain gradient descent (tmg.MetaSGD(module, lr, rule=...) without momentum, "
                "weight decay or a schedule)"
            )
        self.context = _Context(spec, step_map, rule, time_step, owner)
        self.unrolled = rule.differentiates_through_loop
        self.keeps_graphs = rule.uses_step_jacobians
        flat = spec.flatten(self.theta)
        with torch.set_grad_enabled(self.unrolled and torch.is_grad_enabled()):
            self.z, self.aux = step_map.init_state(flat if self.unrolled else flat.detach())
        self.steps = 0
        self.states: list[Tensor | None] = [self.z]
        self.auxs: list[Aux | None] = [self.aux]
        self.records: list[_Kept | _Replay | None] = []
        self._released_states = self._released_records = 0
        self.recorded_closures = False
        self.current: list[Tensor] = list(self.theta)
        self._versions = [t._version for t in self.current]

    # -- where the module stands ---------------------------------------------------------
    def status(self) -> str:
        """``"continue"``, ``"restored"`` (all back to theta) or ``"replaced"``."""
        same = fresh = True
        for i, locs in enumerate(self.slots.locations):
            for module, attr, _ in locs:
                t = module._parameters.get(attr)
                same = same and t is self.current[i]
                fresh = fresh and t is self.theta[i]
        if same:
            return "continue"
        return "restored" if fresh else "replaced"

    def check(self) -> str:
        """Like :meth:`status`, raising ``RuntimeError`` naming a replaced parameter."""
        status = self.status()
        if status == "replaced":
            for i, locs in enumerate(self.slots.locations):
                for module, attr, qual in locs:
                    if module._parameters.get(attr) is not self.current[i]:
                        raise RuntimeError(
                            f"module parameter {qual!r} is not the tensor {self.owner} set at "
                            f"inner step {self.steps}: it was replaced outside the optimizer, "
                            "so its gradient would not reach the initial parameters. To start "
                            "a new inner loop restore every parameter (e.g. torchopt."
                            "recover_state_dict with a state extracted by reference before the "
                            "first step) or call reset() on the optimizer"
                        )
        if status == "continue":
            for t, version, name in zip(
                self.current, self._versions, self.slots.names, strict=True
            ):
                if t._version != version:
                    raise RuntimeError(
                        f"module parameter {name!r} was modified in place after inner step "
                        f"{self.steps} of {self.owner}; the recorded inner loop no longer "
                        "matches it. Change parameters only through the optimizer"
                    )
        return status

    def optimizer_state(self) -> Any:
        """The inner optimizer's state now (torchopt layout, detached copies)."""
        unpack = getattr(self.context.step_map, "_unpack", None)
        if unpack is None:
            return ()
        _, state = unpack(self.z.detach(), self.aux)
        return optree.tree_map(lambda t: t.clone() if isinstance(t, Tensor) else t, state)

    # -- one step ------------------------------------------------------------------------
    def step(self, loss: Tensor | None, closure: Callable[[], Any] | None) -> None:
        if self.unrolled:
            self._put(self._step_unrolled(loss, closure))
            return
        c = self.context
        spec, step_map, k = c.spec, c.step_map, self.steps
        P = spec.numel
        record: _Kept | _Replay | None = None
        if closure is not None:
            record = _Replay(closure, self.slots, spec.device)
            self.recorded_closures = True
            leaf = self.z[:P].detach().requires_grad_(True)
            with torch.enable_grad():
                with self.slots.replaced(spec.split(leaf)):
                    loss = _checked(closure(), k, "the closure's return value")
                (grad,) = torch.autograd.grad(loss, leaf)
        else:
            loss = _checked(loss, k, "loss")
            params = tuple(self.current)
            with torch.enable_grad():
                grads = self._grads(loss, params, create_graph=self.keeps_graphs)
            if self.keeps_graphs:
                state = None
                if step_map.dim > P:
                    state = self.z[P:].detach().clone().requires_grad_(True)
                record = _Kept(params, grads, state, self.aux)
                self.states[k] = None  # the graph replaces the snapshot
            grad = spec.flatten([g.detach() for g in grads])
        check_inner_finite(loss.detach(), grad, k)
        with torch.no_grad():
            self.z, self.aux = step_map.advance(self.z, grad, self.aux)
        self.steps = n = k + 1
        self.states.append(self.z)
        self.auxs.append(self.aux)
        self.records.append(record)
        first = min(max(0, self.rule.first_step_needed(n)), n)
        rec_first = min(first, n - 1)
        # The final state only serves products at the final params (closure mode).
        final = self.z if isinstance(record, _Replay) else None
        prefix = _Prefix(
            c,
            n,
            first,
            (*self.states[first:n], final),
            tuple(self.auxs[first:]),  # type: ignore[arg-type]
            rec_first,
            tuple(self.records[rec_first:]),
        )
        self._release(first, rec_first)
        outputs = _AdaptedParams.apply(prefix, self.z, *self.theta)
        self._put(list(outputs))

    def _step_unrolled(
        self, loss: Tensor | None, closure: Callable[[], Any] | None
    ) -> list[Tensor]:
        c = self.context
        k = self.steps
        with torch.enable_grad():
            if closure is not None:
                loss = _checked(closure(), k, "the closure's return value")
            else:
                loss = _checked(loss, k, "loss")
            grad = c.spec.flatten(self._grads(loss, tuple(self.current), create_graph=True))
            check_inner_finite(loss.detach(), grad.detach(), k)
            self.z, self.aux = c.step_map.advance(self.z, grad, self.aux)
        self.steps = k + 1
        return c.spec.split(self.z[: c.spec.numel])

    def _grads(
        self, loss: Tensor, params: tuple[Tensor, ...], *, create_graph: bool
    ) -> tuple[Tensor, ...]:
        grads = torch.autograd.grad(loss, params, create_graph=create_graph, allow_unused=True)
        if all(g is None for g in grads):
            raise ValueError(
                f"loss does not depend on the module's adapted parameters at inner step "
                f"{self.steps} of {self.owner}; compute it with the module after the last step"
            )
        return tuple(
            torch.zeros_like(p) if g is None else g for g, p in zip(grads, params, strict=True)
        )

    def _release(self, first: int, rec_first: int) -> None:
        """Drop what no later step's backward needs (assumes ``first_step_needed`` grows with K)."""
        for i in range(self._released_states, first):
            self.states[i] = None
            self.auxs[i] = None
        for i in range(self._released_records, rec_first):
            self.records[i] = None
        self._released_states = max(self._released_states, first)
        self._released_records = max(self._released_records, rec_first)

    def _put(self, outputs: list[Tensor]) -> None:
        self.slots.write(outputs)
        self.current = outputs
        self._versions = [t._version for t in outputs]
