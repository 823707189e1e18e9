"""A-MAML's synthetic study: meta-learn CosMixture / Alpine regression with several methods.

    python -m recipes.regression2d --quick
    python -m recipes.regression2d --function alpine --setting 100shot
    python -m recipes.regression2d --methods binomial:order=2,steps=20 reptile adjoint
    python -m recipes.regression2d --resume            # continue an interrupted study

Every method meta-trains the same initialization on the same 100-task pool and the
same meta-batch sequence through the shared runner (one run folder, checkpoint and
metrics file per method); then each learned initialization is adapted by gradient
descent (step ``--inner-lr``) to ``--test-tasks`` new tasks, and the nRMSE after
each number of steps in ``--test-steps`` is reported, mean and standard deviation
over tasks, as a table and a plot.

Methods are ``name[:key=value,...]`` (see ``recipes.common.methods``): any rule of
``tmg.available_rules()`` with its knobs, or ``reptile``; ``steps=N`` overrides the
inner steps for that method and ``label=...`` names it. The default list is the
paper's: FOMAML, Reptile, iMAML (reg 1, 5 CG steps), A-MAML (the adjoint with the
modified Euler scheme over the GD iterates, t_k = k lr) with the long horizon
(200 / 500 steps, T = 2 / 5), MAML (``exact``) with the short one (20 / 50), and
MAML-1 (one inner step, the paper's Fig. 2). The paper's A-MAML solves the forward
gradient flow with RK45; ``adjoint:flow=dopri5,label=A-MAML-RK45`` runs that variant
(``tmg.flow`` with torchdiffeq's dopri5) instead of the GD iterates.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

from recipes.common.compare import Evaluation, StepsCurve, compare, parse_methods
from recipes.common.config import TrainConfig, option, parse_config, vmap_tasks_option
from recipes.common.env import cpu_threads, resolve_device, resolve_dtype
from recipes.common.methods import Method
from recipes.common.runner import Callback, RunResult
from recipes.regression2d.functions import FAMILIES, RegressionProblem

__all__ = ["SETTINGS", "Regression2DConfig", "main"]

#: The paper's two settings: examples per task and inner steps (long / MAML's).
SETTINGS = {
    "50shot": {"shots": 50, "val_shots": 50, "steps": 200, "maml_steps": 20},
    "100shot": {"shots": 100, "val_shots": 100, "steps": 500, "maml_steps": 50},
}


@dataclasses.dataclass(frozen=True)
class Regression2DConfig(TrainConfig):
    """Options of the 2D regression study; defaults are the A-MAML paper's values.

    ``shots``, ``val_shots``, ``steps`` and ``maml_steps`` left at 0 take the values
    of ``--setting``.
    """

    RECIPE: ClassVar[str] = "regression2d"
    QUICK: ClassVar[dict[str, Any]] = {
        "steps": 20,
        "maml_steps": 2,
        "meta_steps": 60,
        "eval_every": 20,
        "checkpoint_every": 20,
        "test_steps": (0, 10, 20, 50, 100, 200),
    }

    function: str = option("cosmixture", "task family", choices=tuple(FAMILIES))
    setting: str = option("50shot", "50shot-50val or 100shot-100val", choices=tuple(SETTINGS))
    shots: int = option(0, "training examples per task (0: from --setting)")
    val_shots: int = option(0, "validation examples per task (0: from --setting)")
    steps: int = option(0, "inner GD steps of the long-horizon methods (0: from --setting)")
    maml_steps: int = option(0, "inner GD steps of MAML (exact) (0: from --setting)")
    vmap_tasks: bool = vmap_tasks_option(True, "benchmarks/results_tasks_cpu.md: the speed-up")
    methods: tuple[str, ...] = option(
        (), "methods to compare, name[:key=value,...] (empty: the paper's six)"
    )
    train_tasks: int = option(100, "meta-training task pool", minimum=1)
    test_tasks: int = option(100, "new tasks for the meta-test", minimum=1)
    test_query: int = option(100, "held-out examples per test task", minimum=1)
    eval_dtype: str = option(
        "float64",
        "dtype of the test-time adaptation (the meta-trained model is copied to it): "
        "Alpine's curves moved by up to 0.24 nRMSE between float32 and float64",
        choices=("float32", "float64"),
    )
    test_steps: tuple[int, ...] = option(
        (0, 10, 20, 50, 100, 200, 500, 1000), "test-time adaptation steps to report"
    )
    meta_steps: int = option(
        5000, "meta-steps per method (the paper's 5,000 meta-epochs)", volatile=True
    )
    meta_batch: int = option(5, "tasks per meta-batch")
    eval_every: int = option(
        500, "log the test nRMSE (after --steps steps) every this many meta-steps"
    )
    checkpoint_every: int = option(100, "checkpoint every this many meta-steps", volatile=True)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.method_list()  # bad --methods: an argparse error, not a crash later

    def resolved(self) -> Regression2DConfig:
        """The config with the ``--setting`` values filled in."""
        filled: dict[str, Any] = {k: self._value(k) for k in SETTINGS[self.setting]}
        return dataclasses.replace(self, **filled)

    def _value(self, name: str) -> int:
        """A field that ``--setting`` fills: its value, or the setting's when it is 0."""
        return getattr(self, name) or SETTINGS[self.setting][name]

    def method_list(self) -> list[Method]:
        """The methods, parsed (the paper's list when ``--methods`` is empty)."""
        specs = self.methods or (
            "first_order:label=FOMAML",
            "reptile:label=Reptile",
            "implicit_cg:reg=1,maxiter=5,label=iMAML",
            "adjoint:label=A-MAML",
            f"exact:steps={self._value('maml_steps')},label=MAML",
            "exact:steps=1,label=MAML-1",  # the paper's one-step MAML (its Fig. 2)
        )
        return parse_methods(specs, self._value("steps"))


def main(
    argv: Sequence[str] | None = None, *, callbacks: Sequence[Callback] = ()
) -> dict[str, Any]:
    """Run the study; returns ``{"methods": {label: {...}}, "ranking": [...], ...}``.

    Raises:
        FileNotFoundError: ``--resume`` in a folder with no study to resume.
        ValueError: a corrupted checkpoint, or one written with other settings.
    """
    config = parse_config(Regression2DConfig, argv, description=__doc__.splitlines()[0]).resolved()
    with cpu_threads(config.threads):
        return _run(config, callbacks)


def _run(config: Regression2DConfig, callbacks: Sequence[Callback]) -> dict[str, Any]:
    methods = config.method_list()
    device, dtype = resolve_device(config.device), resolve_dtype(config.dtype)
    problem = RegressionProblem(
        FAMILIES[config.function],
        train_tasks=config.train_tasks,
        shots=config.shots,
        val_shots=config.val_shots,
        test_tasks=config.test_tasks,
        test_query=config.test_query,
        inner_lr=config.inner_lr,
        eval_steps=config.steps,
        seed=config.seed,
        device=device,
        dtype=dtype,
        eval_dtype=resolve_dtype(config.eval_dtype),
    )
    test_steps = list(config.test_steps)

    def evaluate(method: Method, run: RunResult) -> Evaluation:
        curve = problem.test_curve(run.model, test_steps, run.inner)
        mean, std = curve.mean(0).tolist(), curve.std(0).tolist()
        return Evaluation(
            score=mean[-1],
            cells=[f"{m:.3f} ± {s:.3f}" for m, s in zip(mean, std, strict=True)],
            data={
                "nrmse_mean": mean,
                "nrmse_std": std,
                "final_train_query_loss": run.records[-1]["train/query_loss"],
            },
            csv_rows=[
                {"adapt_steps": k, "nrmse_mean": m, "nrmse_std": d}
                for k, m, d in zip(test_steps, mean, std, strict=True)
            ],
            per_task=curve[:, -1].tolist(),
        )

    title = (
        f"{config.function}, {config.shots}shot-{config.val_shots}val, {config.meta_steps} "
        f"meta-steps x {config.meta_batch} tasks, outer {config.outer_optimizer} "
        f"{config.outer_lr:g}, inner lr {config.inner_lr:g}; nRMSE on {config.test_tasks} new "
        f"tasks (mean ± std) after each number of test-time steps; ranked after {test_steps[-1]}"
    )
    out = Path(config.out_dir)
    summary = compare(
        problem,
        methods,
        config,
        out,
        recipe="regression2d",
        evaluate=evaluate,
        columns=[f"{s} steps" for s in test_steps],
        title=title,
        curve=("eval/test_nrmse", f"test nRMSE after {config.steps} steps"),
        steps_curve=StepsCurve(test_steps, "nrmse", "nRMSE (mean ± std over tasks)", logx=True),
        header={
            "function": config.function,
            "setting": config.setting,
            "test_steps": test_steps,
        },
        callbacks=callbacks,
    )
    return summary
