"""``higher``'s ``innerloop_ctx``, with the rule that computes the meta-gradient as one more
argument: :func:`innerloop_ctx`.

Same signature, defaults and semantics as ``higher.innerloop_ctx`` (checked against
``higher`` 0.2.1 in ``tests/test_higher_compat.py``); a thin layer over the module
optimizers of :mod:`torchopt_metagrad.module` (same sessions, same guarantees)::

    with tmg.innerloop_ctx(model, inner_opt, copy_initial_weights=False, rule=tmg.Exact()) as (
        fmodel,
        diffopt,
    ):
        for _ in range(steps):
            diffopt.step(F.cross_entropy(fmodel(x_spt), y_spt))
        F.cross_entropy(fmodel(x_qry), y_qry).backward()
"""

from __future__ import annotations

import contextlib
import copy
import numbers
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from torchopt_metagrad._core.steps import step_map_factory, torch_optim_factory
from torchopt_metagrad.module.optim import Closure, MetaOptimizer
from torchopt_metagrad.module.session import UntrackedSession
from torchopt_metagrad.module.slots import Slots, is_replaying
from torchopt_metagrad.rules.base import AbstractRule, check_rule
from torchopt_metagrad.rules.unrolled import Unrolled

__all__ = ["DifferentiableOptimizer", "innerloop_ctx"]


class _State:
    """What the functional model and ``diffopt`` share: every parameter's locations in
    ``fmodel`` (``fmodel.parameters()`` order) and the parameters after each step."""

    def __init__(self, fmodel: nn.Module, track: bool) -> None:
        groups: dict[int, list[tuple[nn.Module, str]]] = {}
        for _, sub in fmodel.named_modules():
            for attr, t in sub._parameters.items():
                if t is not None:
                    groups.setdefault(id(t), []).append((sub, attr))
        self.locations = list(groups.values())
        self.track = track
        self.history: list[list[Tensor]] = [self.read()]
        self.diverged = False
        self.closed: str | None = None

    def read(self) -> list[Tensor]:
        return [locs[0][0]._parameters[locs[0][1]] for locs in self.locations]  # type: ignore[misc]

    def record(self) -> list[Tensor]:
        latest = self.read()
        if self.track:
            self.history.append(latest)
        else:
            self.history[0] = latest
        return latest

    @contextlib.contextmanager
    def placed(self, params: Sequence[Tensor]) -> Iterator[None]:
        params = list(params)
        if len(params) != len(self.locations):
            raise ValueError(
                f"params has {len(params)} tensors but the model has {len(self.locations)} "
                "parameters; pass a list in fmodel.parameters() order"
            )
        current = self.read()
        if any(p is not c for p, c in zip(params, current, strict=True)):
            self.diverged = True
        old = [[m._parameters[a] for m, a in locs] for locs in self.locations]
        try:
            for locs, p in zip(self.locations, params, strict=True):
                for m, a in locs:
                    m._parameters[a] = p  # type: ignore[assignment]
            yield
        finally:
            for locs, olds in zip(self.locations, old, strict=True):
                for (m, a), t in zip(locs, olds, strict=True):
                    m._parameters[a] = t


class _Functional:
    """Mixed into ``fmodel``'s class: ``higher``'s ``params=`` and ``parameters(time=)``."""

    _tmg_state: _State

    def forward(self, *args: Any, params: Sequence[Tensor] | None = None, **kwargs: Any) -> Any:
        if params is None:
            return super().forward(*args, **kwargs)  # type: ignore[misc]
        with self._tmg_state.placed(params):
            return super().forward(*args, **kwargs)  # type: ignore[misc]

    def parameters(self, recurse: bool = True, time: int | None = None) -> Iterator[Tensor]:
        """The fast weights after step ``time`` (``0``: the initial ones; ``None``: latest)."""
        state = self._tmg_state
        if time is None or time == -1:
            return iter(state.history[-1])
        if not state.track and time != 0:
            raise ValueError(
                "time: the model is not tracking higher gradients "
                "(track_higher_grads=False); only the latest parameters are kept"
            )
        if not -len(state.history) <= time < len(state.history):
            raise ValueError(f"time={time}: only {len(state.history) - 1} step(s) were taken")
        return iter(state.history[time])

    @property
    def fast_params(self) -> list[Tensor]:
        """The latest fast weights (``higher``'s ``fmodel.fast_params``)."""
        return list(self._tmg_state.history[-1])

    @property
    def init_fast_params(self) -> list[Tensor]:
        """The initial fast weights (``higher``'s ``fmodel.init_fast_params``)."""
        if not self._tmg_state.track:
            raise ValueError("init_fast_params: not kept when track_higher_grads=False")
        return list(self._tmg_state.history[0])

    @property
    def track_higher_grads(self) -> bool:
        """Whether the inner loop builds a meta-graph."""
        return self._tmg_state.track


class DifferentiableOptimizer:
    """The ``diffopt`` of :func:`innerloop_ctx`: ``diffopt.step(loss_or_closure)``."""

    def __init__(
        self, stepper: MetaOptimizer | UntrackedSession, state: _State, rule: AbstractRule
    ) -> None:
        self._stepper = stepper
        self._state = state
        self._rule = rule

    def step(
        self,
        loss: Tensor | Closure,
        params: Sequence[Tensor] | None = None,
        override: Any = None,
        grad_callback: Any = None,
        **kwargs: Any,
    ) -> list[Tensor]:
        """One inner step of the functional model; returns its new fast weights (all of
        the model's parameters, ``fmodel.parameters()`` order), as ``higher`` does.

        ``loss`` is the training loss computed with ``fmodel``, or a closure recomputing
        it (the memory-lean mode; an extension of ``higher``'s API).
        """
        state = self._state
        if state.closed is not None:
            raise RuntimeError(state.closed)
        refused = [k for k, v in (("override", override), ("grad_callback", grad_callback)) if v]
        refused += list(kwargs)
        if refused:
            raise ValueError(
                f"diffopt.step: {refused[0]} is not supported (give override to "
                "innerloop_ctx; clip or transform gradients inside the loss, or pass a torchopt "
                "chain such as torchopt.chain(torchopt.clip_grad_norm(1.0), torchopt.sgd(0.1)) "
                "as the optimizer)"
            )
        if params is not None and any(
            p is not c for p, c in zip(params, state.read(), strict=False)
        ):
            raise ValueError(
                "params: diffopt.step continues from fmodel's latest fast weights only; "
                "higher would continue from the params you pass. Leave params out"
            )
        if state.diverged:
            raise RuntimeError(
                "fmodel was called with params= other than its latest fast weights; higher "
                "makes those the weights the next diffopt.step continues from, which this "
                "inner loop cannot do (it continues from its own latest step). Evaluate other "
                "parameters after the inner loop's last step, or start a new innerloop_ctx"
            )
        if isinstance(self._stepper, MetaOptimizer):
            self._stepper.step(loss)
        else:
            value, closure = (loss, None) if isinstance(loss, Tensor) else (None, loss)
            self._stepper.step(value, closure)
        return state.record()

    @property
    def rule(self) -> AbstractRule:
        """The meta-gradient rule."""
        return self._rule


@contextlib.contextmanager
def innerloop_ctx(
    model: nn.Module,
    opt: Any,
    device: torch.device | str | None = None,
    copy_initial_weights: bool = True,
    override: Mapping[str, Any] | None = None,
    track_higher_grads: bool = True,
    *,
    rule: AbstractRule | None = None,
) -> Iterator[tuple[nn.Module, DifferentiableOptimizer]]:
    """``higher.innerloop_ctx`` whose meta-gradient comes from ``rule``.

    ::

        with tmg.innerloop_ctx(net, opt, copy_initial_weights=False, rule=tmg.Exact()) as (
            fnet,
            diffopt,
        ):
            for _ in range(steps):
                diffopt.step(F.cross_entropy(fnet(x_spt), y_spt))   # or a closure
            F.cross_entropy(fnet(x_qry), y_qry).backward()          # -> net's .grad

    ``fmodel`` is a copy of ``model`` (buffers cloned, as ``higher`` does) that also
    accepts ``fmodel(x, params=[...])`` (evaluate at other weights, ``fmodel.parameters()``
    order) and ``fmodel.parameters(time=t)`` (the weights after step ``t``; ``0``: the
    initial ones), ``fmodel.fast_params`` and ``fmodel.init_fast_params``. ``model``
    itself is not changed.

    Differences from ``higher``: ``fmodel(x, params=P)`` evaluates at ``P`` without making
    ``P`` the fast weights (a later ``diffopt.step`` then raises instead of continuing
    from ``P``); ``diffopt.step`` takes no ``override``/``grad_callback``; a
    ``torch.optim`` optimizer must not have been stepped (``higher`` copies its state);
    ``torch.optim.Adam`` runs today's ``torch.optim`` formula (``higher``'s adds ``eps``
    before the bias correction of the second moment, so Adam trajectories and
    meta-gradients differ unless ``eps=0``); ``maximize=True`` is honoured (``higher``
    ignores it). After the block, if any step was ``diffopt.step(closure)``, ``fmodel``
    and ``diffopt`` raise when used (compute the outer loss inside the block; its backward
    may run after it).

    Args:
        model: the network whose parameters are the initial weights.
        opt: a ``torch.optim`` optimizer over (some of) ``model``'s parameters (SGD,
            Adam, AdamW, Adagrad, Adadelta, Adamax, ASGD, RMSprop, Rprop; several param
            groups; only its hyperparameters are used), a float learning rate (gradient
            descent on every parameter) or a torchopt functional optimizer.
        device: where the fast weights and buffers live (default: ``model``'s device).
        copy_initial_weights: ``True`` (``higher``'s default): the initial fast weights
            are detached copies, so no meta-gradient reaches ``model``; it lands on
            ``fmodel.parameters(time=0)``'s ``.grad``. ``False``: they are differentiable
            copies of ``model``'s parameters (``p.clone()``, as in ``higher``), so the outer
            loss's ``backward()`` fills ``model``'s ``.grad`` (what MAML passes).
        override: ``higher``'s ``{setting: [value]}`` (one value for every param group)
            or ``{setting: [one per group]}``; a tensor ``lr`` that requires grad is a
            learned learning rate (0-dim, per step, or ``{name: tensor}``; plain SGD only)
            and gets its meta-gradient under ``rule``.
        track_higher_grads: ``False``: no meta-graph (``higher``'s test mode): each step is
            taken without ``create_graph`` and the new fast weights are detached leaves;
            ``rule`` is not used.
        rule: how to compute the meta-gradient; ``None`` is ``tmg.Unrolled()``, what
            ``higher`` does.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if any(isinstance(m, _Functional) for m in model.modules()):
        raise ValueError(
            "innerloop_ctx: model is (or contains) the functional model of another "
            "innerloop_ctx; nested contexts over an fmodel are not supported (higher refuses "
            "them too): open the inner context over the original nn.Module"
        )
    for name, flag in (
        ("copy_initial_weights", copy_initial_weights),
        ("track_higher_grads", track_higher_grads),
    ):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {flag!r}")
    if device is not None:
        try:
            device = torch.device(device)
        except (RuntimeError, TypeError) as err:
            raise ValueError(f"device must be a torch.device or a device string: {err}") from None
    rule = Unrolled() if rule is None else rule
    check_rule(rule)
    names = {id(p): n for n, p in model.named_parameters()}
    make_step_map, adapted = _step_map(opt, override, names)
    include = None
    if adapted is not None:
        if any(id(p) not in names for p in adapted):
            raise ValueError("opt holds tensor(s) that are not parameters of model")
        include = frozenset(names[id(p)] for p in adapted)
    fmodel, state = _functional_copy(model, device, copy_initial_weights, track_higher_grads)
    stepper: MetaOptimizer | UntrackedSession
    if track_higher_grads:
        stepper = MetaOptimizer.__new__(MetaOptimizer)
        stepper._setup(fmodel, rule, make_step_map, None, include)
    else:
        stepper = UntrackedSession(Slots(fmodel, include), make_step_map, "diffopt")
    diffopt = DifferentiableOptimizer(stepper, state, rule)
    try:
        yield fmodel, diffopt
    finally:
        if isinstance(stepper, MetaOptimizer):
            _close(fmodel, stepper, state)


_CLASSES: dict[type, type] = {}


def _functional_copy(
    model: nn.Module, device: Any, copy_weights: bool, track: bool
) -> tuple[nn.Module, _State]:
    """A deep copy of ``model`` whose parameters are the initial fast weights."""
    memo: dict[int, Any] = {}
    for p in model.parameters():
        if copy_weights:
            t = p.detach().clone() if device is None else p.detach().to(device, copy=True)
            memo[id(p)] = nn.Parameter(t, requires_grad=p.requires_grad)
        else:
            memo[id(p)] = p.clone() if device is None else p.to(device, copy=True)
    for b in model.buffers():
        memo[id(b)] = b.detach().clone() if device is None else b.detach().to(device, copy=True)
    fmodel = copy.deepcopy(model, memo)
    cls = type(model)
    if cls not in _CLASSES:
        _CLASSES[cls] = type(f"InnerFunctional{cls.__name__}", (_Functional, cls), {})
    fmodel.__class__ = _CLASSES[cls]
    state = _State(fmodel, track)
    fmodel._tmg_state = state  # type: ignore[assignment]
    return fmodel, state


def _close(fmodel: nn.Module, inner: MetaOptimizer, state: _State) -> None:
    closures = inner.recorded_closures
    state.closed = "diffopt was used after its innerloop_ctx block ended"
    inner._close(state.closed)
    if not closures:
        return
    # Replace the fast weights (in the module and the history) by detached values: the
    # module no longer references the last step's autograd node, whose records reference
    # the closures, which reference fmodel. The records stay alive as long as an outer
    # loss's graph needs them.
    slots = Slots(fmodel)
    slots.write([t.detach() for t in slots.read()])
    state.history = [[t.detach() for t in params] for params in state.history]

    def closed(module: nn.Module, args: Any) -> None:
        if not is_replaying():
            raise RuntimeError(
                "fmodel was used after its innerloop_ctx block ended; with diffopt.step(closure) "
                "compute the outer loss inside the block (its backward may run later)"
            )

    fmodel.register_forward_pre_hook(closed)


def _step_map(opt: Any, override: Any, names: dict[int, str]) -> tuple[Any, Any]:
    """Step-map factory and adapted tensors (``None``: all) of ``opt`` with ``override``."""
    if isinstance(opt, torch.optim.Optimizer):
        make, _, params = torch_optim_factory(opt, names, override)
        return make, params
    if override is not None:
        if not (isinstance(opt, numbers.Real) and not isinstance(opt, bool)):
            raise ValueError(
                "override works with a torch.optim optimizer or a float lr, not with a "
                f"{type(opt).__name__} (set a torchopt optimizer's hyperparameters directly)"
            )
        return _plain_override(override), None
    if isinstance(opt, numbers.Real) and not isinstance(opt, bool):
        return step_map_factory(lr=opt)[0], None
    return step_map_factory(optimizer=opt)[0], None


def _plain_override(override: Any) -> Any:
    if not isinstance(override, Mapping):
        raise TypeError(f"override must be a dict such as {{'lr': [lr]}}, got {override!r}")
    unknown = sorted(set(override) - {"lr"})
    if unknown:
        raise ValueError(f"override: with a float opt (plain SGD) only 'lr' applies, got {unknown}")
    lr = override["lr"]
    if isinstance(lr, (list, tuple)):
        if len(lr) != 1:
            raise ValueError(f"override['lr'] has {len(lr)} values for one param group")
        lr = lr[0]
    return step_map_factory(lr=lr)[0]
