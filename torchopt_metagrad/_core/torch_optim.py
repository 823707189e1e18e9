"""``torch.optim`` optimizers as pure functional ones (what ``higher`` users pass).

A ``torch.optim`` optimizer updates in place and cannot be differentiated; its param
groups' hyperparameters are translated to a pure ``GradientTransformation`` with the same
update: torchopt's own where it is exact in float64 (``torch.optim.RMSprop``, SGD without
dampening), else the transforms of :mod:`.optim_transforms`. Each is checked against
``torch.optim``'s trajectory and ``higher``'s differentiable optimizer in
``tests/test_higher_compat.py``. Every optimizer ``higher`` supports is here (SGD, Adam,
AdamW, Adagrad, Adadelta, Adamax, ASGD, RMSprop, Rprop); others are refused by name.

Several param groups with different hyperparameters become one transform that applies
each group's update to its own parameters; plain SGD groups (no momentum, weight decay,
nesterov or maximize) become gradient descent with a per-parameter learning rate.
``higher``'s ``override`` (``{"lr": [value, ...]}``, one value or one per group) is
applied to the groups first; a tensor ``lr`` that requires grad is a learned rate (plain
SGD only).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torchopt
from torch import Tensor
from torchopt.base import GradientTransformation

from torchopt_metagrad._core import optim_transforms as ot

__all__ = ["SUPPORTED", "Translated", "check_dampening", "grouped", "translate"]


def _sgd(g: dict[str, Any]) -> Any:
    args = (g["lr"], g["momentum"], g["dampening"], g["weight_decay"], bool(g["nesterov"]))
    if g["momentum"] and g["dampening"]:  # torchopt.sgd keeps a first-step flag: not pure
        return ot.sgd(*args, maximize=bool(g.get("maximize")))
    return torchopt.sgd(
        g["lr"],
        momentum=g["momentum"],
        dampening=g["dampening"],
        weight_decay=g["weight_decay"],
        nesterov=bool(g["nesterov"]),
        maximize=bool(g.get("maximize")),
    )


def _adam(g: dict[str, Any], decoupled: bool) -> Any:
    return ot.adam(
        g["lr"],
        tuple(g["betas"]),
        g["eps"],
        g["weight_decay"],
        bool(g.get("amsgrad")),
        bool(g.get("maximize")),
        decoupled or bool(g.get("decoupled_weight_decay")),
    )


def _rmsprop(g: dict[str, Any]) -> Any:
    return torchopt.rmsprop(
        g["lr"],
        alpha=g["alpha"],
        eps=g["eps"],
        weight_decay=g["weight_decay"],
        momentum=g["momentum"],
        centered=g["centered"],
        maximize=bool(g.get("maximize")),
    )


def _m(g: dict[str, Any]) -> bool:
    return bool(g.get("maximize"))


#: optimizer class -> translator of one param group's settings
SUPPORTED: dict[type, Callable[[dict[str, Any]], Any]] = {
    torch.optim.SGD: _sgd,
    torch.optim.Adam: lambda g: _adam(g, False),
    torch.optim.AdamW: lambda g: _adam(g, True),
    torch.optim.Adagrad: lambda g: ot.adagrad(
        g["lr"], g["lr_decay"], g["weight_decay"], g["initial_accumulator_value"], g["eps"], _m(g)
    ),
    torch.optim.Adadelta: lambda g: ot.adadelta(
        g["lr"], g["rho"], g["eps"], g["weight_decay"], _m(g)
    ),
    torch.optim.Adamax: lambda g: ot.adamax(
        g["lr"], tuple(g["betas"]), g["eps"], g["weight_decay"], _m(g)
    ),
    torch.optim.ASGD: lambda g: ot.asgd(g["lr"], g["lambd"], g["alpha"], g["weight_decay"], _m(g)),
    torch.optim.RMSprop: _rmsprop,
    torch.optim.Rprop: lambda g: ot.rprop(g["lr"], tuple(g["etas"]), tuple(g["step_sizes"]), _m(g)),
}

_PLAIN_OFF = ("momentum", "weight_decay", "nesterov", "maximize")


@dataclass(frozen=True)
class Translated:
    """A ``torch.optim`` optimizer as a pure update.

    Attributes:
        impl: the whole update (one transform, or per-group ones combined by name).
        params: the tensors the optimizer holds, in group order.
        lr: plain SGD in every group: the groups' one rate (a float, or a tensor or dict
            of tensors from ``override``: a learned rate), or ``{name: rate}`` when the
            groups' rates differ; ``None`` otherwise.
    """

    impl: Any
    params: list[Tensor]
    lr: float | Tensor | Mapping[str, Any] | None


def translate(
    opt: torch.optim.Optimizer,
    names: Mapping[int, str] | None = None,
    override: Mapping[str, Any] | None = None,
) -> Translated:
    """The pure update of ``opt`` (with ``override`` applied to its param groups).

    Args:
        opt: the ``torch.optim`` optimizer (only its hyperparameters are used).
        names: ``id(tensor) -> name`` of the adapted parameters; needed when the groups'
            settings differ.
        override: ``higher``'s ``{setting: [value]}`` or ``{setting: [one per group]}``.

    Raises:
        TypeError: an optimizer class with no differentiable equivalent here.
        ValueError: an unsupported option or override, state from earlier steps, or
            param groups with different settings and no ``names``.
    """
    kind = type(opt)
    make = SUPPORTED.get(kind)
    if make is None:
        supported = ", ".join(f"torch.optim.{c.__name__}" for c in SUPPORTED)
        raise TypeError(
            f"optimizer: torch.optim.{kind.__name__} has no differentiable equivalent "
            f"here (supported: {supported}, or any torchopt functional optimizer)"
        )
    _check_fresh(opt)
    settings = _apply_override(opt, override)
    tensors = [[p for p in g["params"]] for g in opt.param_groups]
    params = [p for group in tensors for p in group]
    plain = kind is torch.optim.SGD and not any(s.get(k) for s in settings for k in _PLAIN_OFF)
    learned = [k for s in settings for k, v in s.items() if _requires_grad(v)]
    if plain:
        rates = [s["lr"] for s in settings]
        one = rates[0]
        numbers_only = not any(isinstance(r, (Tensor, Mapping)) for r in rates)
        if all(r is one for r in rates) or (numbers_only and len(set(rates)) == 1):
            # one rate for every group: a float, or one tensor (0-dim, per step) or dict
            if isinstance(one, (Tensor, Mapping)):
                return Translated(None, params, one)
            return Translated(torchopt.sgd(float(one)), params, float(one))
        by_name = _named(tensors, names, "lr")
        lr = {n: _as_tensor(rates[i]) for i, ns in enumerate(by_name) for n in ns}
        return Translated(None, params, lr)
    if learned:
        raise ValueError(
            f"override[{learned[0]!r}] is a tensor that requires grad: a learned "
            f"hyperparameter works only for the lr of plain torch.optim.SGD (no momentum, "
            f"weight decay, nesterov or maximize), got torch.optim.{kind.__name__}"
        )
    settings = [{k: _as_float(v) for k, v in s.items()} for s in settings]
    for s in settings:  # an override's lr too (torch.optim checked only its own groups)
        if isinstance(s.get("lr"), float) and not (math.isfinite(s["lr"]) and s["lr"] >= 0):
            raise ValueError(
                f"optimizer's lr must be a finite float >= 0 (override included), got {s['lr']}"
            )
    if all(s == settings[0] for s in settings[1:]):
        return Translated(make(settings[0]), params, None)
    by_name = _named(tensors, names, "settings")
    return Translated(
        grouped([(frozenset(ns), make(s)) for ns, s in zip(by_name, settings, strict=True)]),
        params,
        None,
    )


def grouped(parts: list[tuple[frozenset[str], Any]]) -> GradientTransformation:
    """One transform applying each part's transform to the parameters it names."""

    def owner(name: str) -> int:
        for i, (ns, _) in enumerate(parts):
            if name in ns:
                return i
        raise ValueError(f"parameter {name!r} is in no param group of the optimizer")

    def split(tree: Any, i: int) -> dict[str, Any]:
        return {n: t for n, t in tree.items() if owner(n) == i}

    def init_fn(params: Any) -> Any:
        return tuple(impl.init(split(params, i)) for i, (_, impl) in enumerate(parts))

    def update_fn(
        updates: Any, state: Any, *, params: Any = None, inplace: bool = True
    ) -> tuple[Any, Any]:
        out: dict[str, Any] = {}
        new = []
        for i, ((_, impl), s) in enumerate(zip(parts, state, strict=True)):
            sub = split(params, i) if params is not None else None
            u, s = impl.update(split(updates, i), s, params=sub, inplace=inplace)
            out.update(u)
            new.append(s)
        return {n: out[n] for n in updates}, tuple(new)

    return GradientTransformation(init_fn, update_fn)


def _requires_grad(v: Any) -> bool:
    return isinstance(v, Tensor) and v.requires_grad


def _as_tensor(v: Any) -> Tensor:
    return v if isinstance(v, Tensor) else torch.tensor(float(v), dtype=torch.float64)


def _as_float(v: Any) -> Any:
    return float(v) if isinstance(v, Tensor) and v.dim() == 0 else v


def _named(
    tensors: list[list[Tensor]], names: Mapping[int, str] | None, what: str
) -> list[list[str]]:
    if names is None:
        raise ValueError(
            f"optimizer has {len(tensors)} param groups with different {what}; give the "
            "parameters by name (innerloop_ctx, or tmg.adapt with the optimizer's tensors "
            "in params). Tasks under torch.func.vmap cannot be matched to the optimizer's "
            "tensors: there, use one group (or a torchopt optimizer), or loop over the tasks"
        )
    out = []
    for group in tensors:
        missing = [p for p in group if id(p) not in names]
        if missing:
            raise ValueError(
                f"optimizer holds a tensor of shape {tuple(missing[0].shape)} that is not "
                "among the adapted parameters"
            )
        out.append([names[id(p)] for p in group])
    return out


def _apply_override(opt: torch.optim.Optimizer, override: Mapping[str, Any] | None) -> list[dict]:
    settings = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    if override is None:
        return settings
    if not isinstance(override, Mapping):
        raise TypeError(f"override must be a dict such as {{'lr': [lr]}}, got {override!r}")
    n = len(settings)
    for key, values in override.items():
        if key not in settings[0]:
            raise ValueError(
                f"override[{key!r}]: torch.optim.{type(opt).__name__} has no setting {key!r} "
                f"(its settings: {sorted(settings[0])})"
            )
        listed = isinstance(values, list) or (isinstance(values, tuple) and key not in _TUPLES)
        seq = list(values) if listed else [values]
        if len(seq) not in (1, n):
            raise ValueError(
                f"override[{key!r}] has {len(seq)} values for {n} param groups; give one, or "
                "one per group (as higher does)"
            )
        for i, s in enumerate(settings):
            s[key] = seq[0] if len(seq) == 1 else seq[i]
    return settings


_TUPLES = frozenset({"betas", "etas", "step_sizes"})


def _check_fresh(opt: torch.optim.Optimizer) -> None:
    for state in opt.state.values():
        step = state.get("step", 0)
        started = bool(step != 0) or state.get("momentum_buffer") is not None
        if started:
            raise ValueError(
                f"optimizer: this torch.optim.{type(opt).__name__} has already taken steps "
                "(its state holds a step count or momentum); the inner loop starts from a "
                "fresh optimizer state. Pass an optimizer that has not been stepped"
            )


def check_dampening(momentum: float, dampening: float, lr: Any) -> None:
    """Refuse momentum with dampening under a learning-rate schedule (no pure update)."""
    if momentum and dampening and callable(lr):
        raise ValueError(
            "dampening with a learning-rate schedule is not supported (torchopt.sgd keeps "
            "its first-step rule in a closure flag); give a float lr or dampening=0"
        )
