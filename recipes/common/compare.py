"""Several methods on one problem: per-method runs with resume, evaluation, ranking, table, plots.

Every recipe that compares methods calls :func:`compare` with its problem, the parsed
``--methods`` (:func:`parse_methods`) and an ``evaluate(method, run) -> Evaluation``
of a finished run. Each method meta-trains through the shared runner in its own folder
``<out>/<slug>`` (checkpoint, ``metrics.jsonl``) from the same initialization and the
same task stream; ``--resume`` continues the methods that have a checkpoint (a finished
one is only evaluated again) and starts the others; a folder that already holds runs is
refused unless ``--resume`` or ``--overwrite`` is given. When every method has
finished, the methods are ranked by their evaluation's ``score``, and a Markdown
table, ``results.json``, ``summary.csv`` and a plot of the periodic evaluation against
the meta-step are written.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import statistics
import textwrap
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from recipes.common.config import TrainConfig, config_dict, stable_fields
from recipes.common.methods import Method, parse_method
from recipes.common.metrics import (
    remove_stale_temporaries,
    training_time,
    write_csv,
    write_json,
)
from recipes.common.plotting import plot_curves
from recipes.common.runner import (
    Callback,
    MetaProblem,
    RunExistsError,
    RunResult,
    check_start,
    train,
)
from recipes.common.tables import markdown_table

__all__ = ["Evaluation", "StepsCurve", "check_study", "compare", "parse_methods"]


@dataclass(frozen=True)
class Evaluation:
    """A finished run's evaluation, as the comparison uses it.

    Attributes:
        score: the number methods are ranked by.
        cells: the method's table cells (one per entry of ``compare``'s ``columns``).
        data: JSON entries for the method in ``results.json``.
        csv_rows: rows for ``summary.csv`` (the method's label and spec are added).
        per_task: the score on each test task, in the same task order for every method
            (optional). When every method gives it, neighbours in the ranking are
            compared by a paired t-test over the tasks (:func:`paired`), and the ranking
            says which gaps the test tasks can tell apart.
    """

    score: float
    cells: Sequence[str]
    data: dict[str, Any] = field(default_factory=dict)
    csv_rows: Sequence[dict[str, Any]] = ()
    per_task: Sequence[float] | None = None


@dataclass(frozen=True)
class StepsCurve:
    """A plot of each method's test score against the number of test-time adaptation
    steps, from its ``results.json`` entry (``{key}_mean`` and ``{key}_std``, one value
    per entry of ``steps``), written to ``{key}_vs_adaptation_steps.png``."""

    steps: Sequence[int]
    key: str
    ylabel: str
    logx: bool = False


#: |t| at or above which a paired gap counts as real (two-sided ~5% for >= 30 tasks).
T_THRESHOLD = 2.0


def paired(a: Sequence[float], b: Sequence[float]) -> dict[str, float]:
    """Paired comparison of two methods' scores on the same tasks: the mean of
    ``a - b``, its standard error, and ``t = mean / se`` (``n - 1`` degrees of
    freedom; ``|t| >=`` :data:`T_THRESHOLD` is read as a real gap). The spread of the
    scores over tasks (the table's ± column) is not the uncertainty of a difference of
    means on shared tasks: most of it is the tasks' difficulty, which pairing removes.
    """
    if len(a) != len(b) or len(a) < 2:
        raise ValueError(
            f"paired: need two equally long score lists of >= 2 tasks, got {len(a)}, {len(b)}"
        )
    d = [float(x) - float(y) for x, y in zip(a, b, strict=True)]
    n = len(d)
    mean = sum(d) / n
    se = statistics.stdev(d) / math.sqrt(n)
    t = mean / se if se > 0 else (0.0 if mean == 0 else math.copysign(math.inf, mean))
    return {"mean_diff": mean, "se": se, "t": t, "n": n}


def parse_methods(specs: Sequence[str], steps: int) -> list[Method]:
    """Parse method specs, check each against ``steps`` inner steps (unless the method
    sets its own), and refuse two methods with one name.

    Raises:
        ValueError: a bad spec (the rule's message), ``order > steps``, or a repeated name.
    """
    methods = [parse_method(s) for s in specs]
    if not methods:
        raise ValueError("--methods: give at least one method")
    for method in methods:
        method.check(steps)
    slugs = [m.slug for m in methods]
    if len(set(slugs)) != len(slugs):
        raise ValueError(f"--methods: two methods have the same name: {slugs}; add label=...")
    return methods


def check_study(methods: Sequence[Method], config: TrainConfig, out: Path, *, recipe: str) -> None:
    """What :func:`compare` checks before it writes anything (see
    :func:`~recipes.common.runner.check_start`): a refused command leaves ``out`` as it was.

    Raises:
        RunExistsError: runs already in ``out`` without ``--resume`` / ``--overwrite``.
        FileNotFoundError: ``--resume`` in a folder with no comparison to resume.
        CheckpointError: a method's checkpoint is corrupted or from other settings.
    """
    manifest = out / "study.json"
    if config.resume and not manifest.is_file():
        raise FileNotFoundError(f"--resume: no study to resume in {out} ({manifest} is missing)")
    existing = [str(out / m.slug) for m in methods if (out / m.slug / "checkpoint.pt").is_file()]
    if existing and not (config.resume or config.overwrite):
        raise RunExistsError(
            f"{out} already holds runs ({', '.join(existing)}): add --resume to continue "
            "them, --overwrite to start afresh, or choose another --out / --name"
        )
    for method in methods:
        run_dir = out / method.slug
        if config.resume and (run_dir / "checkpoint.pt").is_file():
            check_start(recipe, method, config, run_dir)


def compare(
    problem: MetaProblem,
    methods: Sequence[Method],
    config: TrainConfig,
    out: Path,
    *,
    recipe: str,
    evaluate: Callable[[Method, RunResult], Evaluation],
    columns: Sequence[str],
    title: str,
    higher_is_better: bool = False,
    curve: tuple[str, str] | None = None,
    steps_curve: StepsCurve | None = None,
    header: dict[str, Any] | None = None,
    callbacks: Sequence[Callback] = (),
) -> dict[str, Any]:
    """Train and evaluate every method; see the module docstring.

    Args:
        curve: ``(record key, axis label)`` of the periodic evaluation to plot against the
            meta-step for every method (e.g. ``("eval/val_accuracy", "accuracy")``).
        steps_curve: also plot the final scores against test-time adaptation steps.
        header: the recipe's own entries, first in ``results.json`` and the result.

    Returns:
        ``{**header, "methods": {label: entry}, "interrupted": bool, "ranking": [labels]}``
        (no ranking when a method stopped early); each entry has ``method`` (its spec),
        ``inner_steps``, ``step``, ``train_time_s``, ``step_time_s`` and the evaluation's
        data.

    Raises:
        RunExistsError: runs already in ``out`` without ``--resume`` / ``--overwrite``.
        FileNotFoundError: ``--resume`` in a folder with no comparison to resume.
    """
    check_study(methods, config, out, recipe=recipe)
    manifest = out / "study.json"
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out)
    write_json(manifest, {"config": config_dict(config), "stable": stable_fields(config)})
    results: dict[str, Any] = {}
    evaluations: dict[str, Evaluation] = {}
    records: dict[str, list[dict[str, Any]]] = {}
    interrupted = False
    for method in methods:
        run_dir = out / method.slug
        resume = config.resume and (run_dir / "checkpoint.pt").is_file()
        run = train(
            problem,
            method,
            dataclasses.replace(config, resume=resume),
            run_dir,
            recipe=recipe,
            callbacks=callbacks,
        )
        seconds = training_time(run.records)
        per_step = [r["step_time_s"] for r in run.records if "step_time_s" in r]
        entry: dict[str, Any] = {
            "method": method.spec,
            "inner_steps": method.steps or config.steps,
            "step": run.step,
            "train_time_s": seconds,
            # the meta-steps themselves (no evaluation, no checkpoints)
            "step_time_s": sum(per_step) / len(per_step)
            if per_step
            else seconds / max(run.step, 1),
        }
        results[method.display] = entry
        records[method.display] = run.records
        if not run.completed:
            interrupted = True
            print(
                f"{recipe}: {method.display} stopped at meta-step {run.step}/"
                f"{config.meta_steps}; rerun the same command with --resume to continue",
                flush=True,
            )
            break
        start = time.perf_counter()
        evaluations[method.display] = evaluation = evaluate(method, run)
        entry.update(evaluation.data)
        entry["eval_time_s"] = time.perf_counter() - start
    summary: dict[str, Any] = {**(header or {}), "methods": results, "interrupted": interrupted}
    if not interrupted:
        ranking = sorted(evaluations, key=lambda k: evaluations[k].score, reverse=higher_is_better)
        summary["ranking"] = ranking
        summary["paired"] = _neighbours(evaluations, ranking)
        _report(
            out, config, results, evaluations, ranking, summary["paired"], columns, title, curve,
            records,
        )  # fmt: skip
    write_json(out / "results.json", summary)
    if steps_curve is not None and config.plots and "ranking" in summary:
        _plot_steps_curve(out, summary["methods"], steps_curve, title)
    print(f"{recipe}: outputs in {out} (results.json, summary.csv, plots; one folder per method)")
    return summary


def _plot_steps_curve(out: Path, methods: dict[str, Any], curve: StepsCurve, title: str) -> None:
    mean, std = f"{curve.key}_mean", f"{curve.key}_std"
    plot_curves(
        out / f"{curve.key}_vs_adaptation_steps.png",
        {k: (list(curve.steps), v[mean], v[std]) for k, v in methods.items() if mean in v},
        xlabel="test-time GD steps",
        ylabel=curve.ylabel,
        logx=curve.logx,
        title=title.split(";")[0],
    )


def _neighbours(evaluations: dict[str, Evaluation], ranking: list[str]) -> list[dict[str, Any]]:
    """Paired tests between neighbours in the ranking, when every method has per-task
    scores on the same tasks (else none)."""
    scores = [evaluations[label].per_task for label in ranking]
    if any(s is None for s in scores) or len({len(s) for s in scores if s is not None}) != 1:
        return []
    return [
        {
            "better": a,
            "worse": b,
            **paired(evaluations[a].per_task or [], evaluations[b].per_task or []),
        }
        for a, b in itertools.pairwise(ranking)
    ]


def _ranking_text(ranking: list[str], tests: list[dict[str, Any]]) -> str:
    """``A > B (t = ..) ~ C (t = ..)``: ``>`` where the paired test tells the gap apart,
    ``~`` where it does not."""
    if not tests:
        return "ranking (best first): " + " > ".join(ranking)
    text = ranking[0]
    for test in tests:
        sign = ">" if abs(test["t"]) >= T_THRESHOLD else "~"
        text += f" {sign} {test['worse']} (paired t = {abs(test['t']):.3g})"
    return (
        f"ranking (best first; '>' a gap the {tests[0]['n']} test tasks tell apart by a paired "
        f"t-test, |t| >= {T_THRESHOLD}, '~' one they do not): {text}"
    )


def _report(
    out: Path,
    config: TrainConfig,
    results: dict[str, Any],
    evaluations: dict[str, Evaluation],
    ranking: list[str],
    tests: list[dict[str, Any]],
    columns: Sequence[str],
    title: str,
    curve: tuple[str, str] | None,
    records: dict[str, list[dict[str, Any]]],
) -> None:
    rows, csv_rows = [], []
    for label in ranking:
        r, ev = results[label], evaluations[label]
        rows.append(
            [
                label,
                r["inner_steps"],
                *ev.cells,
                f"{r['train_time_s']:.0f}",
                f"{r['step_time_s']:.3g}",
            ]
        )
        csv_rows += [{"method": label, "spec": r["method"], **row} for row in ev.csv_rows]
    write_csv(out / "summary.csv", csv_rows)
    table = markdown_table(["method", "inner steps", *columns, "train s", "s / meta-step"], rows)
    print(f"{title}\n\n{table}\n\n{_ranking_text(ranking, tests)}", flush=True)
    if config.plots and curve is not None:
        key, label = curve
        curves: dict[str, Any] = {}
        for method in ranking:
            points = [(r["step"], r[key]) for r in records[method] if key in r]
            if points:
                curves[method] = ([p[0] for p in points], [p[1] for p in points], None)
        if curves:
            name = key.split("/")[-1]
            plot_curves(
                out / f"{name}_vs_meta_step.png",
                curves,
                xlabel="meta-step",
                ylabel=label,
                title=textwrap.fill(title.split(";")[0], 80),
            )
