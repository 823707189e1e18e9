"""A ``higher``-style context for code migrating off ``higher``: :func:`innerloop_ctx`.

A thin layer over the module optimizers of :mod:`torchopt_metagrad.module` (same
sessions, same guarantees)::

    with tmg.innerloop_ctx(model, inner_opt, rule=tmg.Exact()) as (fmodel, diffopt):
        for _ in range(steps):
            diffopt.step(F.cross_entropy(fmodel(x_spt), y_spt))
        F.cross_entropy(fmodel(x_qry), y_qry).backward()
"""

from __future__ import annotations

import contextlib
import copy
import numbers
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from torchopt_metagrad._core.steps import step_map_factory
from torchopt_metagrad.module.optim import Closure, MetaOptimizer
from torchopt_metagrad.module.slots import Slots, is_replaying
from torchopt_metagrad.rules.base import AbstractRule, check_rule

__all__ = ["DifferentiableOptimizer", "innerloop_ctx"]


class DifferentiableOptimizer:
    """The ``diffopt`` of :func:`innerloop_ctx`: ``diffopt.step(loss_or_closure)``."""

    def __init__(self, optimizer: MetaOptimizer) -> None:
        self._opt = optimizer

    def step(self, loss: Tensor | Closure) -> list[Tensor]:
        """Take one inner step of the functional model; returns its new fast weights."""
        self._opt.step(loss)
        return list(self._opt.module.parameters())

    @property
    def rule(self) -> AbstractRule:
        """The meta-gradient rule."""
        return self._opt.rule


@contextlib.contextmanager
def innerloop_ctx(
    model: nn.Module,
    opt: Any,
    *,
    rule: AbstractRule,
    copy_initial_weights: bool = False,
    override: Mapping[str, Any] | None = None,
) -> Iterator[tuple[nn.Module, DifferentiableOptimizer]]:
    """A ``higher.innerloop_ctx`` replacement whose meta-gradient comes from ``rule``.

    ::

        with tmg.innerloop_ctx(model, inner_opt, rule=tmg.Exact()) as (fmodel, diffopt):
            for _ in range(steps):
                diffopt.step(F.cross_entropy(fmodel(x_spt), y_spt))   # or a closure
            F.cross_entropy(fmodel(x_qry), y_qry).backward()          # -> model's .grad

    ``fmodel`` is a copy of ``model`` that shares its parameters (the initial weights)
    and buffers; ``model`` itself is not changed. A thin layer over
    :class:`MetaOptimizer` on that copy.

    Differences from ``higher``: ``copy_initial_weights`` defaults to ``False`` (the
    meta-gradient lands on ``model``'s ``.grad``, which is what MAML code passes);
    ``fmodel`` is a plain module (no ``params=``/``time=`` arguments); after the block,
    if any step was ``diffopt.step(closure)``, ``fmodel`` and ``diffopt`` raise when
    used (the recorded closures reference ``fmodel``; the exit breaks that cycle) —
    compute the outer loss inside the block, its backward may run after it.

    Args:
        model: the network whose parameters are the initial weights.
        opt: a ``torch.optim.SGD`` / ``torch.optim.Adam`` over (some of) ``model``'s
            parameters (its hyperparameters are used; one param group), a float
            learning rate (plain gradient descent on every parameter), or a torchopt
            functional optimizer. ``Adam`` runs as ``torchopt.adam``, today's
            ``torch.optim.Adam`` formula; ``higher`` uses an older one that adds ``eps``
            before the bias correction, and the meta-gradient through an Adam step is
            sensitive to ``eps``, so Adam meta-gradients differ from ``higher``'s.
        rule: how to compute the meta-gradient, e.g. ``tmg.Exact()``.
        copy_initial_weights: start from detached copies of the weights (``higher``'s
            default), so no meta-gradient reaches ``model``.
        override: ``higher``'s hyperparameter override; ``{"lr": value}`` or
            ``{"lr": [value]}`` (one param group), with ``value`` a float or a tensor (a
            learned learning rate: 0-dim, one per step, or a dict ``{name: tensor}`` over
            the adapted parameters' names), which gets its meta-gradient under ``rule``.
            Plain SGD only (``opt`` a float or a ``torch.optim.SGD`` without momentum,
            weight decay, nesterov or maximize).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    check_rule(rule)
    make_step_map, impl, adapted = _from_inner_opt(opt)
    if override is not None:
        make_step_map, impl = _override(override, opt)
    names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
    include = None
    if adapted is not None:
        missing = [i for i, p in enumerate(adapted) if id(p) not in names]
        if missing:
            raise ValueError(f"opt holds {len(missing)} tensor(s) that are not parameters of model")
        include = frozenset(names[id(p)] for p in adapted)
    memo: dict[int, Any] = {}
    for p in model.parameters():
        memo[id(p)] = (
            nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad)
            if copy_initial_weights
            else p
        )
    for b in model.buffers():
        memo[id(b)] = b
    fmodel = copy.deepcopy(model, memo)
    inner = MetaOptimizer.__new__(MetaOptimizer)
    inner._setup(fmodel, rule, make_step_map, impl, include)
    diffopt = DifferentiableOptimizer(inner)
    try:
        yield fmodel, diffopt
    finally:
        _close(fmodel, inner)


def _close(fmodel: nn.Module, inner: MetaOptimizer) -> None:
    closures = inner.recorded_closures
    inner._close("diffopt was used after its innerloop_ctx block ended")
    if not closures:
        return
    # Replace the fast weights by detached values: the module no longer references the
    # last step's autograd node, whose records reference the closures, which reference
    # fmodel. The records stay alive as long as an outer loss's graph needs them.
    slots = Slots(fmodel)
    slots.write([t.detach() for t in slots.read()])

    def closed(module: nn.Module, args: Any) -> None:
        if not is_replaying():
            raise RuntimeError(
                "fmodel was used after its innerloop_ctx block ended; with diffopt.step(closure) "
                "compute the outer loss inside the block (its backward may run later)"
            )

    fmodel.register_forward_pre_hook(closed)


def _override(override: Any, opt: Any) -> tuple[Any, Any]:
    """The step map of plain SGD with ``override["lr"]`` (a float or a learned tensor)."""
    if not isinstance(override, Mapping):
        raise TypeError(f"override must be a dict such as {{'lr': [lr]}}, got {override!r}")
    unknown = sorted(set(override) - {"lr"})
    if unknown:
        raise ValueError(f"override supports 'lr' only, got {unknown}")
    lr = override.get("lr")
    if isinstance(lr, (list, tuple)):
        if len(lr) != 1:
            raise ValueError(
                f"override['lr'] has {len(lr)} entries; give one (one param group is supported)"
            )
        lr = lr[0]
    plain = isinstance(opt, numbers.Real) or (
        isinstance(opt, torch.optim.SGD)
        and len(opt.param_groups) == 1
        and not any(opt.param_groups[0].get(k) for k in ("momentum", "weight_decay", "nesterov"))
        and not opt.param_groups[0].get("maximize")
    )
    if not plain:
        raise ValueError(
            "override={'lr': ...} works with plain SGD only (opt a float or a torch.optim.SGD "
            f"without momentum, weight decay, nesterov or maximize), got {type(opt).__name__}"
        )
    make, impl, _ = step_map_factory(lr=lr)
    return make, impl


def _from_inner_opt(opt: Any) -> Any:
    """Step map, torchopt impl and adapted tensors (``None``: all) of innerloop_ctx's ``opt``."""
    if isinstance(opt, numbers.Real) and not isinstance(opt, bool):
        return step_map_factory(lr=opt)
    return step_map_factory(optimizer=opt)
