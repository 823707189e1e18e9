"""THE inner loop, used by every front end: graph-free with a record, or unrolled.

:class:`InnerLoop` takes one step at a time (the functional front end calls it K times;
the module front end once per ``opt.step``). Per step it gets either

* a :class:`~torchopt_metagrad._core.replay.StepLoss` (:meth:`InnerLoop.step`): the loop
  evaluates it at the current parameters — a fresh leaf when graph-free, the graph's node
  when unrolled — and stores the state and the loss for replay when the rule needs them;
* a loss tensor already computed from given parameter tensors (:meth:`InnerLoop.step_on`,
  the module front end's ``step(loss)``): the gradient is taken w.r.t. those tensors,
  with its graph kept when the rule applies that step's Jacobian.

Graph-free, the loop keeps only what ``needs(n, meta).snapshots_from`` says a
meta-gradient after ``n`` steps uses, releasing older steps as it goes. Unrolled (rule
``Unrolled``), it keeps the whole graph and checks the gradient reaching every state,
``z_0`` included, for non-finite values.

Meta-parameters (tensors besides the parameters that the steps depend on and that
require grad): the step map's (a learned lr) and the loss's (fixed entries of
``params``) are given; at the first step, graph-free, the loop looks for leaves the loss
closes over (:func:`~torchopt_metagrad._core.closed.closed_over`) and adds them, and
refuses a step map that closes over one (its meta-gradient would be lost). With any
meta-parameter the rules need every step (``meta=True``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from torchopt_metagrad._core.checks import (
    check_inner_finite,
    check_loss,
    ensure_finite,
    not_using_params,
    refuse_inference_mode,
)
from torchopt_metagrad._core.closed import closed_over, describe, reaches
from torchopt_metagrad._core.engine import Meta
from torchopt_metagrad._core.flat import FlatSpec
from torchopt_metagrad._core.needs import Needs
from torchopt_metagrad._core.record import Kept, Record, Snapshot
from torchopt_metagrad._core.replay import StepLoss
from torchopt_metagrad._core.steps import AbstractStepMap

__all__ = ["InnerLoop"]


class InnerLoop:
    """One inner loop from flat initial parameters ``theta``.

    Args:
        spec: layout of the parameter block.
        step_map: the step map.
        theta: flat initial parameters (with their graph when ``unrolled``).
        needs: ``(n, meta) -> what a meta-gradient after n steps needs`` (``meta``:
            there are meta-parameters), i.e. ``rule.needs``.
        horizon: the number of steps, when known in advance (then steps before
            ``needs(horizon).snapshots_from`` are never stored).
        unrolled: keep the whole graph (``Unrolled``) instead of a record.
        what: names the loss in error messages.
        loss_meta: the loss's meta-parameters (the tensors ``StepLoss.meta`` holds).
        rule_name: names the rule in error messages.
    """

    def __init__(
        self,
        spec: FlatSpec,
        step_map: AbstractStepMap,
        theta: Tensor,
        *,
        needs: Callable[[int, bool], Needs],
        horizon: int | None = None,
        unrolled: bool = False,
        what: str = "loss_fn",
        loss_meta: tuple[Tensor, ...] = (),
        rule_name: str = "the rule",
    ) -> None:
        refuse_inference_mode(what)
        self.spec = spec
        self.step_map = step_map
        self.unrolled = unrolled
        self._needs = needs
        self.rule_name = rule_name
        self.what = what
        self.horizon = horizon
        self.meta = Meta(step_map.meta, tuple(t for t in loss_meta if t.requires_grad))
        self._store_from = 0
        self._every = 1
        # Exact(keep_graphs=m): the last m steps of a known horizon keep their gradient's
        # graph. Planned here, before step 0 (which may be one of them); the meta-parameters
        # found at step 0 do not change m.
        self._keep_from: int | None = None  # first step stored with its graph
        if horizon is not None and not unrolled:
            m = needs(horizon, bool(self.meta)).kept_graphs
            self._keep_from = horizon - m if m else None
        self._block: Tensor | None = None
        self._chain = object()  # identifies this loop's records (see Record.blocked)
        with torch.set_grad_enabled(unrolled and torch.is_grad_enabled()):
            self.z, self.aux = step_map.init_state(theta if unrolled else theta.detach())
        if unrolled and self.z.requires_grad:
            self.z.register_hook(_finite_hook(0))
        self.n = 0
        self.first = 0
        self.entries: list[Snapshot | Kept | None] = []
        self.last_loss: StepLoss | None = None
        self._mutates: bool | None = None  # (and _reads_back) from the first step's watch
        self._reads_back: str | None = None

    def first_needed(self, n: int) -> int:
        """First step a meta-gradient after ``n`` steps uses."""
        return self._needs(n, bool(self.meta)).snapshots_from

    def _start(self, value: Tensor, stop: list[Tensor], grad: Tensor) -> None:
        """At the first step: find closed-over leaves, then plan what to store."""
        if not self.unrolled:
            self._check_step_map(grad)
            closed = closed_over([value], stop)
            if closed:
                self.meta = Meta(self.meta.step, self.meta.loss, tuple(closed))
            if self.meta and not self._needs(self.horizon or 1, True).meta_params:
                raise ValueError(
                    f"{self.rule_name} does not compute meta-gradients for tensors besides the "
                    f"adapted params, and the inner loss depends on "
                    f"{describe(self.meta.tensors[0])} that requires grad. Use a step rule "
                    "(tmg.Exact, tmg.Binomial, ...) or tmg.Unrolled, or detach it"
                )
        horizon = self.horizon
        self._store_from = 0 if horizon is None else min(self.first_needed(horizon), horizon)
        if horizon is not None:  # Exact(snapshots=n): a state every `_every` steps
            needs = self._needs(horizon, bool(self.meta))
            n = needs.checkpoints
            self._every = 1 if n is None else -(-(horizon - self._store_from) // n)
            if self._keep_from is not None:  # Exact(keep_graphs=m): see __init__
                self._keep_from = max(self._keep_from, self._store_from)
        # With a known horizon the snapshots are rows of one block, so a batched stage
        # takes a view of consecutive rows instead of stacking copies.
        last = horizon if self._keep_from is None else self._keep_from
        if last is not None and not self.unrolled and last > self._store_from:
            rows = -(-(last - self._store_from) // self._every)
            self._block = self.z.new_empty((rows, self.step_map.dim))

    def _check_no_new_closed(self, value: Tensor, stop: list[Tensor], k: int) -> None:
        """Refuse a tensor requiring grad that the loss closes over from step ``k > 0`` on
        only (its meta-gradient would be lost: what is recorded was planned at step 0)."""
        known = {id(t) for t in self.meta.closed}
        new = [t for t in closed_over([value], stop) if id(t) not in known]
        if new:
            raise ValueError(
                f"{self.what} uses {describe(new[0])} that requires grad from inner step {k} "
                "on, but not at step 0, where the tensors it closes over are found: its "
                "meta-gradient would be lost. Use it at every step (e.g. add 0 * it at step "
                "0), pass it in params (adapt=...), or detach it"
            )

    def _check_step_map(self, grad: Tensor) -> None:
        """Refuse a step map that closes over a tensor requiring grad (not a declared lr)."""
        with torch.enable_grad():
            z = self.z.detach().requires_grad_(True)
            g = grad.detach().requires_grad_(True)
            out = self.step_map.delta(z, g, self.aux)
            again = self.step_map.delta(z, g, self.aux)
        if not torch.equal(out.detach(), again.detach()):
            raise ValueError(
                "the inner optimizer's update is not a function of (params, gradient, state) "
                "alone: two calls on the same inputs differ (e.g. torchopt.sgd with momentum "
                "and dampening keeps a first-step flag in a closure), so the rules' replays "
                "would differ from the forward. Use dampening=0 or another optimizer"
            )
        if out.grad_fn is None:
            return
        hidden = closed_over([out], [z, g, *self.meta.step])
        if hidden:
            raise ValueError(
                f"the inner optimizer depends on {describe(hidden[0])} that requires grad "
                "(e.g. a tensor learning rate inside a torchopt optimizer): its meta-gradient "
                "would be lost. Give a learned learning rate as lr=tensor (or a dict of "
                "tensors) with plain gradient descent, or detach it"
            )

    @property
    def params(self) -> Tensor:
        """The current flat parameters (part of the unrolled graph when unrolled)."""
        return self.z[: self.spec.numel]

    def step(self, loss: StepLoss, *, what: str | None = None) -> None:
        """Take one step with the inner loss ``loss`` (evaluated here, replayable later;
        or, among the last ``kept_graphs`` steps of a known horizon, stored with its
        gradient's graph)."""
        k, P = self.n, self.spec.numel
        store = not self.unrolled and k >= self._store_from
        keep = store and self._keep_from is not None and k >= self._keep_from
        # Graph-free, the loss's own meta-parameters enter as leaf copies, so the graph
        # walk below finds every closed-over use of a tensor (even of one passed in params).
        stand_ins = None if self.unrolled else tuple(_leaf(t) for t in loss.meta)
        with torch.enable_grad():
            leaf = self.z[:P] if self.unrolled else self.z[:P].detach().requires_grad_(True)
            value = loss.evaluate(
                leaf, record=not self.unrolled, watch=self._mutates is None, meta=stand_ins
            )
            if self._mutates is None:
                self._mutates, self._reads_back = loss.mutates, loss.reads_back
            loss.mutates, loss.reads_back = self._mutates, self._reads_back
            value = check_loss(value, k, what or self.what)
            try:
                (grad,) = torch.autograd.grad(value, leaf, create_graph=self.unrolled or keep)
            except RuntimeError as err:
                # walk the graph only when autograd failed: no cost on the happy path
                if not reaches(value, [leaf]):
                    raise ValueError(not_using_params(what or self.what, k)) from None
                if loss.reads_back is not None:  # autograd's in-place error, explained
                    raise loss.read_back_error() from err
                raise
        check_inner_finite(value.detach(), grad.detach(), k)
        if k == 0:
            self._start(value, [leaf, *(stand_ins or ())], grad)
            store = not self.unrolled and k >= self._store_from
        elif not self.unrolled:
            self._check_no_new_closed(value, [leaf, *(stand_ins or ())], k)
        entry: Snapshot | Kept | None = None
        if keep:
            # a view like ``leaf``: the step keeps one z_k (not z_k plus a copy of its state)
            state = self.z[P:].detach().requires_grad_(True) if self.z.numel() > P else None
            used = tuple(
                s for s, t in zip(stand_ins or (), loss.meta, strict=True) if t.requires_grad
            )
            entry = Kept((leaf,), (grad,), state, self.aux, flat=True, loss_meta=used, source=loss)
            grad = grad.detach()
        elif store:
            entry = Snapshot(self._keep(k), self.aux, loss)
        self.last_loss = None if self.unrolled else loss
        self._advance(grad, entry)

    def _keep(self, k: int) -> Tensor | None:
        """The state ``z_k`` to store (a row of the block when there is one), or ``None``
        between checkpoints."""
        if (k - self._store_from) % self._every:
            return None
        if self._block is None:
            return self.z
        row = self._block[(k - self._store_from) // self._every]
        row.copy_(self.z)
        return row

    def step_on(
        self,
        value: Tensor,
        params: Sequence[Tensor],
        *,
        keep_graph: Callable[[bool], bool],
        what: str | None = None,
    ) -> None:
        """Take one step with a loss already computed from the tensors ``params``.

        ``keep_graph(meta)`` says whether to keep the gradient's graph so the rule can
        apply this step's Jacobian (ignored, always kept, when unrolled).
        """
        k = self.n
        value = check_loss(value, k, what or self.what)
        if k == 0 and not reaches(value, params):
            # before _start, which would take the tensors it does use for meta-parameters;
            # later steps: the all-None gradients below
            raise ValueError(not_using_params(what or self.what, k))
        if k == 0:
            self._start(value, list(params), self.z[: self.spec.numel])
        elif not self.unrolled:
            self._check_no_new_closed(value, list(params), k)
        keep = self.unrolled or (keep_graph(bool(self.meta)) and k >= self._store_from)
        with torch.enable_grad():
            grads = torch.autograd.grad(value, tuple(params), create_graph=keep, allow_unused=True)
        if all(g is None for g in grads):
            raise ValueError(not_using_params(what or self.what, k))
        grads = tuple(
            torch.zeros_like(p) if g is None else g for g, p in zip(grads, params, strict=True)
        )
        grad = self.spec.flatten(grads if self.unrolled else [g.detach() for g in grads])
        check_inner_finite(value.detach(), grad.detach(), k)
        entry = None
        if keep and not self.unrolled:
            P = self.spec.numel
            state = None
            if self.step_map.dim > P:
                state = self.z[P:].detach().clone().requires_grad_(True)
            entry = Kept(tuple(params), grads, state, self.aux)
        self.last_loss = None
        self._advance(grad, entry)

    def _advance(self, grad: Tensor, entry: Snapshot | Kept | None) -> None:
        if not self.unrolled:
            self.entries.append(entry)  # covers steps first..n-1; None: not stored
        with torch.set_grad_enabled(self.unrolled and torch.is_grad_enabled()):
            self.z, self.aux = self.step_map.advance(self.z, grad, self.aux)
        self.n += 1
        if self.unrolled and self.z.requires_grad:
            self.z.register_hook(_finite_hook(self.n))
        # Drop stored steps that no meta-gradient after n steps uses.
        first = min(max(self.first_needed(self.n), 0), self.n)
        while not self.unrolled and self.first < first:
            self.entries.pop(0)
            self.first += 1

    def record(self) -> Record:
        """The record of the steps so far (a new object: later steps do not change it)."""
        if self.unrolled:
            raise RuntimeError("an unrolled loop keeps its graph, not a record")
        entries = self.entries
        if any(e is None for e in entries):
            missing = self.first + next(i for i, e in enumerate(entries) if e is None)
            raise RuntimeError(f"inner step {missing} was not recorded")
        return Record(
            spec=self.spec,
            step_map=self.step_map,
            steps=self.n,
            first=self.first,
            entries=list(entries),  # type: ignore[arg-type]
            final=self.z,
            final_aux=self.aux,
            final_loss=self.last_loss,
            time_step=self.step_map.time_step,
            meta=self.meta,
            chain=self._chain,
        )


def _finite_hook(k: int) -> Callable[[Tensor], None]:
    def hook(grad: Tensor | None) -> None:
        if grad is None:  # an undefined gradient (e.g. gradcheck's check_undefined_grad)
            return
        ensure_finite(grad, lambda: f"at inner step {k} (backward through the unrolled graph)")

    return hook


def _leaf(t: Tensor) -> Tensor:
    return t.detach().requires_grad_(True)
