r"""The module front end: torchopt-style ``MetaSGD``, ``MetaAdam`` and ``MetaOptimizer``.

Existing MAML code written with ``torchopt.MetaSGD(net, lr)`` and ``inner_opt.step(loss)``
switches to any rule by changing the constructor line::

    inner_opt = tmg.MetaSGD(net, lr=0.1, rule=tmg.Exact())   # was torchopt.MetaSGD(net, lr=0.1)
    for _ in range(steps):
        inner_opt.step(F.cross_entropy(net(x_spt), y_spt))   # updates net's parameters
    F.cross_entropy(net(x_qry), y_qry).backward()            # the rule's meta-gradient -> .grad

How gradients reach the initial parameters ``theta``: the parameters after step ``n``
come out of an autograd node whose inputs are ``theta`` themselves and whose backward
runs the rule on steps ``0..n-1`` (see :mod:`torchopt_metagrad.module.session`). So an outer
loss may use the parameters of any step, or several, and gets the sum of the rule's
meta-gradients; nothing chains through earlier steps. ``Unrolled()`` keeps the whole
graph, exactly as torchopt does.

The two ways to step, per step (d = number of adapted parameters):

* ``step(loss)``: the drop-in. Keeps the step's gradient graph (``create_graph=True``,
  as torchopt does) and the gradient, one d-vector more than torchopt (4-conv 5-way
  net, float32: 7.0 MB per step against torchopt's 6.6 MB). Every rule except those
  that need curvature where no step took a gradient (fixed-point and flow rules: they
  ask for ``step(closure)``); a rule keeps only the graphs it uses (``FirstOrder`` none,
  ``Truncated(L)`` the last ``L``: the parameters of earlier steps can then no longer
  take an outer loss, which raises saying so).
* ``step(closure)``: the lean mode, ``closure() -> loss`` recomputing the training loss
  with the module. Keeps one flat snapshot per step (0.44 MB on that net, 0.07x
  torchopt's growth); the Hessian-vector products are recomputed at backward time by
  re-running the closure with the module's parameters temporarily replaced, the RNG
  state and train/eval flags of that step restored (dropout replays the same mask),
  and in-place writes to buffers redirected to copies (running statistics are not
  updated twice; see :mod:`torchopt_metagrad._core.replay`). Every rule.

The ``higher``-style context built on these lives in
:mod:`torchopt_metagrad.module.higher_compat`.

Both modes compute the products one at a time (neither closures nor kept graphs can be
stacked for ``vmap``), so ``Binomial``'s batching does not apply here. The meta-gradient
is once-differentiable (``Unrolled`` for higher-order derivatives). Rules that skip
early steps (``Truncated``, ``FirstOrder``) release their records as the loop goes,
assuming the first step a rule needs does not decrease with the number of steps.

In closure mode the recorded closures usually reference the module, and the module its
current parameters, whose autograd node references the closures: that loop lasts until
the parameters are replaced (restored between tasks, or at the exit of
:func:`~torchopt_metagrad.innerloop_ctx`); a module dropped mid-loop without
restoring keeps its last inner loop alive.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torchopt
from torch import Tensor, nn
from torchopt.base import UninitializedState

from torchopt_metagrad._core.checks import check_lr_or_schedule, check_nonnegative
from torchopt_metagrad._core.steps import StepMapFactory, sgd_factory, transformation_factory
from torchopt_metagrad._core.tasks import in_transform
from torchopt_metagrad.module.session import Session
from torchopt_metagrad.module.slots import Slots
from torchopt_metagrad.rules.base import AbstractRule, check_rule

__all__ = ["Closure", "MetaAdam", "MetaOptimizer", "MetaSGD"]

Closure = Callable[[], Tensor]


class MetaOptimizer(torchopt.MetaOptimizer):
    r"""A differentiable module optimizer whose meta-gradient comes from ``rule``.

    torchopt's semantics: :meth:`step` replaces the module's parameters by the
    updated ones (the next forward uses them), and an outer ``loss.backward()``
    puts the meta-gradient on the original parameters' ``.grad``. It is a
    ``torchopt.MetaOptimizer``, so ``torchopt.extract_state_dict`` /
    ``torchopt.recover_state_dict`` work on it as in torchopt's MAML examples.

    An inner loop starts at the first step after construction, after :meth:`reset`,
    after loading the state saved before the first step (``load_state_dict``), or when
    every parameter is back to the tensor the previous inner loop started from (as
    ``torchopt.recover_state_dict(net, state_by_reference)`` leaves it).

    Parameters that do not require grad are left alone; a parameter registered under
    several names is one parameter; buffers are the module's business (batch norm
    updates its running statistics in the forward passes you run).

    Args:
        module: the network whose parameters are adapted.
        impl: a torchopt functional optimizer (``torchopt.sgd(0.1, momentum=0.9)``,
            ``torchopt.adam(1e-3)``, a ``torchopt.chain``...).
        rule: how to compute the meta-gradient, e.g. ``tmg.Exact()``, ``tmg.Binomial(2)``.

    Raises:
        TypeError, ValueError: an argument is invalid (the message names it).
    """

    def __init__(self, module: nn.Module, impl: Any, *, rule: AbstractRule) -> None:
        self._setup(module, rule, transformation_factory(impl), impl)

    # Not calling torchopt's __init__: it registers param groups this class does not use.
    def _setup(
        self,
        module: nn.Module,
        rule: AbstractRule,
        make_step_map: StepMapFactory,
        impl: Any,
        include: frozenset[str] | None = None,
    ) -> None:
        if not isinstance(module, nn.Module):
            raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
        check_rule(rule)
        self.module = module
        self.rule = rule
        self.impl = impl
        self._make_step_map = make_step_map
        self._include = include
        self._session: Session | None = None
        self._closed: str | None = None
        if not len(Slots(module, include)):
            raise ValueError("module has no parameters that require grad: nothing to adapt")

    def step(self, loss: Tensor | Closure) -> None:
        """Take one inner step and put the updated parameters in the module.

        Args:
            loss: the training loss computed with the module's current parameters
                (``step(loss)``: each step's gradient graph is kept for the backward),
                or a closure ``() -> loss`` that recomputes it with the module
                (``step(closure)``: only a flat snapshot per step is kept and the
                Hessian-vector products are recomputed at backward time, with the
                recorded RNG state and train/eval flags and without touching buffers).
                The closure returns the loss; it must not call ``backward()``.

        Raises:
            RuntimeError: a module parameter was replaced or modified in place since
                the last step (the message names it).
            ValueError: the loss does not depend on the adapted parameters, or the rule
                needs ``step(closure)``.
            NonFiniteError: the inner loss or its gradient is not finite.
        """
        if self._closed is not None:
            raise RuntimeError(self._closed)
        if in_transform():
            raise ValueError(
                f"{self._owner}.step cannot run inside torch.func.vmap (or another torch.func "
                "transform): a module holds one set of parameters. For tasks in parallel use "
                "tmg.adapt with torch.func.functional_call inside the vmapped function"
            )
        closure: Closure | None = None
        value: Tensor | None = None
        if isinstance(loss, Tensor):
            if not loss.requires_grad and not torch.is_grad_enabled():
                raise ValueError(
                    f"{self._owner}.step got a loss computed under torch.no_grad(): the inner "
                    "step needs its gradient. Compute the training loss with grad enabled "
                    "(or pass a closure, which the optimizer runs with grad enabled)"
                )
            value = loss
        elif callable(loss):
            closure = loss
        else:
            raise TypeError(
                "step takes the training loss (a scalar tensor) or a closure that recomputes "
                f"it, got {type(loss).__name__}"
            )
        self._session_for_step().step(value, closure)

    def _session_for_step(self) -> Session:
        session = self._session
        if session is not None and session.check() == "continue":
            session.check_not_consumed()
            return session
        self._session = None  # release the previous inner loop before recording a new one
        self._session = Session(
            Slots(self.module, self._include), self.rule, self._make_step_map, self._owner
        )
        return self._session

    @property
    def _owner(self) -> str:
        return type(self).__name__

    @property
    def recorded_closures(self) -> bool:
        """Whether the current inner loop recorded closures (``step(closure)``)."""
        return self._session is not None and self._session.recorded_closures

    def reset(self) -> None:
        """Start a new inner loop at the next step, from the module's parameters then."""
        self._session = None

    def add_param_group(self, module: nn.Module) -> None:
        """Not supported: one optimizer adapts one module."""
        raise NotImplementedError(
            f"{self._owner} adapts one module; build one optimizer per module"
        )

    def state_dict(self) -> tuple[Any, ...]:
        """The inner optimizer's state, as ``torchopt.extract_state_dict`` expects.

        ``(UninitializedState(),)`` when the next step starts a new inner loop (what
        torchopt's MAML examples save before the first step); otherwise the state
        (momentum, Adam moments...) of the current inner loop, as detached copies.
        """
        session = self._session
        if session is None or session.status() == "restored":
            return (UninitializedState(),)
        return (session.optimizer_state(),)

    def load_state_dict(self, state_dict: Sequence[Any]) -> None:
        """Load the state saved before the first step: the next step starts a new inner loop.

        Raises:
            ValueError: the state is that of the middle of an inner loop (not supported).
        """
        states = list(state_dict)
        if len(states) != 1:
            raise ValueError(f"state_dict must hold one state, got {len(states)}")
        if not isinstance(states[0], UninitializedState):
            raise ValueError(
                f"{self._owner}.load_state_dict supports only the state saved before the first "
                "inner step (UninitializedState, as in torchopt's MAML examples), which starts "
                "a new inner loop; restoring the middle of an inner loop is not supported"
            )
        self.reset()

    def _close(self, message: str) -> None:
        self._session = None
        self._closed = message


class MetaSGD(MetaOptimizer):
    r"""Differentiable SGD over a module (``torchopt.MetaSGD``) with a meta-gradient ``rule``.

    Without momentum, weight decay or ``maximize`` (and a float ``lr``) the inner step
    is plain gradient descent :math:`\phi_{k+1} = \phi_k - \mathrm{lr}\,\nabla\ell_k`,
    which every rule supports (``Adjoint`` needs it); otherwise it is ``torchopt.sgd``
    with the optimizer state (momentum) in the differentiated state.

    A tensor ``lr`` is a learned learning rate (plain descent only): 0-dim, one per step
    (shape ``(steps,)``, MAML++), or a dict ``{name: tensor}`` over ``module``'s
    parameter names, each shaped like its parameter or 0-dim (Meta-SGD); those that
    require grad get their meta-gradient under ``rule``.

    Parameters of a larger network that the training loss uses but ``module`` does not
    hold (``tmg.MetaSGD(net.head, ...)``: the body) are found at the first step and get
    their meta-gradient through the inner loop too, as with torchopt and ``higher``.

    Args:
        module: the network whose parameters are adapted.
        lr: step size > 0 (or a torchopt schedule), or a learned rate (tensor or dict).
        rule: how to compute the meta-gradient, e.g. ``tmg.Exact()``.
        momentum, weight_decay, dampening, nesterov, maximize: as ``torchopt.sgd``.
        moment_requires_grad: accepted for compatibility with ``torchopt.MetaSGD``; no
            effect (the initial momentum is zero).
    """

    def __init__(
        self,
        module: nn.Module,
        lr: float | Callable[..., Any] | Tensor | Mapping[str, Tensor],
        *,
        rule: AbstractRule,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        dampening: float = 0.0,
        nesterov: bool = False,
        maximize: bool = False,
        moment_requires_grad: bool = True,
    ) -> None:
        for value, name in ((momentum, "momentum"), (weight_decay, "weight_decay")):
            check_nonnegative(value, name)
        check_nonnegative(dampening, "dampening")
        make, impl = sgd_factory(
            lr,
            momentum=momentum,
            weight_decay=weight_decay,
            dampening=dampening,
            nesterov=nesterov,
            maximize=maximize,
        )
        self._setup(module, rule, make, impl)


class MetaAdam(MetaOptimizer):
    """Differentiable Adam over a module (``torchopt.MetaAdam``) with a meta-gradient ``rule``.

    The inner step is ``torchopt.adam``; its moments are part of the differentiated
    state, so the rules use VJPs of the whole step map.

    Args:
        module: the network whose parameters are adapted.
        lr: step size > 0 (or a torchopt schedule).
        rule: how to compute the meta-gradient, e.g. ``tmg.Exact()``.
        betas, eps, weight_decay, eps_root, maximize: as ``torchopt.adam``.
        moment_requires_grad: accepted for compatibility with ``torchopt.MetaAdam``; no
            effect (the initial moments are zero).
    """

    def __init__(
        self,
        module: nn.Module,
        lr: float | Callable[..., Any] = 1e-3,
        *,
        rule: AbstractRule,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        eps_root: float = 0.0,
        maximize: bool = False,
        moment_requires_grad: bool = True,
    ) -> None:
        check_lr_or_schedule(lr)
        _check_betas(betas)
        for value, name in ((eps, "eps"), (eps_root, "eps_root"), (weight_decay, "weight_decay")):
            check_nonnegative(value, name)
        impl = torchopt.adam(
            lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            eps_root=eps_root,
            maximize=maximize,
        )
        self._setup(module, rule, transformation_factory(impl), impl)


def _check_betas(betas: Any) -> None:
    """Adam's ``betas``: a pair of floats in ``[0, 1)``."""
    if not isinstance(betas, Sequence) or isinstance(betas, str) or len(betas) != 2:
        raise TypeError(f"betas must be a pair (beta1, beta2) of floats in [0, 1), got {betas!r}")
    for i, b in enumerate(betas):
        if not 0.0 <= check_nonnegative(b, f"betas[{i}]") < 1.0:
            raise ValueError(f"betas[{i}] must be in [0, 1), got {b}")
