"""BinomMAML: the truncated binomial expansion of the meta-gradient product."""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field, fields
from typing import Literal

import torch
from torch import Tensor

from torchopt_metagrad._core.budget import Memory, check_memory
from torchopt_metagrad._core.callsite import warn_at_call_site
from torchopt_metagrad._core.checks import check_int, check_positive
from torchopt_metagrad.errors import RegimeWarning
from torchopt_metagrad.rules.base import (
    Estimate,
    RecordProtocol,
    StepProductRule,
    check_order,
    register,
)
from torchopt_metagrad.rules.binomial_series import (
    REGIME_THRESHOLD,
    BinomialInfo,
    Products,
    auto_stages,
    fixed_stages,
    regime,
)
from torchopt_metagrad.rules.truncated import backward_product

__all__ = ["Binomial", "BinomialInfo"]


@register("binomial")
@dataclass(frozen=True)
class Binomial(StepProductRule):
    r"""Truncated binomial expansion of the meta-gradient (BinomMAML).

    With :math:`A_k = -\alpha H_k` (or :math:`J_k^\top - I` for a general step
    map), expand :math:`(I + A_0) \cdots (I + A_{K-1})\, g` and keep every term of
    degree at most :math:`L`:

    .. math::
        \widehat{\nabla}_\theta L = \sum_{l=0}^{L}
        \sum_{0 \le k_1 < \dots < k_l \le K-1} A_{k_1} \cdots A_{k_l}\, g .

    Computed by the stage algorithm: with :math:`s_m^{(j)}` the sum of the terms
    of degree :math:`\le m` that use only steps :math:`j..K-1`,
    :math:`s_m^{(j)} = g + \sum_{i \ge j} A_i s_{m-1}^{(i+1)}`; stage ``m`` needs
    the ``K-L+1`` products :math:`w_i = A_i s_{m-1}^{(i+1)}`,
    :math:`i \in [L-m, K-m]`, at different snapshots, all independent, so they
    are one batched (``vmap``) call; the estimate is :math:`s_L^{(0)}`.

    Meta-parameters ``w`` (a learned lr, a frozen body, ...; :math:`B_k = \partial S_k /
    \partial w`) get :math:`\sum_k B_k^\top \hat v_{k+1}` with :math:`\hat v_j =
    s_L^{(j)}`, the degree-:math:`\le L` partial sum of the product from step ``j`` (exact
    for the last ``L`` steps): one more batched call of K VJPs.

    Bias: exact when ``order == steps``; ``order == 0`` is first-order MAML; the
    dropped terms are :math:`O(\alpha^{L+1})`. Cost: ``order * (K-order+1)``
    HVPs in ``order`` serial batched calls; memory: K snapshots, O((K-L+1) d)
    for the stage vectors, and the graphs of the products evaluated together: a batched
    call of ``n`` products holds ``n`` single-HVP graphs at once (each about twice one
    step's graph). ``memory="auto"`` (default) measures one product's peak ``R`` (the
    stage's first product, under a live-memory probe) and batches at most
    ``max(K/4, 8 MiB / R)`` products per call: about half of the K step graphs unrolled
    backprop keeps (``tmg._core.budget``); ``memory=n`` keeps a call under ``n`` bytes
    (``max(1, n // R)`` rows); ``memory=None`` evaluates a whole stage (``K-L+1``
    graphs, 2.5x unrolled's memory on the 4-conv net at K = 100) in one call;
    ``chunk_size`` fixes the rows per call instead. A call of one row runs by plain
    double backward. ``vectorize=False`` keeps one HVP graph at a time. The estimate
    does not depend on the batching (to round-off). On a GPU the batched call runs the
    products in parallel; on a CPU it mainly saves Python overhead (faster for small
    models, not for convolutional ones).

    ``hessian_scale``: ``"paper"`` (default) is the expansion above, as written in the
    paper (factor :math:`\alpha` per Hessian). ``"code"`` is the estimator of the public
    BinomMAML code, which scales every Hessian term by :math:`\alpha L / K` instead:
    with :math:`\hat A_k = (L/K) A_k` (:math:`= -\alpha (L/K) H_k` for gradient descent),

    .. math::
        \widehat{\nabla}_\theta^{\mathrm{code}} L = \sum_{l=0}^{L}
        \sum_{0 \le k_1 < \dots < k_l \le K-1} \hat A_{k_1} \cdots \hat A_{k_l}\, g ,

    i.e. the degree-``l`` terms are multiplied by :math:`(L/K)^l`. It is not a truncation
    of the exact product (it differs from the ``"paper"`` expansion by 7e-2 to 1.6
    relative on the sine tasks), equals it only when ``L == K``, and is computed by the
    same stages with each product scaled; meta-parameters get the same sum with the
    scaled partial sums as adjoints. The regime check does not apply to it (not run), nor
    does ``order="auto"``.

    Regime check (``check=True``, fixed order): from the norms of the products it computes
    anyway (:math:`\|w_i\| / \|s\|`, a lower estimate of :math:`\mathrm{lr}\,\|H_i\|`)
    it estimates the part it drops relative to the estimate (``BinomialInfo.dropped``;
    ``tmg.rules.binomial_series``) and emits one :class:`~torchopt_metagrad.RegimeWarning`
    per call site when it exceeds ``REGIME_THRESHOLD`` (0.15). Cost: no extra product; two
    norms per product row and one transfer of K numbers to the host per backward
    (``benchmarks/bench_regime.py``).

    ``order="auto"``: stages over the full ranges :math:`j \in [0, K-m]` (``K-m+1``
    products at stage ``m``, so :math:`s_m^{(0)}` exists at every stage whatever the final
    order), stopping at the first order whose stage changes the estimate by at most
    ``tol`` of its norm; the adjoints for meta-parameters are those of the order chosen.
    Cost: :math:`L K - L(L-1)/2` products in ``L`` serial batched calls for the order
    ``L`` it stops at, i.e. :math:`L(L-1)/2` more than ``Binomial(L)`` (which cannot know
    ``L`` beforehand). When stage ``min(max_order, K)`` has not reached ``tol`` (or
    earlier, when a stage's contribution is ``>= 1`` and larger than the previous one's:
    the terms still grow) it
    finishes the exact product from the exact adjoint :math:`v_{K-\mathrm{max\_order}}`
    that the stages already hold (``K - max_order`` more serial products), returns it and
    warns (``RegimeWarning``). The order used is reported in :class:`BinomialInfo`
    (``tmg.diagnostics.collect()``).

    Reference: "Binomial Gradient-Based Meta-Learning for Enhanced Meta-Gradient
    Estimation", ICLR 2026.

    Args:
        order: the truncation degree ``L`` (0..steps), or ``"auto"``.
        chunk_size: evaluate at most this many of a stage's HVPs at once (bounds
            memory); ``None`` evaluates the whole stage in one call.
        vectorize: ``False`` evaluates a stage's HVPs one by one in a Python loop
            (same result; for comparisons and for models ``vmap`` cannot handle).
        check: a fixed order checks its regime and warns when the expansion looks
            unreliable; ``False`` skips the check (``order="auto"`` always tests its
            series and takes no ``check``).
        tol: ``order="auto"``: stop at the first order whose stage's contribution is at
            most ``tol`` times the estimate's norm (0 < tol < 1).
        max_order: ``order="auto"``: the highest order tried (clipped to ``steps``)
            before falling back to the exact product.
        memory: how many products a batched call may hold: ``"auto"``, a number of
            bytes, or ``None`` (a whole stage); ignored when ``chunk_size`` is given.
        hessian_scale: ``"paper"`` (factor ``lr`` per Hessian term) or ``"code"``
            (factor ``lr * L / K``, the public BinomMAML code's estimator).
    """

    order: int | Literal["auto"]
    chunk_size: int | None = None
    vectorize: bool = True
    check: bool = field(default=True, kw_only=True)
    tol: float = field(default=1e-3, kw_only=True)
    max_order: int = field(default=6, kw_only=True)
    memory: Memory = field(default="auto", kw_only=True)
    hessian_scale: Literal["paper", "code"] = field(default="paper", kw_only=True)

    def __post_init__(self) -> None:
        if isinstance(self.order, str):
            if self.order != "auto":
                raise ValueError(f"order must be an int >= 0 or 'auto', got {self.order!r}")
        else:
            check_order(self, self.order)
        if self.chunk_size is not None and (
            isinstance(self.chunk_size, bool)
            or not isinstance(self.chunk_size, numbers.Integral)
            or self.chunk_size < 1
        ):
            raise ValueError(f"chunk_size must be None or an int >= 1, got {self.chunk_size!r}")
        for name in ("vectorize", "check"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if check_positive(self.tol, "tol") >= 1:
            raise ValueError(f"tol must be in (0, 1), got {self.tol}")
        check_int(self.max_order, "max_order", minimum=1)
        check_memory(self.memory)
        if self.hessian_scale not in ("paper", "code"):
            raise ValueError(f"hessian_scale must be 'paper' or 'code', got {self.hessian_scale!r}")
        if self.auto and self.hessian_scale == "code":
            raise ValueError(
                "hessian_scale='code' needs a fixed order (its factor lr * L / K depends "
                "on L); order='auto' uses the paper's expansion"
            )
        if self.auto:
            if not self.check:
                raise ValueError(
                    "check=False applies to a fixed order; order='auto' always tests its "
                    "series (tol, max_order)"
                )
        else:
            defaults = {f.name: f.default for f in fields(self)}
            changed = [n for n in ("tol", "max_order") if getattr(self, n) != defaults[n]]
            if changed:
                verb = "applies" if len(changed) == 1 else "apply"
                raise ValueError(
                    f"{' and '.join(changed)} {verb} to order='auto' only, got order="
                    f"{self.order!r} with {', '.join(f'{n}={getattr(self, n)!r}' for n in changed)}"
                )

    @property
    def auto(self) -> bool:
        """Whether the order is chosen per meta-gradient (``order="auto"``)."""
        return isinstance(self.order, str)

    def validate(self, steps: int) -> None:
        if not self.auto:
            check_order(self, self.order, steps)

    def first_step(self, steps: int) -> int:
        return 0 if isinstance(self.order, str) or self.order > 0 else steps

    def meta_gradient(self, record: RecordProtocol, g: Tensor) -> Tensor | Estimate:
        if self.auto:
            return self._auto(record, g)
        K, L = record.num_steps, int(self.order)
        products = self._products(L / K if self.hessian_scale == "code" else 1.0)
        if L == 0:
            if not record.meta_dim:
                return g
            return Estimate(g, meta=self._meta(record, g.expand(K, *g.shape), products))
        check = self.check and self.hessian_scale == "paper"
        s, exact, rho = fixed_stages(record, g, L, products, check=check)
        info = BinomialInfo(order=L)
        if rho is not None:
            dropped, step_norms = regime(rho, L, g, s[0])
            reliable = dropped <= REGIME_THRESHOLD
            info = BinomialInfo(L, dropped=dropped, reliable=reliable, step_norms=tuple(step_norms))
            if not reliable:
                warn_at_call_site(self._regime_message(dropped, step_norms, K), RegimeWarning)
        if not record.meta_dim:
            return Estimate(s[0], info)
        # v_hat_j = s_L^{(j)}: s[j] for j in [1, K - L], then v_{K-L+1..K} exactly.
        adjoints = torch.cat([s[1:], torch.stack(exact[::-1])])
        return Estimate(s[0], info, self._meta(record, adjoints, products))

    def _products(self, scale: float) -> Products:
        return Products(self.chunk_size, self.memory, self.vectorize, scale)

    def _auto(self, record: RecordProtocol, g: Tensor) -> Estimate:
        K = record.num_steps
        products = self._products(1.0)
        run = auto_stages(record, g, products, tol=self.tol, max_order=self.max_order)
        L = run.order
        if run.converged:
            info = BinomialInfo(L, auto=True, contribution=run.contribution, reliable=True, tried=L)
            if not record.meta_dim:
                return Estimate(run.s[0], info)
            adjoints = torch.cat([run.s[1:], torch.stack(run.exact[::-1])])
            return Estimate(run.s[0], info, self._meta(record, adjoints, products))
        why = "its terms still grow at order" if run.growing else "it did not reach tol by order"
        warn_at_call_site(
            f"Binomial(order='auto', tol={self.tol:g}): {why} {L} (that stage changed the "
            f"estimate by {run.contribution:.3g} of its norm), so it returned the exact "
            f"product (tmg.Exact()'s value, {K - L} more serial products). At this curvature "
            "use tmg.Exact() (cheaper), or raise max_order",
            RegimeWarning,
        )
        # run.exact[m] = v_{K-m} exactly, m = 0..L: finish the product from v_{K-L}.
        tail = torch.stack(run.exact[L - 1 :: -1]) if record.meta_dim else None
        out = backward_product(
            record,
            run.exact[L],
            0,
            K - L,
            tail=tail,
            chunk_size=products.chunk_size,
            vectorize=self.vectorize,
        )
        info = BinomialInfo(
            K,
            auto=True,
            contribution=run.contribution,
            reliable=False,
            fell_back=True,
            tried=L,
        )
        if isinstance(out, Estimate):
            return Estimate(out.value, info, out.meta)
        return Estimate(out, info)

    def _regime_message(self, dropped: float, rho: list[float], steps: int) -> str:
        L, top = int(self.order), max(range(len(rho)), key=rho.__getitem__)
        return (
            f"Binomial({L}): the truncated expansion looks unreliable at this curvature: the "
            f"terms it drops are estimated at {dropped:.3g} times the norm of its estimate "
            f"(threshold {REGIME_THRESHOLD:g}; from its own products, ||A_k|| = lr*||H_k|| >= "
            f"{rho[top]:.3g} at inner step {top}, K={steps} steps). Use a larger order or "
            f"tmg.Binomial('auto'), tmg.Truncated(L), or tmg.Exact(); "
            f"tmg.Binomial({L}, check=False) turns this check off"
        )

    def _meta(self, record: RecordProtocol, adjoints: Tensor, products: Products) -> Tensor:
        """``sum_k B_k^T adjoints[k]`` (``adjoints[k]`` estimates ``v_{k+1}``), in calls of
        the stages' rows (a whole call when no stage chose them)."""
        return record.meta_pullback_many(
            0,
            adjoints,
            chunk_size=products.chunk_size,
            vectorize=self.vectorize and products.chunk_size != 1,
        )
