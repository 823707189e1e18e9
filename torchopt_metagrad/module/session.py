"""One inner loop of the module front end: the core's inner loop driven step by step.

A :class:`Session` starts at the first step after a module optimizer is built or reset,
or after the module's parameters were restored to the ones the session started from. It
feeds the core's :class:`~torchopt_metagrad._core.loop.InnerLoop` one step per
``opt.step``:

* ``step(closure)``: the closure as a replayable inner loss (snapshots only; the
  products are recomputed in the backward);
* ``step(loss)``: the loss tensor, whose gradient graph the loop keeps when the rule
  applies that step's Jacobian (what ``torchopt.MetaSGD`` keeps, minus the chaining);
* ``Unrolled()``: the loop keeps the whole graph, exactly as torchopt does.

After step ``n`` the module holds the outputs of the core's one autograd node over the
record of steps ``0..n-1``, whose inputs are ``theta`` itself: whichever step's
parameters an outer loss uses, the rule's meta-gradient lands on ``theta``.

Kept graphs reference the parameters they were computed from, hence earlier nodes and
their records: when the rule drops early steps (``Truncated``), the session releases the
records of earlier nodes so the chain does not keep every step's graph alive; an outer
loss through those earlier parameters then raises an error saying so.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from torchopt_metagrad._core.checks import check_loss, not_using_params
from torchopt_metagrad._core.flat import FlatSpec
from torchopt_metagrad._core.link import Link
from torchopt_metagrad._core.loop import InnerLoop
from torchopt_metagrad._core.needs import Offers, check_fit
from torchopt_metagrad._core.record import Record
from torchopt_metagrad._core.steps import StepMapFactory
from torchopt_metagrad.module.slots import Slots, closure_loss
from torchopt_metagrad.rules.base import AbstractRule

__all__ = ["Session", "UntrackedSession"]


class Session:
    """The inner loop over a module's parameters since the last restore."""

    def __init__(
        self, slots: Slots, rule: AbstractRule, make_step_map: StepMapFactory, owner: str
    ) -> None:
        self.slots = slots
        self.theta = slots.read()
        self.rule = rule
        self.owner = owner
        self.spec = FlatSpec.from_tensors(dict(zip(slots.names, self.theta, strict=True)))
        needs = rule.needs(1)
        self.step_map = make_step_map(self.spec, needs.proximal)
        self._offers = Offers(
            owner,
            per_step_batches=False,
            flow_samples=self.step_map.time_step is not None,
            step_meta=bool(self.step_map.meta),
            horizon=False,
        )
        check_fit(rule, needs, self._offers)
        self.unrolled = needs.graph
        self.loop = InnerLoop(
            self.spec,
            self.step_map,
            self.spec.flatten(self.theta),
            needs=lambda n, meta: rule.needs(n, meta=meta),
            unrolled=self.unrolled,
            what="the training loss",
            rule_name=type(rule).__name__,
        )
        self.recorded_closures = False
        self.backward_seen = False
        self._handed: list[weakref.ref[Record]] = []
        self.current: list[Tensor] = list(self.theta)
        self._versions = [t._version for t in self.current]

    @property
    def steps(self) -> int:
        return self.loop.n

    def status(self) -> str:
        """``"continue"``, ``"restored"`` (all back to theta) or ``"replaced"``."""
        return self.slots.status(self.current, self.theta)

    def check(self) -> str:
        """Like :meth:`status`, raising ``RuntimeError`` naming a replaced parameter."""
        status = self.status()
        if status == "replaced":
            raise RuntimeError(
                f"module parameter {self.slots.first_replaced(self.current)!r} is not the tensor "
                f"{self.owner} set at inner step {self.steps}: it was replaced outside the "
                "optimizer, so its gradient would not reach the initial parameters. To start "
                "a new inner loop restore every parameter (e.g. torchopt.recover_state_dict "
                "with a state extracted by reference before the first step) or call reset() "
                "on the optimizer"
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
        return self.step_map.state_of(self.loop.z, self.loop.aux)

    def step(self, loss: Tensor | None, closure: Callable[[], Any] | None) -> None:
        """One inner step from the training loss (tensor) or a closure recomputing it."""
        needs = self.rule.needs(self.steps + 1)
        if closure is None and needs.curvature:
            check_fit(self.rule, needs, Offers(f"{self.owner}.step(loss)", False, True, False))
        if self.unrolled:
            with torch.enable_grad():
                value = closure() if closure is not None else loss
            what = "the closure's return value" if closure is not None else None
            self.loop.step_on(value, self.current, keep_graph=_always, what=what)  # type: ignore[arg-type]
            self._put(self.spec.split(self.loop.params))
            return
        if closure is not None:
            self.recorded_closures = True
            self.loop.step(
                closure_loss(closure, self.slots, self.spec), what="the closure's return value"
            )
        else:
            keep = lambda meta: self.rule.needs(self.steps + 1, meta=meta).step_jacobians  # noqa: E731
            self.loop.step_on(loss, self.current, keep_graph=keep)  # type: ignore[arg-type]
            self._release_chain()
        record = self.loop.record()
        self._handed.append(weakref.ref(record))
        self._put(
            list(Link.apply(record, self.rule, self.owner, *self.theta, *record.meta.tensors))
        )

    def _release_chain(self) -> None:
        """Release earlier nodes' records when the rule dropped steps (kept graphs only)."""
        if self.loop.first == 0:
            return  # the rule still uses every step: the earlier records are needed anyway
        reason = (
            f"the outer loss uses the module's parameters of an earlier inner step, but "
            f"{type(self.rule).__name__} in {self.owner}.step(loss) mode keeps only the graphs "
            f"that the latest step's meta-gradient needs; use step(closure) to differentiate "
            "through intermediate parameters"
        )
        for ref in self._handed:
            record = ref()
            if record is not None:
                record.release(reason)
        self._handed.clear()

    def _put(self, outputs: list[Tensor]) -> None:
        self.slots.write(outputs)
        self.current = outputs
        self._versions = [t._version for t in outputs]
        me = weakref.ref(self)

        def seen(grad_inputs: Any, grad_outputs: Any) -> None:
            session = me()
            if session is not None:
                session.backward_seen = True

        for node in {t.grad_fn for t in outputs if t.grad_fn is not None}:
            node.register_hook(seen)

    def check_not_consumed(self) -> None:
        """Refuse a step after an outer backward went through this inner loop."""
        if self.backward_seen:
            raise RuntimeError(
                f"{self.owner}.step: an outer loss's backward already went through this inner "
                f"loop (after inner step {self.steps}), so this step would continue it into "
                "the next task and the next meta-gradient would run over both tasks. Before "
                "each task restore the module's parameters (torchopt.recover_state_dict(net, "
                "state) with a state extracted by reference before the first step, as "
                "torchopt's MAML examples do) or call reset() on the optimizer. (A backward "
                "in the middle of one task's inner loop, e.g. a per-step meta-loss, also "
                "ends the loop here: the rules differentiate a finished inner loop; use "
                "tmg.Unrolled() with torchopt's optimizer for per-step meta-losses.)"
            )


def _always(meta: bool) -> bool:
    return True


class UntrackedSession:
    """An inner loop without a meta-graph (``higher``'s ``track_higher_grads=False``).

    Each step takes the gradient of the training loss without ``create_graph``, advances
    the step map with grad disabled and puts detached leaves (requiring grad) in the
    module: the adapted parameters get gradients of a later loss, the initial ones none.
    Cheap test-time adaptation; no rule is involved.
    """

    def __init__(self, slots: Slots, make_step_map: StepMapFactory, owner: str) -> None:
        self.slots = slots
        self.owner = owner
        theta = [t.detach() for t in slots.read()]
        self.spec = FlatSpec.from_tensors(dict(zip(slots.names, theta, strict=True)))
        self.step_map = make_step_map(self.spec, None)
        with torch.no_grad():
            self.z, self.aux = self.step_map.init_state(self.spec.flatten(theta))
        self.steps = 0

    def step(self, loss: Tensor | None, closure: Callable[[], Any] | None) -> None:
        """One step from the training loss (tensor) or a closure recomputing it."""
        current = self.slots.read()
        with torch.enable_grad():
            value = closure() if closure is not None else loss
        value = check_loss(value, self.steps, "the training loss")
        grads = torch.autograd.grad(value, current, allow_unused=True)
        if all(g is None for g in grads):
            raise ValueError(not_using_params(f"{self.owner}'s training loss", self.steps))
        flat = self.spec.flatten(
            [torch.zeros_like(p) if g is None else g for g, p in zip(grads, current, strict=True)]
        )
        with torch.no_grad():
            self.z, self.aux = self.step_map.advance(self.z, flat, self.aux)
        P = self.spec.numel
        self.slots.write([t.detach().requires_grad_(True) for t in self.spec.split(self.z[:P])])
        self.steps += 1
