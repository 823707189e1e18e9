r"""``tmg.custom_root``: torchopt's implicit-differentiation decorator, with the plugin's rules.

Same convention as ``torchopt.diff.implicit.custom_root``: decorate
``solver(params, *args) -> solution`` (``params`` the start of the inner solve) with
``custom_root(optimality_fn, argnums, has_aux, solve)``; ``optimality_fn(solution, *args)``
is zero at the solution, and the arguments named by ``argnums`` (positions in the solver's
signature, ``params`` being 0) get the implicit meta-gradient

.. math:: \frac{dL}{dw} = -\Big(\frac{\partial F}{\partial w}\Big)^\top
    \Big(\frac{\partial F}{\partial x}\Big)^{-\top} \frac{dL}{dx}.

``solve`` is a plugin fixed-point rule (``tmg.ImplicitCG(reg, maxiter=5)``, which then
reports its diagnostics and warnings) or a torchopt solve function
(``torchopt.linear_solve.solve_normal_cg(maxiter=5)``); ``None`` is torchopt's default,
normal-equation CG. This module only checks arguments and builds the record; the
algebra is in :mod:`torchopt_metagrad._core.root` and the rules.
"""

from __future__ import annotations

import functools
import inspect
import numbers
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torchopt
from torch import Tensor
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from torchopt_metagrad._core.checks import check_callable
from torchopt_metagrad._core.closed import closed_over, describe
from torchopt_metagrad._core.engine import Meta
from torchopt_metagrad._core.flat import FlatSpec
from torchopt_metagrad._core.link import Link
from torchopt_metagrad._core.root import RootRecord
from torchopt_metagrad._core.tasks import is_batched
from torchopt_metagrad.errors import NonFiniteError
from torchopt_metagrad.rules.base import FixedPointRule
from torchopt_metagrad.rules.implicit import TorchoptSolve

__all__ = ["custom_root"]


def custom_root(
    optimality_fn: Callable[..., Any],
    argnums: int | tuple[int, ...],
    has_aux: bool = False,
    solve: FixedPointRule | Callable[..., Any] | None = None,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: differentiate a root solver implicitly (torchopt's ``custom_root``).

    Example (torchopt's iMAML with the decorator line changed)::

        @tmg.custom_root(torch.func.grad(objective), argnums=1,
                         solve=tmg.ImplicitCG(reg, maxiter=5))
        def inner_solver(params, meta_params, data):
            ...  # gradient steps on objective(params, meta_params, data)
            return params

    Args:
        optimality_fn: ``F(solution, *args)``, zero at the solution, returning tensors
            shaped like the solution (a tensor or a tuple/list of them).
        argnums: position(s) >= 1 in the solver's signature of the arguments to
            differentiate; each a tensor or a tuple/list/dict of floating tensors.
        has_aux: the solver returns ``(solution, aux)``; ``aux`` is passed through with its
            tensors detached (as torchopt does: no gradient flows through ``aux``).
        solve: a fixed-point rule (``tmg.ImplicitCG``, ``tmg.ImplicitNeumann``: the
            system is then ``J^T / rule.reg`` with ``J = dF/dx``, which must be symmetric:
            ``F`` the gradient of an objective) or a torchopt ``solve(matvec, b)``
            function (any ``J``); ``None``: ``torchopt.linear_solve.solve_normal_cg()``.

    Not supported (refused or documented): tensors that ``optimality_fn`` closes over and
    that require grad (refused: pass them as arguments in ``argnums``), keyword-only
    arguments in ``argnums``, ``torch.func.vmap`` over tasks.
    """
    check_callable(optimality_fn, "optimality_fn")
    nums = _check_argnums(argnums)
    if not isinstance(has_aux, bool):
        raise TypeError(f"has_aux must be a bool, got {has_aux!r}")
    rule = _rule_of(solve)

    def decorator(solver: Callable[..., Any]) -> Callable[..., Any]:
        check_callable(solver, "solver")
        signature = inspect.signature(solver)

        @functools.wraps(solver)
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            try:
                bound = signature.bind(*args, **kwargs)
            except TypeError as err:
                raise TypeError(f"custom_root: calling {solver.__name__}: {err}") from None
            bound.apply_defaults()
            pos, kw = list(bound.args), dict(bound.kwargs)
            names = _positional_names(signature, len(pos))
            if max(nums) >= len(pos):
                raise ValueError(
                    f"argnums={argnums!r} names argument {max(nums)}, but the solver got "
                    f"{len(pos)} positional argument(s) ({', '.join(names[: len(pos)])})"
                )
            w_trees = {i: _argnum_tensors(pos[i], i, names) for i in nums}
            if is_batched(pos, kw):
                raise NotImplementedError(
                    f"tmg.custom_root ({solver.__name__}) under torch.func.vmap (or another "
                    "torch.func transform) is not supported: loop over the tasks, or write the "
                    "inner solver with tmg.implicit, which runs under vmap"
                )
            _refuse_other_grads(pos, kw, nums, names)
            call = list(pos)
            for i, (leaves, treedef) in w_trees.items():
                call[i] = tree_unflatten(
                    [t.detach().requires_grad_(t.requires_grad) for t in leaves], treedef
                )
            with torch.enable_grad():
                out = solver(*call, **kw)
            aux = None
            if has_aux:
                if not (isinstance(out, tuple) and len(out) == 2):
                    raise TypeError(
                        "has_aux=True: the solver must return (solution, aux), got "
                        f"{type(out).__name__}"
                    )
                out, aux = out
                # returned detached, as torchopt does: the solver ran on detached copies of
                # the argnums arguments, so a graph through aux would not reach them and
                # their gradient through aux would be silently lost
                aux = tree_map(lambda t: t.detach() if isinstance(t, Tensor) else t, aux)
            x_leaves, x_def = _solution(out)
            spec = FlatSpec.from_tensors({str(i): t for i, t in enumerate(x_leaves)})
            w_all = [t for i in nums for t in w_trees[i][0]]

            def optimality(xs: Sequence[Tensor], ws: Sequence[Tensor]) -> list[Tensor]:
                args_now = list(pos)
                it = iter(ws)
                for i in nums:
                    leaves, treedef = w_trees[i]
                    args_now[i] = tree_unflatten([next(it) for _ in leaves], treedef)
                residual = optimality_fn(tree_unflatten(list(xs), x_def), *args_now[1:], **kw)
                return _residual(residual, spec)

            x = torch.cat([t.detach().reshape(-1) for t in x_leaves])
            norms = _norms(optimality, spec, x, w_all, pos[0])
            record = RootRecord(
                spec, x, optimality, Meta(closed=tuple(w_all)), float(rule.reg), norms,
                symmetric=not isinstance(rule, TorchoptSolve),
            )  # fmt: skip
            outputs = Link.apply(record, rule, "tmg.custom_root", *w_all)
            solution = tree_unflatten(list(outputs), x_def)
            return (solution, aux) if has_aux else solution

        return wrapped

    return decorator


def _check_argnums(argnums: Any) -> tuple[int, ...]:
    def whole(i: Any) -> bool:
        return isinstance(i, numbers.Integral) and not isinstance(i, bool)

    nums = (argnums,) if whole(argnums) else argnums
    if not isinstance(nums, tuple) or not nums or not all(whole(i) for i in nums):
        raise TypeError(f"argnums must be an int or a non-empty tuple of ints, got {argnums!r}")
    nums = tuple(int(i) for i in nums)
    if any(i < 1 for i in nums):
        raise ValueError(
            f"argnums={argnums!r}: positions start at 1 (0 is the solver's initial params, "
            "on which the solution does not depend)"
        )
    if len(set(nums)) != len(nums):
        raise ValueError(f"argnums={argnums!r} repeats a position")
    return tuple(nums)


def _positional_names(signature: inspect.Signature, n: int) -> list[str]:
    """Names of the first ``n`` positional arguments (``args[k]`` for ``*args``)."""
    names: list[str] = []
    for p in signature.parameters.values():
        if p.kind is p.VAR_POSITIONAL:
            names += [f"{p.name}[{k}]" for k in range(n - len(names))]
        elif p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            names.append(p.name)
    return names[:n]


def _rule_of(solve: Any) -> FixedPointRule:
    if solve is None:
        return TorchoptSolve(1.0, solve=torchopt.linear_solve.solve_normal_cg())
    if isinstance(solve, FixedPointRule):
        return solve
    if callable(solve) and not isinstance(solve, type):
        return TorchoptSolve(1.0, solve=solve)
    raise TypeError(
        "solve must be a fixed-point rule (tmg.ImplicitCG(reg, ...), tmg.ImplicitNeumann) or "
        f"a torchopt solve function (torchopt.linear_solve.solve_normal_cg()), got {solve!r}"
    )


def _argnum_tensors(arg: Any, i: int, names: list[str]) -> tuple[list[Tensor], Any]:
    leaves, treedef = tree_flatten(arg)
    what = f"argument {i} ({names[i]!r}), named in argnums,"
    if not leaves or not all(isinstance(t, Tensor) for t in leaves):
        raise TypeError(
            f"{what} must be a tensor or a tuple/list/dict of tensors, got {type(arg).__name__}"
        )
    for t in leaves:
        if not t.is_floating_point():
            raise TypeError(f"{what} holds a tensor of dtype {t.dtype}; it must be floating")
    return leaves, treedef


def _refuse_other_grads(
    pos: list[Any], kw: dict[str, Any], nums: tuple[int, ...], names: list[str]
) -> None:
    """A tensor requiring grad outside ``argnums`` (and the initial params) would get no
    meta-gradient: refuse it, naming it."""
    others = [(f"argument {i} ({names[i]!r})", a) for i, a in enumerate(pos) if i and i not in nums]
    others += [(f"keyword argument {k!r}", a) for k, a in kw.items()]
    for what, arg in others:
        for t in tree_flatten(arg)[0]:
            if isinstance(t, Tensor) and t.requires_grad:
                raise ValueError(
                    f"{what} holds {describe(t)} that requires grad but is not in argnums: "
                    "custom_root differentiates only the argnums arguments. Add its position "
                    "to argnums, or detach it"
                )


def _solution(out: Any) -> tuple[list[Tensor], Any]:
    leaves, treedef = tree_flatten(out)
    if not leaves or not all(isinstance(t, Tensor) for t in leaves):
        raise TypeError(
            "the solver's output (the solution) must be a tensor or a tuple/list/dict of "
            f"tensors, got {type(out).__name__}"
        )
    first = leaves[0]
    for j, t in enumerate(leaves):
        if not t.is_floating_point() or t.dtype != first.dtype or t.device != first.device:
            raise TypeError(
                f"the solver's output tensor {j} is {t.dtype} on {t.device}; the solution's "
                f"tensors must be floating and share dtype and device ({first.dtype} on "
                f"{first.device})"
            )
        if not bool(torch.isfinite(t).all()):
            raise NonFiniteError(f"the solver's output tensor {j} is not finite")
    return leaves, treedef


def _residual(residual: Any, spec: FlatSpec) -> list[Tensor]:
    leaves = tree_flatten(residual)[0]
    shapes = [getattr(t, "shape", None) for t in leaves]
    if shapes != list(spec.shapes):
        raise ValueError(
            "optimality_fn must return tensors shaped like the solution "
            f"({[tuple(s) for s in spec.shapes]}), got {[type(t).__name__ if s is None else tuple(s) for t, s in zip(leaves, shapes, strict=True)]}"  # noqa: E501
        )
    return leaves


def _norms(
    optimality: Callable[[Sequence[Tensor], Sequence[Tensor]], list[Tensor]],
    spec: FlatSpec,
    x: Tensor,
    w: list[Tensor],
    start: Any,
) -> tuple[float, float] | None:
    """``(||F(x*)||, ||F(x0)||)``; refuses tensors ``F`` closes over that require grad."""
    with torch.enable_grad():
        xs = [t.clone().requires_grad_(True) for t in spec.split(x)]
        ws = [t.detach().requires_grad_(True) for t in w]
        at_solution = optimality(xs, ws)
    found = closed_over([r for r in at_solution if r.grad_fn is not None], [*xs, *ws])
    if found:
        raise ValueError(
            f"optimality_fn depends on {describe(found[0])} that requires grad and is not an "
            "argument in argnums: it would get no meta-gradient. Pass it as an argument and "
            "name it in argnums, or detach it"
        )
    final = float(torch.cat([r.detach().reshape(-1) for r in at_solution]).norm())
    x0 = tree_flatten(start)[0]
    if [getattr(t, "shape", None) for t in x0] != list(spec.shapes):
        return None  # the first argument is not shaped like the solution: no reference
    with torch.enable_grad():  # F may differentiate (torch.func.grad of an objective)
        x0s = [t.detach().to(spec.dtype).requires_grad_(True) for t in x0]
        at_start = optimality(x0s, [t.detach() for t in w])
    return final, float(torch.cat([r.detach().reshape(-1) for r in at_start]).norm())
