"""Autograd through the kept unrolled graph (what torchopt and ``higher`` do)."""

from __future__ import annotations

from dataclasses import dataclass

from torchopt_metagrad.rules.base import GraphRule, register

__all__ = ["Unrolled"]


@register("unrolled")
@dataclass(frozen=True)
class Unrolled(GraphRule):
    r"""Backpropagate through the unrolled inner loop kept as one autograd graph.

    .. math:: \nabla_\theta L = (I - \alpha H_0) \cdots (I - \alpha H_{K-1})\, g

    Bias: none. Cost: the graphs of all K steps stay alive until the outer
    backward (memory O(K * graph)); supports higher-order differentiation. This is
    the baseline that torchopt's ``MetaSGD`` and ``higher`` implement.
    """
