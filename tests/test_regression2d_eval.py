"""regression2d evaluates test-time adaptation in float64 by default (``--eval-dtype``): a
float32 model is copied to float64, its float32 weights unchanged, and the curve equals
adapting that float64 copy directly."""

from __future__ import annotations

import copy

import torch

from recipes.common.evaluation import adaptation_curve, nrmse
from recipes.regression2d.functions import FAMILIES, RegressionProblem


def _problem(eval_dtype: torch.dtype | None) -> RegressionProblem:
    return RegressionProblem(
        FAMILIES["alpine"], train_tasks=2, shots=5, val_shots=5, test_tasks=3, test_query=7,
        inner_lr=0.01, eval_steps=3, seed=0, device=torch.device("cpu"), dtype=torch.float32,
        eval_dtype=eval_dtype,
    )  # fmt: skip


def test_float64_evaluation_of_a_float32_model():
    problem = _problem(torch.float64)
    torch.manual_seed(0)
    model = problem.make_model()
    before = [p.detach().clone() for p in model.parameters()]
    curve = problem.test_curve(model, [0, 3, 50])
    assert curve.dtype == torch.float64
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert next(model.parameters()).dtype == torch.float32
    direct = adaptation_curve(
        copy.deepcopy(model).double(), problem.test_support, problem.test_query, lr=0.01,
        eval_steps=[0, 3, 50], metric=nrmse,
    )  # fmt: skip
    torch.testing.assert_close(curve, direct, rtol=0, atol=0)
    # float32 evaluation of the same model gives the same numbers up to float32 round-off
    in32 = _problem(None).test_curve(model, [0, 3, 50])
    assert in32.dtype == torch.float32
    torch.testing.assert_close(in32.double(), curve, rtol=1e-3, atol=1e-4)
