"""First-order meta-gradient (FOMAML)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from torchopt_metagrad.rules.base import Estimate, RecordProtocol, StepProductRule, register

__all__ = ["FirstOrder"]


@register("first_order")
@dataclass(frozen=True)
class FirstOrder(StepProductRule):
    r"""First-order MAML: treat every step Jacobian as the identity.

    .. math:: \widehat{\nabla}_\theta L = g = \nabla L(\phi_K), \qquad
        \widehat{\nabla}_w L = \sum_{k<K} B_k^\top g

    (meta-parameters ``w`` such as a learned lr or a frozen body, with
    :math:`B_k = \partial S_k / \partial w`: every adjoint :math:`v_{k+1}` taken as
    ``g``; the last step's term is exact, so with one inner step a frozen body's
    meta-gradient is exact).

    Bias: exact only when every step Jacobian is the identity. Cost: no HVPs, no
    snapshots, O(d) memory; with meta-parameters, a snapshot per step (O(K d)) and K
    VJPs, one graph alive at a time. Equals ``Binomial(0)`` and ``Truncated(0)``.

    Reference: Finn et al., "Model-Agnostic Meta-Learning", ICML 2017.
    """

    def first_step(self, steps: int) -> int:
        return steps

    def meta_gradient(self, record: RecordProtocol, g: Tensor) -> Tensor | Estimate:
        if not record.meta_dim:
            return g
        K = record.num_steps
        # One VJP graph at a time (a batched call would hold K graphs at once).
        early = record.meta_pullback_many(0, g.expand(K, *g.shape), vectorize=False)
        return Estimate(g, meta=early)
