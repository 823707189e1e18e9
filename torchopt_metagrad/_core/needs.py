"""What a rule needs from an inner loop, and what a front end offers: one value each.

A rule declares its needs in one :class:`Needs` value (its family base class fills it
in), a front end declares what it can record in one :class:`Offers` value, and
:func:`check_fit` is the one function that compares them. Front ends never branch on
a rule's class or flags: they ask for ``rule.needs(steps)`` and record accordingly.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Needs", "Offers", "check_fit"]


@dataclass(frozen=True)
class Needs:
    """What a rule needs recorded to compute its meta-gradient after ``steps`` inner steps.

    Attributes:
        snapshots_from: first inner step whose snapshot (and replayable inner loss) the
            rule uses; ``steps`` means none (the final state is always kept).
        step_jacobians: the rule applies step Jacobians ``A_k v`` (``record.apply``).
        curvature: the rule evaluates Hessian-vector products of the plain inner loss at
            stored states or the final state (``record.hvp``): the front end must be able
            to recompute the inner loss where no step took a gradient.
        proximal: strength ``r`` of a proximal term ``r/2 ||phi - theta||^2`` the front
            end adds to every inner step (``None``: none).
        flow: the stored states must be samples of a gradient flow on a uniform grid
            (``record.time_step`` not ``None``).
        per_step_batches: the rule accepts a different batch at every step.
        graph: the rule differentiates through the kept unrolled graph (no record).
        step_meta: the rule gives a meta-gradient to the step map's own meta-parameters
            (a learned lr). Fixed-point and flow rules do not: the inner problem's
            solution and the gradient flow do not depend on the step size.
        meta_params: the rule computes meta-gradients for tensors besides the adapted
            params (fixed or closed-over tensors that require grad).
        checkpoints: store at most this many states (every ``ceil(K / checkpoints)``-th
            from ``snapshots_from`` on) and recompute the others from them in the
            backward; ``None``: store every state. Needs a known number of steps.
        kept_graphs: keep the inner gradient's autograd graph of the last this many steps
            (``create_graph=True`` in the forward) instead of rebuilding it in the
            backward: less time, that many step graphs more memory. Needs a known number
            of steps.
    """

    snapshots_from: int
    step_jacobians: bool = False
    curvature: bool = False
    proximal: float | None = None
    flow: bool = False
    per_step_batches: bool = True
    graph: bool = False
    step_meta: bool = True
    meta_params: bool = True
    checkpoints: int | None = None
    kept_graphs: int = 0


@dataclass(frozen=True)
class Offers:
    """What a front end can record.

    Attributes:
        name: the front end, for messages (``"tmg.adapt"``, ``"MetaSGD.step(loss)"``...).
        per_step_batches: the inner loss may change from step to step.
        flow_samples: the states sample a gradient flow (plain gradient descent or an
            ODE solve), so ``record.time_step`` is known.
        recompute: the inner loss can be recomputed at any point (needed for curvature).
        proximal: the front end can add a proximal term to the inner loss.
        step_jacobians: the front end records discrete steps (not a flow or a solver).
        graph: the front end can keep the unrolled graph.
        step_meta: the step map has a learned lr (a tensor that requires grad).
        horizon: the number of inner steps is known when the loop starts.
    """

    name: str
    per_step_batches: bool
    flow_samples: bool
    recompute: bool = True
    proximal: bool = True
    step_jacobians: bool = True
    graph: bool = True
    step_meta: bool = False
    horizon: bool = True


def check_fit(rule: object, needs: Needs, offers: Offers) -> None:
    """Raise ``ValueError`` naming the rule and the front end when ``needs`` exceeds ``offers``.

    This is the only place where a rule is checked against a front end.
    """
    what = f"{type(rule).__name__}"
    if needs.graph and not offers.graph:
        raise ValueError(f"{what} keeps the unrolled graph, which {offers.name} does not offer")
    if needs.step_jacobians and not offers.step_jacobians:
        raise ValueError(
            f"{what} differentiates discrete inner steps, but {offers.name} has none (it "
            "solves a gradient flow or runs your own solver); use a rule of the matching "
            "family (tmg.Adjoint for flows, tmg.ImplicitCG / tmg.ImplicitNeumann for solvers)"
        )
    if needs.proximal is not None and not offers.proximal:
        raise ValueError(
            f"{what} needs a proximal term on the inner loss, which {offers.name} cannot add"
        )
    if needs.curvature and not offers.recompute:
        raise ValueError(
            f"{what} needs Hessian-vector products where no step took a gradient (e.g. at the "
            f"final parameters), which {offers.name} cannot recompute; pass a closure that "
            "recomputes the training loss, e.g. opt.step(lambda: loss_fn(net(x), y))"
        )
    if offers.step_meta and not needs.step_meta:
        raise ValueError(
            f"{what} differentiates the solution of the inner problem (or the gradient flow), "
            "which does not depend on the inner learning rate: a learned lr (a tensor that "
            "requires grad) would get no meta-gradient. Use a step rule (tmg.Exact, "
            "tmg.Binomial, tmg.Truncated, tmg.FirstOrder) or tmg.Unrolled, or detach the lr"
        )
    if needs.checkpoints is not None and not offers.horizon:
        raise ValueError(
            f"{what} with checkpoints spaces them over a known number of inner steps, which "
            f"{offers.name} does not know in advance; use tmg.adapt, or store every state"
        )
    if needs.kept_graphs and not offers.horizon:
        raise ValueError(
            f"{what} with keep_graphs keeps the graphs of the last inner steps, which "
            f"{offers.name} cannot tell in advance (it does not know the number of steps); "
            "use tmg.adapt, or keep_graphs=0"
        )
    if needs.flow and not offers.flow_samples:
        raise ValueError(
            f"{what} treats the inner iterates as samples of a gradient flow, which needs plain "
            f"gradient descent (a float lr, no momentum, Adam, weight decay or schedule) or "
            f"tmg.flow; {offers.name} does not give that"
        )
    if offers.per_step_batches and not needs.per_step_batches:
        raise ValueError(
            f"{what} differentiates the solution of one inner objective; give one batch "
            "(batch=...), not per-step batches"
        )
