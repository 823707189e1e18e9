"""Outer-loop methods: a meta-gradient rule from the registry, or the Reptile direction.

A *method* is written as one string, ``name[:key=value,...]``:

* ``name`` is any rule in ``tmg.available_rules()`` (``exact``, ``binomial``,
  ``implicit_cg``, ``adjoint``, ...) or one of the outer directions defined here
  (``reptile``);
* keys are the rule's knobs, read from its dataclass fields
  (``binomial:order=2``, ``implicit_cg:reg=1,maxiter=5``), or the runner's own keys:
  ``steps`` (inner steps for this method, overriding the recipe's), ``label`` (its
  name in tables), ``flow`` (solve the inner problem as a gradient flow with
  ``tmg.flow`` and this torchdiffeq method, for rules that support it).

The grammar is the library's (``tmg.parse_rule_spec``, ``tmg.format_rule``): knobs and
their types come from the rule classes and nothing here branches on a rule's name, so a
rule added to the library is usable from every recipe's command line.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils import _pytree as pytree

import torchopt_metagrad as tmg

__all__ = [
    "DIRECTIONS",
    "Method",
    "TaskStats",
    "batched_direction",
    "knob_options",
    "parse_method",
    "task_direction",
]

LossFn = Callable[[dict[str, Tensor], Any], Tensor]
#: ``metrics(params, batch) -> {name: 0-dim tensor}``, evaluated without a graph.
MetricFn = Callable[[dict[str, Tensor], Any], dict[str, Tensor]]

#: Keys of a method spec that configure the runner, not the rule.
RUNNER_KEYS: dict[str, Any] = {"steps": int, "label": str, "flow": str}


@dataclass(frozen=True)
class TaskStats:
    """What one task (or, from :func:`batched_direction`, a meta-batch on average)
    contributed to a meta-step.

    Attributes:
        query_loss: outer (validation) loss at the adapted parameters.
        extras: rule diagnostics, e.g. the CG residual and solver warnings.
        metrics: the problem's outer metrics at the adapted parameters (e.g. accuracy).
    """

    query_loss: float
    extras: dict[str, float]
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)


#: Outer directions that are not meta-gradients of the validation loss, by name.
#: Each is ``direction(method, loss_fn, params, task, steps, lr, scale) -> TaskStats``
#: and adds ``scale * direction`` to ``.grad`` of ``params``.
DIRECTIONS: dict[str, Callable[..., TaskStats]] = {}


@dataclass(frozen=True)
class Method:
    """A parsed method spec: a rule name or an outer direction, its knobs, runner keys.

    ``knobs`` are the rule's knobs that differ from their defaults, in field order (as
    ``tmg.format_rule`` writes them), so two spellings of one rule are equal methods.
    """

    name: str
    knobs: tuple[tuple[str, Any], ...] = ()
    steps: int | None = None
    label: str = ""
    flow: str | None = None

    @property
    def is_rule(self) -> bool:
        """True for a meta-gradient rule of the library, False for an outer direction."""
        return self.name not in DIRECTIONS

    @property
    def spec(self) -> str:
        """The canonical spec string (parses back to an equal ``Method``)."""
        items = [*self._knob_items(), *self._runner_items(RUNNER_KEYS)]
        return self.name + (":" + ",".join(items) if items else "")

    @property
    def display(self) -> str:
        """The label, or the spec in function-call form: ``binomial(order=2)``."""
        if self.label:
            return self.label
        items = [*self._knob_items(), *self._runner_items(("steps", "flow"))]
        return self.name + (f"({','.join(items)})" if items else "")

    @property
    def slug(self) -> str:
        """A file-name-safe form of :attr:`display`."""
        keep = "".join(c if c.isalnum() or c in "-_." else "_" for c in self.display)
        return keep.strip("_") or self.name

    def _knob_items(self) -> list[str]:
        if not self.is_rule:
            return []
        _, _, items = tmg.format_rule(self.build_rule()).partition(":")
        return [items] if items else []

    def _runner_items(self, keys: Iterable[str]) -> list[str]:
        return [f"{k}={getattr(self, k)}" for k in keys if getattr(self, k)]

    def check(self, steps: int) -> None:
        """Raise ``ValueError`` if the rule does not fit ``steps`` inner steps (order > K)."""
        if self.is_rule:
            try:
                self.build_rule().validate(self.steps or steps)
            except ValueError as err:
                raise ValueError(f"{self.display}: {err}") from None

    def build_rule(self) -> tmg.AbstractRule:
        """A fresh rule object (rules such as ``ImplicitCG`` keep a log of their last solve)."""
        if not self.is_rule:
            raise TypeError(f"{self.name!r} is an outer direction, not a meta-gradient rule")
        return tmg.make_rule(self.name, **dict(self.knobs))


def parse_method(text: str) -> Method:
    """Parse ``name[:key=value,...]`` into a :class:`Method`.

    The rule name and knobs follow the library's grammar (``tmg.parse_rule_spec``);
    the runner keys (``steps``, ``label``, ``flow``) and the outer directions are
    added here.

    Raises:
        ValueError: unknown name or key, a badly formed item, or knob values the rule
            rejects (the rule's own message); messages list what is valid.
    """
    name, values = tmg.parse_rule_spec(text, extra_keys=RUNNER_KEYS, extra_names=DIRECTIONS)
    runner = {k: values.pop(k) for k in RUNNER_KEYS if k in values}
    if runner.get("steps") is not None and runner["steps"] < 1:
        raise ValueError(f"{name}: steps must be >= 1, got {runner['steps']}")
    label = runner.get("label")
    if label is not None and (label.strip(".") == "" or any(c in label for c in "/\\")):
        raise ValueError(
            f"{name}: label={label!r} names the run's folder: use a plain name (no '/' or "
            "'\\', not '.' or '..')"
        )
    if runner.get("flow") is not None:
        try:
            tmg.ODE(runner["flow"])
        except (TypeError, ValueError) as err:
            raise ValueError(f"{name}: flow={runner['flow']}: {err}") from None
    if name in DIRECTIONS:
        if runner.get("flow") is not None:
            raise ValueError(f"{name}: flow= is only for meta-gradient rules")
        return Method(name, **runner)
    missing = [
        f.name
        for f in dataclasses.fields(tmg.rule_class(name))
        if f.init
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
        and f.name not in values
    ]
    if missing:
        hint = ", ".join(f"--{m.replace('_', '-')} / {m}=..." for m in missing)
        raise ValueError(f"rule {name!r} needs {hint}")
    try:
        rule = tmg.make_rule(name, **values)  # the rule's own checks (order >= 0, reg > 0, ...)
    except (TypeError, ValueError) as err:
        raise ValueError(f"rule {name!r}: {err}") from None
    if runner.get("flow") is not None and not rule.needs(1).flow:
        raise ValueError(f"{name}: flow= needs a rule that works on a gradient flow")
    _, knobs = tmg.parse_rule_spec(tmg.format_rule(rule))  # canonical: the non-default knobs
    return Method(name, tuple(knobs.items()), **runner)


def knob_options() -> dict[str, tuple[Any, list[str]]]:
    """Every knob of every registered rule: ``{knob: (type, [rule names])}``."""
    options: dict[str, tuple[Any, list[str]]] = {}
    for name in tmg.available_rules():
        for knob, tp in tmg.rule_knobs(name).items():
            options.setdefault(knob, (tp, []))[1].append(name)
    return options


def task_direction(
    method: Method,
    rule: tmg.AbstractRule | None,
    loss_fn: LossFn,
    params: Mapping[str, Tensor],
    task: tuple[Any, Any],
    *,
    steps: int,
    lr: float | Tensor | Mapping[str, Tensor] | None,
    scale: float,
    adapt: Sequence[str] | None = None,
    optimizer: Any = None,
    metric_fn: MetricFn | None = None,
) -> TaskStats:
    """Add ``scale`` times one task's outer direction to ``.grad`` of ``params``.

    For a rule, that is its meta-gradient estimate of the query loss after ``steps``
    inner steps (``tmg.adapt``, or ``tmg.flow`` for ``flow=...``); the backward lands
    on ``params``' ``.grad`` as for any loss, and on the ``.grad`` of a learned ``lr``
    (``tmg.adapt``'s forms: 0-dim, per step, per parameter). ``adapt``: the names that
    adapt (``tmg.adapt``'s ``adapt=``; the others get their meta-gradient through the
    inner loop); ``optimizer``: a torchopt inner optimizer (then ``lr`` is ``None``).
    ``metric_fn``: outer metrics at the adapted parameters, logged beside the loss. For
    an outer direction (Reptile) it is whatever :data:`DIRECTIONS` computes (a float
    ``lr``, every parameter adapting: see :func:`recipes.common.inner.check_method`).
    """
    if not method.is_rule:
        if not isinstance(lr, (int, float)) or adapt is not None or optimizer is not None:
            raise ValueError(f"{method.display}: a learned lr, adapt= and an optimizer need a rule")
        return DIRECTIONS[method.name](method, loss_fn, params, task, steps, lr, scale)
    assert rule is not None
    support, query = task
    with warnings.catch_warnings(record=True) as caught, tmg.diagnostics.collect() as reports:
        warnings.simplefilter("always", tmg.SolverWarning)
        if method.flow is None:
            adapted = tmg.adapt(
                loss_fn, params, support, steps=steps, lr=lr, rule=rule, adapt=adapt,
                optimizer=optimizer,
            )  # fmt: skip
        else:
            if not isinstance(lr, (int, float)) or adapt is not None or optimizer is not None:
                raise ValueError(
                    f"{method.display}: a learned lr, adapt= and an optimizer need flow= off"
                )
            adapted = tmg.flow(
                loss_fn,
                params,
                support,
                T=steps * lr,
                rule=rule,
                solver=tmg.ODE(method.flow),
                save_every=lr,
            )
        query_loss = loss_fn(adapted, query)
        (query_loss * scale).backward()
    metrics = {}
    if metric_fn is not None:
        with torch.no_grad():
            found = metric_fn({k: v.detach() for k, v in adapted.items()}, query)
        metrics = {k: float(v) for k, v in found.items()}
    return TaskStats(float(query_loss.detach()), _rule_extras(caught, reports), metrics)


def batched_direction(
    method: Method,
    rule: tmg.AbstractRule,
    loss_fn: LossFn,
    params: Mapping[str, Tensor],
    tasks: Sequence[tuple[Any, Any]],
    *,
    steps: int,
    lr: float | Tensor | Mapping[str, Tensor] | None,
    scale: float,
    adapt: Sequence[str] | None = None,
    optimizer: Any = None,
    metric_fn: MetricFn | None = None,
) -> TaskStats:
    """:func:`task_direction` for all ``tasks`` at once, under ``torch.func.vmap``.

    The tasks' tensors are stacked (they must have equal shapes); the library runs
    their inner loops together when it can (a pure loss, a step-product rule) and one
    after another inside the vmap otherwise, with the same meta-gradient up to float
    round-off. Adds ``scale`` times the sum of the tasks' directions to ``.grad``;
    returns the mean over tasks of the query loss, the metrics and the rule diagnostics.
    """
    if not method.is_rule or method.flow is not None:
        raise ValueError(f"{method.display}: tasks under vmap need a rule without flow=")
    stacked = pytree.tree_map(lambda *xs: torch.stack(xs), *tasks)

    def one(task: tuple[Any, Any]) -> tuple[Tensor, dict[str, Tensor]]:
        support, query = task
        adapted = tmg.adapt(
            loss_fn, params, support, steps=steps, lr=lr, rule=rule, adapt=adapt,
            optimizer=optimizer,
        )  # fmt: skip
        found: dict[str, Tensor] = {}
        if metric_fn is not None:
            with torch.no_grad():
                found = metric_fn({k: v.detach() for k, v in adapted.items()}, query)
        return loss_fn(adapted, query), found

    with warnings.catch_warnings(record=True) as caught, tmg.diagnostics.collect() as reports:
        warnings.simplefilter("always", tmg.SolverWarning)
        losses, metrics = torch.func.vmap(one)(stacked)
        (losses.sum() * scale).backward()
    means = {k: float(v.float().mean()) for k, v in metrics.items()}
    return TaskStats(float(losses.detach().mean()), _rule_extras(caught, reports), means)


def _rule_extras(caught: list[warnings.WarningMessage], reports: list[Any]) -> dict[str, float]:
    """Rule diagnostics as numbers (mean over reports); solver warnings counted, others
    re-emitted (they are the caller's business)."""
    solver = [w for w in caught if issubclass(w.category, tmg.SolverWarning)]
    for w in caught:
        if not issubclass(w.category, tmg.SolverWarning):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    extras: dict[str, float] = {}
    infos = [r.info for r in reports if r.info is not None]  # e.g. ImplicitCG's CGInfo
    for info in infos:
        for k, v in dataclasses.asdict(info).items():
            if isinstance(v, (int, float, Tensor)) and not isinstance(v, str):
                # numbers only (AdjointInfo.scheme is a name)
                value = float(v.float().mean()) if isinstance(v, Tensor) else float(v)
                extras[f"rule/{k}"] = extras.get(f"rule/{k}", 0.0) + value / len(infos)
    if infos or solver:
        extras["rule/solver_warnings"] = float(len(solver))
    return extras


def _reptile(
    method: Method,
    loss_fn: LossFn,
    params: Mapping[str, Tensor],
    task: tuple[Any, Any],
    steps: int,
    lr: float,
    scale: float,
) -> TaskStats:
    """Reptile (Nichol et al., 2018): the outer direction ``theta - phi_K``.

    Why this is not a rule of the library: every rule estimates the derivative of the
    *query* loss at ``phi_K`` with respect to ``theta``. Reptile's direction
    ``theta - phi_K = lr * sum_k grad l(phi_k)`` is not the derivative of any outer
    loss (it never looks at the query set), so it cannot be written as a map from
    (trajectory, g) to a meta-gradient. It needs only the adapted point, so the inner
    loop runs without a graph: ``tmg.adapt`` with ``FirstOrder`` (which stores no
    snapshots), detached. The query loss is computed for logging only.
    """
    support, query = task
    adapted = tmg.adapt(loss_fn, params, support, steps=steps, lr=lr, rule=tmg.FirstOrder())
    with torch.no_grad():
        for name, p in params.items():
            delta = (p - adapted[name]).detach() * scale
            if p.grad is None:
                p.grad = delta
            else:
                p.grad.add_(delta)
        query_loss = loss_fn({k: v.detach() for k, v in adapted.items()}, query)
    return TaskStats(float(query_loss), {})


DIRECTIONS["reptile"] = _reptile
