r"""Every rule against ``Exact``: error, cost, and the curvature regime, in one table.

:func:`compare` (functional inner loop, ``tmg.adapt``) and :func:`compare_run` (any inner
loop: a callable that runs it with a given rule, e.g. with ``tmg.MetaSGD``) measure, for
each rule:

* the relative error :math:`\|\hat g - g\| / \|g\|` and cosine against the exact
  meta-gradient :math:`g` of the same parameters;
* the Jacobian-/Hessian-vector products its backward computed
  (:attr:`~torchopt_metagrad.diagnostics.RuleReport.products`, counted by the record);
* the wall time of the inner loop plus the backward (best of ``repeats``, the rules
  interleaved), and, in a separate pass (tracking slows every op), the peak live tensor
  storage (:class:`~torchopt_metagrad.diagnostics.LiveMemoryTracker`);
* what the rule reported (``BinomialInfo``: the regime estimate, the order chosen).

The reference pass runs the exact product once more with a probe that also estimates
:math:`\|A_k\|` (:math:`\mathrm{lr}\,\|H_k\|` for gradient descent) at every step by power
iteration (:func:`~torchopt_metagrad.diagnostics.step_norms`, batched over the steps), so
the table states :math:`\mathrm{lr}\max_k\|H_k\|` and :math:`K` times it.
"""

from __future__ import annotations

import dataclasses
import math
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from torchopt_metagrad._core.checks import check_callable, check_int
from torchopt_metagrad._core.link import collect
from torchopt_metagrad.diagnostics.estimators import Comparison, step_norms
from torchopt_metagrad.diagnostics.memory import LiveMemoryTracker
from torchopt_metagrad.errors import RegimeWarning
from torchopt_metagrad.functional import adapt
from torchopt_metagrad.rules import AbstractRule, BinomialInfo, CGInfo, Exact, StepProductRule
from torchopt_metagrad.rules.base import Estimate, RecordProtocol, check_rule
from torchopt_metagrad.rules.spec import format_rule
from torchopt_metagrad.rules.truncated import backward_product

__all__ = ["EstimatorTable", "RuleRow", "compare", "compare_run"]


@dataclass(frozen=True)
class _ProbeInfo:
    norms: tuple[float, ...]


@dataclass(frozen=True)
class _CurvatureProbe(StepProductRule):
    """The exact product plus power-iteration estimates of ``||A_k||`` (not registered)."""

    iters: int = 10
    seed: int = 0

    def meta_gradient(self, record: RecordProtocol, g: Tensor) -> Estimate:
        out = backward_product(record, g, 0)
        gen = torch.Generator().manual_seed(self.seed)
        info = _ProbeInfo(tuple(step_norms(record, iters=self.iters, generator=gen)))
        if isinstance(out, Estimate):
            return Estimate(out.value, info, out.meta)
        return Estimate(out, info)


@dataclass(frozen=True)
class RuleRow:
    """One rule's measurements (see :func:`compare_run`).

    Attributes:
        label: the rule's spec (``tmg.format_rule``) or the label given.
        rule: the rule object.
        rel_error, cosine: against the exact meta-gradient.
        products: products its backward(s) computed (``None``: no record, ``Unrolled``).
        time_s: best wall time of one run plus its backward.
        peak_live_bytes: peak live tensor storage of one run plus backward (``None``: not
            measured).
        info: what the rule reported (e.g. ``BinomialInfo``), else ``None``.
    """

    label: str
    rule: AbstractRule
    rel_error: float
    cosine: float
    products: int | None
    time_s: float
    peak_live_bytes: int | None
    info: Any

    @property
    def note(self) -> str:
        """The rule's report in a few words."""
        info = self.info
        if isinstance(info, BinomialInfo):
            if info.auto:
                if info.fell_back:
                    return f"auto: gave up at order {info.tried}, exact product returned"
                return f"auto: order {info.order}"
            if info.dropped is not None and info.order:
                flag = " (warns)" if info.reliable is False else ""
                return f"drops ~{info.dropped:.2g} of estimate{flag}"
        if isinstance(info, CGInfo):
            return f"CG: {info.iterations} it., residual {info.residual:.1e}"
        return ""


@dataclass(frozen=True)
class EstimatorTable:
    r"""The result of :func:`compare`: one :class:`RuleRow` per rule and the regime.

    ``str(table)`` is a printable (markdown) table; :meth:`as_dict` a plain dict.

    Attributes:
        steps: inner steps K (the largest over the inner loops a run had).
        step_norms: :math:`\|A_k\|` estimates by power iteration, ``k = 0..K-1`` (the
            maximum over the inner loops of a run, step by step).
        rows: one per rule, ``Exact`` first.
        power_iters: power-iteration sweeps used.
    """

    steps: int
    step_norms: tuple[float, ...]
    rows: tuple[RuleRow, ...]
    power_iters: int

    @property
    def lr_max_h(self) -> float:
        r""":math:`\max_k \|A_k\|` (:math:`\mathrm{lr}\max_k\|H_k\|` for gradient descent)."""
        return max(self.step_norms, default=0.0)

    @property
    def k_lr_max_h(self) -> float:
        """``steps * lr_max_h``."""
        return self.steps * self.lr_max_h

    def __getitem__(self, label: str) -> RuleRow:
        for row in self.rows:
            if row.label == label:
                return row
        raise KeyError(f"no rule labelled {label!r}; labels: {[r.label for r in self.rows]}")

    def as_dict(self) -> dict[str, Any]:
        """Plain values: the regime and ``{label: measurements}`` (JSON-serializable)."""
        return {
            "steps": self.steps,
            "lr_max_H": self.lr_max_h,
            "K_lr_max_H": self.k_lr_max_h,
            "step_norms": list(self.step_norms),
            "power_iters": self.power_iters,
            "rules": {
                r.label: {
                    "rel_error": r.rel_error,
                    "cosine": r.cosine,
                    "products": r.products,
                    "time_s": r.time_s,
                    "peak_live_bytes": r.peak_live_bytes,
                    "info": _plain(r.info),
                }
                for r in self.rows
            },
        }

    def __str__(self) -> str:
        exact_time = self.rows[0].time_s
        lines = [
            f"K = {self.steps} inner steps; lr * max_k ||H_k|| ~ {self.lr_max_h:.3g}, "
            f"K * lr * max_k ||H_k|| ~ {self.k_lr_max_h:.3g} (power iteration, "
            f"{self.power_iters} sweeps)",
            "",
            "| rule | rel. error | cosine | products | time (ms) | time / Exact "
            "| peak live (KiB) | note |",
            "|---|---:|---:|---:|---:|---:|---:|---|",
        ]
        for r in self.rows:
            products = "-" if r.products is None else str(r.products)
            memory = "-" if r.peak_live_bytes is None else f"{r.peak_live_bytes / 1024:.1f}"
            ratio = r.time_s / exact_time if exact_time > 0 else math.nan
            lines.append(
                f"| {r.label} | {r.rel_error:.2e} | {r.cosine:.6f} | {products} "
                f"| {1e3 * r.time_s:.2f} | {ratio:.2f} | {memory} | {r.note} |"
            )
        return "\n".join(lines)


def _plain(info: Any) -> Any:
    if info is None:
        return None
    if dataclasses.is_dataclass(info) and not isinstance(info, type):
        return {"type": type(info).__name__, **dataclasses.asdict(info)}
    return repr(info)


def _label(rule: AbstractRule) -> str:
    try:
        return format_rule(rule)
    except ValueError:
        return repr(rule)


def _flat(grads: Sequence[Tensor | None], leaves: Sequence[Tensor]) -> Tensor:
    return torch.cat(
        [
            (torch.zeros_like(p) if g is None else g).reshape(-1)
            for g, p in zip(grads, leaves, strict=True)
        ]
    )


def compare_run(
    run: Callable[[AbstractRule], Tensor],
    params: Mapping[str, Tensor] | Sequence[Tensor],
    *,
    rules: Sequence[AbstractRule] | Mapping[str, AbstractRule],
    repeats: int = 3,
    memory: bool = True,
    power_iters: int = 10,
    seed: int = 0,
) -> EstimatorTable:
    """Compare rules on any inner loop: ``run(rule)`` returns the outer loss.

    ``run`` must run the whole inner loop with the rule it is given (``tmg.adapt(...,
    rule=rule)``, ``tmg.MetaSGD(net, lr, rule=rule)``, ``tmg.innerloop_ctx(...,
    rule=rule)``), starting from the same state each call (restore a module with
    ``torchopt.recover_state_dict``), and return a scalar computed from the adapted
    parameters; each rule's meta-gradient is the gradient of that scalar w.r.t.
    ``params``.

    Args:
        run: ``run(rule) -> scalar outer loss``.
        params: the tensors to differentiate (a dict or a list), e.g. the initial
            parameters.
        rules: the rules to measure, or ``{label: rule}``; ``tmg.Exact()`` is added as the
            first row when absent (it is the reference).
        repeats: timed runs per rule (best kept; the rules interleaved), ``>= 1``.
        memory: also measure peak live tensor storage (one more run per rule).
        power_iters: power-iteration sweeps for the ``||A_k||`` estimates, ``>= 1``.
        seed: seeds the power iteration's starting vectors.

    Returns:
        :class:`EstimatorTable`.

    Raises:
        ValueError, TypeError: a bad argument (named), or ``run`` ran no inner loop with
            the rule it was given.
    """
    check_callable(run, "run")
    check_int(repeats, "repeats", minimum=1)
    check_int(power_iters, "power_iters", minimum=1)
    check_int(seed, "seed", minimum=0)
    if not isinstance(memory, bool):
        raise TypeError(f"memory must be a bool, got {memory!r}")
    leaves = list(params.values()) if isinstance(params, Mapping) else list(params)
    if not leaves or not all(isinstance(p, Tensor) and p.requires_grad for p in leaves):
        raise ValueError("params must be a non-empty dict or list of tensors requiring grad")
    labelled = _labelled(rules)

    def grad_of(rule: AbstractRule) -> tuple[Tensor, list[Any]]:
        with collect() as reports:
            loss = run(rule)
            if not isinstance(loss, Tensor) or loss.numel() != 1:
                raise ValueError(f"run(rule) must return a scalar tensor, got {loss!r}")
            grads = torch.autograd.grad(loss, leaves, allow_unused=True)
        return _flat(grads, leaves).detach(), reports

    with warnings.catch_warnings():
        # the table reports each rule's regime; the warning would repeat it (or raise)
        warnings.filterwarnings("ignore", category=RegimeWarning)
        probe = _CurvatureProbe(iters=power_iters, seed=seed)
        exact, reports = grad_of(probe)
        probes = [r for r in reports if isinstance(r.info, _ProbeInfo)]
        if not probes:
            raise ValueError(
                "run(rule) ran no inner loop with the rule it was given: pass it on, e.g. "
                "tmg.adapt(..., rule=rule) or tmg.MetaSGD(net, lr, rule=rule)"
            )
        steps = max(r.steps for r in probes)
        norms = [
            max((r.info.norms[k] for r in probes if k < len(r.info.norms)), default=0.0)
            for k in range(steps)
        ]
        first: dict[str, tuple[Tensor, list[Any]]] = {}
        best = dict.fromkeys(labelled, math.inf)
        for _ in range(repeats):
            for label, rule in labelled.items():
                start = time.perf_counter()
                result = grad_of(rule)
                best[label] = min(best[label], time.perf_counter() - start)
                first.setdefault(label, result)
                del result
        peaks: dict[str, int | None] = dict.fromkeys(labelled)
        if memory:
            for label, rule in labelled.items():
                with LiveMemoryTracker() as mem:
                    grad_of(rule)
                peaks[label] = mem.peak_bytes
    rows = []
    for label, rule in labelled.items():
        estimate, reports = first[label]
        cmp = Comparison.between(estimate, exact)
        ours = [r for r in reports if r.rule is rule]
        rows.append(
            RuleRow(
                label=label,
                rule=rule,
                rel_error=cmp.rel_error,
                cosine=cmp.cosine,
                products=sum(r.products for r in ours) if ours else None,
                time_s=best[label],
                peak_live_bytes=peaks[label],
                info=ours[0].info if len(ours) == 1 else tuple(r.info for r in ours) or None,
            )
        )
    return EstimatorTable(steps, tuple(norms), tuple(rows), power_iters)


def _labelled(rules: Any) -> dict[str, AbstractRule]:
    if isinstance(rules, Mapping):
        items = list(rules.items())
    elif isinstance(rules, Sequence) and not isinstance(rules, str):
        items = [(_label(r) if isinstance(r, AbstractRule) else "", r) for r in rules]
    else:
        raise TypeError(f"rules must be a list of rules or a dict of them, got {rules!r}")
    if not items:
        raise ValueError("rules must name at least one rule")
    out: dict[str, AbstractRule] = {}
    if not any(isinstance(r, Exact) for _, r in items):
        out["exact"] = Exact()
    for label, rule in items:
        check_rule(rule, f"rules[{label!r}]" if label else "rules[...]")
        if not isinstance(label, str) or not label:
            raise ValueError(f"rule labels must be non-empty strings, got {label!r}")
        if label in out:
            raise ValueError(f"rules: the label {label!r} appears twice")
        out[label] = rule
    exact = [k for k, r in out.items() if isinstance(r, Exact)]
    return {exact[0]: out[exact[0]], **{k: r for k, r in out.items() if k != exact[0]}}


def compare(
    loss_fn: Callable[[dict[str, Tensor], Any], Tensor],
    params: Mapping[str, Tensor],
    batch: Any,
    *,
    steps: int,
    lr: float | None = None,
    rules: Sequence[AbstractRule] | Mapping[str, AbstractRule],
    query: Any = None,
    optimizer: Any = None,
    repeats: int = 3,
    memory: bool = True,
    power_iters: int = 10,
    seed: int = 0,
) -> EstimatorTable:
    """Compare rules on ``tmg.adapt(loss_fn, params, batch, steps=, lr=, rule=)``.

    The outer loss is ``loss_fn(adapted, query)`` (``query=None``: ``batch`` again); the
    meta-gradients are w.r.t. ``params``. ``optimizer`` is passed to ``tmg.adapt``
    (leave ``lr`` out then). The other arguments are those of :func:`compare_run`.

    Example::

        table = tmg.diagnostics.compare(loss_fn, params, support, query=query, steps=10,
                                        lr=0.01, rules=[tmg.Binomial(2), tmg.Truncated(2)])
        print(table)            # markdown table, Exact first
        table.as_dict()["rules"]["binomial:order=2"]["rel_error"]
    """
    outer = batch if query is None else query

    def run(rule: AbstractRule) -> Tensor:
        adapted = adapt(loss_fn, params, batch, steps=steps, lr=lr, rule=rule, optimizer=optimizer)
        return loss_fn(adapted, outer)

    check_int(steps, "steps", minimum=1)
    leaves = {n: p for n, p in params.items() if isinstance(p, Tensor) and p.requires_grad}
    return compare_run(
        run,
        leaves,
        rules=rules,
        repeats=repeats,
        memory=memory,
        power_iters=power_iters,
        seed=seed,
    )
