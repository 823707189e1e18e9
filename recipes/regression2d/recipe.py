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
(200 / 500 steps, T = 2 / 5), and MAML (``exact``) with the short one (20 / 50).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

from recipes.common.config import TrainConfig, config_dict, option, parse_config, stable_fields
from recipes.common.env import cpu_threads, resolve_device, resolve_dtype
from recipes.common.methods import Method, parse_method
from recipes.common.metrics import training_time, write_csv, write_json
from recipes.common.plotting import plot_curves
from recipes.common.runner import Callback, train
from recipes.common.tables import markdown_table
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
    methods: tuple[str, ...] = option(
        (), "methods to compare, name[:key=value,...] (empty: the paper's five)"
    )
    train_tasks: int = option(100, "meta-training task pool")
    test_tasks: int = option(100, "new tasks for the meta-test")
    test_query: int = option(100, "held-out examples per test task")
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
        )
        methods = [parse_method(s) for s in specs]
        for method in methods:
            method.check(self._value("steps"))
        slugs = [m.slug for m in methods]
        if len(set(slugs)) != len(slugs):
            raise ValueError(f"--methods: two methods have the same name: {slugs}; add label=...")
        return methods


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
    out = Path(config.out_dir)
    manifest = out / "study.json"
    if config.resume and not manifest.is_file():
        raise FileNotFoundError(f"--resume: no study to resume in {out} ({manifest} is missing)")
    out.mkdir(parents=True, exist_ok=True)
    write_json(manifest, {"config": config_dict(config), "stable": stable_fields(config)})
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
    )
    test_steps = list(config.test_steps)
    results: dict[str, Any] = {}
    interrupted = False
    for method in methods:
        run_dir = out / method.slug
        resume = config.resume and (run_dir / "checkpoint.pt").is_file()
        run = train(
            problem,
            method,
            dataclasses.replace(config, resume=resume),
            run_dir,
            recipe="regression2d",
            callbacks=callbacks,
        )
        entry: dict[str, Any] = {
            "method": method.spec,
            "inner_steps": method.steps or config.steps,
            "step": run.step,
            "train_time_s": training_time(run.records),
        }
        results[method.display] = entry
        if not run.completed:
            interrupted = True
            print(
                f"regression2d: {method.display} stopped at meta-step {run.step}/"
                f"{config.meta_steps}; rerun the same command with --resume to continue",
                flush=True,
            )
            break
        start = time.perf_counter()
        curve = problem.test_curve(run.model, test_steps, run.inner)
        entry["nrmse_mean"] = curve.mean(0).tolist()
        entry["nrmse_std"] = curve.std(0).tolist()
        entry["eval_time_s"] = time.perf_counter() - start
        entry["final_train_query_loss"] = run.records[-1]["train/query_loss"]
    summary = {
        "function": config.function,
        "setting": config.setting,
        "test_steps": test_steps,
        "methods": results,
        "interrupted": interrupted,
    }
    done = {k: v for k, v in results.items() if "nrmse_mean" in v}
    if not interrupted:
        summary["ranking"] = sorted(done, key=lambda k: done[k]["nrmse_mean"][-1])
        _report(config, summary, done, out)
    write_json(out / "results.json", summary)
    return summary


def _report(
    config: Regression2DConfig, summary: dict[str, Any], done: dict[str, Any], out: Path
) -> None:
    steps = summary["test_steps"]
    rows, csv_rows = [], []
    for label in summary["ranking"]:
        r = done[label]
        cells = [f"{m:.3f} ± {s:.3f}" for m, s in zip(r["nrmse_mean"], r["nrmse_std"], strict=True)]
        rows.append([label, r["inner_steps"], *cells, f"{r['train_time_s']:.0f}"])
        for s, m, d in zip(steps, r["nrmse_mean"], r["nrmse_std"], strict=True):
            csv_rows.append(
                {
                    "method": label,
                    "spec": r["method"],
                    "adapt_steps": s,
                    "nrmse_mean": m,
                    "nrmse_std": d,
                }
            )
    write_csv(out / "summary.csv", csv_rows)
    title = (
        f"{config.function}, {config.shots}shot-{config.val_shots}val, {config.meta_steps} "
        f"meta-steps x {config.meta_batch} tasks, Adam {config.outer_lr:g}, inner lr "
        f"{config.inner_lr:g}; nRMSE on {config.test_tasks} new tasks (mean ± std)"
    )
    print(
        title
        + "\n\n"
        + markdown_table(["method", "inner steps", *[f"{s} steps" for s in steps], "train s"], rows)
        + f"\n\nranking after {steps[-1]} adaptation steps (best first): "
        + " < ".join(summary["ranking"]),
        flush=True,
    )
    if config.plots:
        plot_curves(
            out / "nrmse_vs_adaptation_steps.png",
            {k: (steps, done[k]["nrmse_mean"], done[k]["nrmse_std"]) for k in summary["ranking"]},
            xlabel="test-time GD steps",
            ylabel="nRMSE (mean ± std over tasks)",
            logx=True,
            title=title.split(";")[0],
        )
