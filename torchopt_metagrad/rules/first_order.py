"""First-order meta-gradient (FOMAML)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from torchopt_metagrad.rules.base import RecordProtocol, StepProductRule, register

__all__ = ["FirstOrder"]


@register("first_order")
@dataclass(frozen=True)
class FirstOrder(StepProductRule):
    r"""First-order MAML: drop every second-order term.

    .. math:: \widehat{\nabla}_\theta L = g = \nabla L(\phi_K)

    Bias: exact only when every step Jacobian is the identity. Cost: no HVPs, no
    snapshots, O(d) memory. Equals ``Binomial(0)`` and ``Truncated(0)``.

    Reference: Finn et al., "Model-Agnostic Meta-Learning", ICML 2017.
    """

    def first_step(self, steps: int) -> int:
        return steps

    def meta_gradient(self, record: RecordProtocol, g: Tensor) -> Tensor:
        return g
