"""Exceptions raised by torchopt_metagrad."""

from __future__ import annotations

__all__ = [
    "NonFiniteError",
    "ODESolveError",
    "RegimeWarning",
    "SolverWarning",
    "VectorizationFallbackWarning",
]


class NonFiniteError(FloatingPointError):
    """A NaN or infinity appeared in the inner loop or in a meta-gradient.

    The message names where it first appeared (the inner step, and for batched
    rules the stage), so the cause can be found instead of being passed on to the
    outer optimizer.
    """


class VectorizationFallbackWarning(UserWarning):
    """A batched (``torch.func.vmap``) Hessian-vector product fell back to a loop.

    Emitted once per reason, e.g. for a model that updates buffers in place (batch
    norm with running statistics) or per-step batches of different shapes. The
    result is the same; only the speed differs.
    """


class SolverWarning(UserWarning):
    """An iterative solve inside a rule stopped before reaching its tolerance."""


class RegimeWarning(UserWarning):
    """A truncated expansion of the meta-gradient is unreliable at this curvature.

    ``Binomial(L)`` emits it when its own Hessian-vector products estimate that the terms
    it drops are not small next to its estimate (the number is in the message and in
    ``tmg.BinomialInfo.dropped``); ``Binomial("auto")`` when its series did not converge
    by ``max_order`` and it returned the exact product instead. Shown once per call site (the
    line of user code that ran the backward); ``check=False`` switches the check off.
    """


class ODESolveError(RuntimeError):
    """A torchdiffeq solve failed (e.g. step size underflow); says which solve and when."""
