"""Sine regression: BinomMAML's estimator study, and meta-training with any rule.

    python -m recipes.sine --quick                              # both, in ~1-2 min on 2 CPUs
    python -m recipes.sine --mode study --study-steps 5 --study-lr 0.003
    python -m recipes.sine --mode train --rule binomial --order 1 --meta-steps 2000
    python -m recipes.sine --mode train --rule binomial --order 1 --meta-steps 4000 --resume
    python -m recipes.sine --mode train --learn-lr per-parameter   # Meta-SGD
    python -m recipes.sine --mode train --anil                     # ANIL
    python -m recipes.sine --mode train --methods exact binomial:order=1 first_order

``--mode study`` (a): relative error and cosine similarity of every rule's meta-gradient
against ``Exact``, for ``L = 0..K`` (Binomial vs Truncated; FirstOrder as ``L = 0``), as
a table and a plot, with the regime ``K * lr * max ||H_k||``.
``--mode train`` (b): meta-training with ``--rule`` (any registered rule, or
``reptile``) through the shared runner; the meta-test loss curve (query MSE of 100
held-out tasks after 0..``--test-steps`` adaptation steps) as a table and a plot.
``--learn-lr scalar|per-step|per-parameter`` makes the inner step size a meta-parameter
(one rate; one per step, MAML++; one per weight, Meta-SGD), started at ``--inner-lr``,
trained by the outer Adam with the network, checkpointed, and used by the meta-test
adaptation (per-step: test steps past K reuse the last rate). ``--anil`` adapts only the
last layer; the body is meta-learned through the inner loop (:mod:`recipes.common.inner`).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch

from recipes.common.compare import Evaluation, check_study, compare, parse_methods
from recipes.common.config import config_dict, option, parse_config, vmap_tasks_option
from recipes.common.env import cpu_threads, resolve_device, resolve_dtype
from recipes.common.inner import InnerConfig, InnerParams, check_method
from recipes.common.methods import Method, parse_method
from recipes.common.metrics import (
    remove_stale_temporaries,
    training_time,
    write_csv,
    write_json,
)
from recipes.common.plotting import plot_curves
from recipes.common.runner import Callback, RunResult, check_start, train
from recipes.common.tables import markdown_table
from recipes.sine.study import StudySettings, format_study, run_study
from recipes.sine.study_seeds import format_seeds, run_seeds
from recipes.sine.tasks import SineProblem
from torchopt_metagrad.diagnostics import curvature_regime

__all__ = ["SineConfig", "main"]


@dataclasses.dataclass(frozen=True)
class SineConfig(InnerConfig):
    """Options of the sine recipe; defaults are the papers' values.

    The estimator study uses K = 5, lr = 0.003, 20 tasks (BinomMAML's sine study as
    set in this project's issue); meta-training follows MAML's sine setup (Finn et
    al., 2017): 10 support / 10 query points, 25 tasks per meta-batch, inner
    step 0.01, Adam 1e-3, 70,000 meta-steps (here with K = 5 inner steps).
    """

    RECIPE: ClassVar[str] = "sine"
    QUICK: ClassVar[dict[str, Any]] = {
        "mode": "both",
        "meta_steps": 300,
        "meta_batch": 10,
        "eval_every": 50,
        "checkpoint_every": 100,
    }

    mode: str = option("study", "what to run", choices=("study", "train", "both"), volatile=True)
    shots: int = option(10, "support points per task", minimum=1)
    query_shots: int = option(10, "query points per task", minimum=1)
    # (a) the estimator study
    study_steps: int = option(5, "study: inner steps K", volatile=True, minimum=1)
    study_lr: float = option(0.003, "study: inner step size", volatile=True)
    study_tasks: int = option(20, "study: tasks averaged over", volatile=True, minimum=1)
    study_seeds: int = option(
        1,
        "study: run it for this many seeds (--seed, --seed+1, ...; each a new initialization "
        "and new tasks) and report ratios as geometric means with their range",
        volatile=True,
    )
    power_iters: int = option(
        20, "study: power iterations per Hessian-norm estimate", volatile=True
    )
    # (b) meta-training (shared runner)
    rule: str = option(
        "exact", "train: meta-gradient rule (any of tmg.available_rules()) or reptile"
    )
    methods: tuple[str, ...] = option(
        (),
        "train: compare these methods instead of --rule, name[:key=value,...] each (one run "
        "folder per method under train/, ranked by the meta-test MSE after K steps)",
    )
    meta_steps: int = option(
        70000, "train: outer steps; a resumed run may extend it", volatile=True
    )
    meta_batch: int = option(25, "train: tasks per meta-batch")
    vmap_tasks: bool = vmap_tasks_option(True, "benchmarks/results_tasks_cpu.md: the speed-up")
    steps: int = option(5, "train: inner steps K", minimum=1)
    eval_every: int = option(1000, "train: evaluate every this many meta-steps")
    checkpoint_every: int = option(
        1000, "train: checkpoint every this many meta-steps", volatile=True
    )
    test_tasks: int = option(100, "train: held-out tasks for the meta-test loss", minimum=1)
    test_steps: int = option(10, "train: the meta-test curve goes to this many adaptation steps")

    def __post_init__(self) -> None:
        super().__post_init__()
        for method in parse_methods(self.methods or (self.rule,), self.steps):
            # e.g. reptile + --anil, order > steps: argparse errors
            check_method(method, self.learn_lr, self.anil, self.steps, self.inner_optimizer)
        if self.study_seeds < 1:
            raise ValueError(f"--study-seeds must be >= 1, got {self.study_seeds}")
        if self.power_iters < 1:
            raise ValueError(f"--power-iters must be >= 1, got {self.power_iters}")
        if not self.study_lr > 0:
            raise ValueError(f"--study-lr must be > 0, got {self.study_lr}")


def main(
    argv: Sequence[str] | None = None, *, callbacks: Sequence[Callback] = ()
) -> dict[str, Any]:
    """Run the recipe; returns the metrics (``{"study": ..., "train": ...}``).

    Args:
        argv: command-line arguments (``None``: ``sys.argv[1:]``).
        callbacks: called after every meta-step of training (tests use them).
    """
    config = parse_config(SineConfig, argv, description=__doc__.splitlines()[0])
    with cpu_threads(config.threads):
        return _run(config, callbacks)


def _run(config: SineConfig, callbacks: Sequence[Callback]) -> dict[str, Any]:
    out = Path(config.out_dir)
    if config.mode in ("train", "both"):  # a refused run leaves the folder as it was
        if config.methods:
            check_study(
                parse_methods(config.methods, config.steps), config, out / "train", recipe="sine"
            )
        else:
            check_start("sine", parse_method(config.rule), config, out / "train")
    out.mkdir(parents=True, exist_ok=True)
    for folder in (out, out / "study"):
        remove_stale_temporaries(folder)
    write_json(out / "config.json", config_dict(config))
    result: dict[str, Any] = {}
    if config.mode in ("study", "both"):
        settings = StudySettings(
            steps=config.study_steps,
            lr=config.study_lr,
            tasks=config.study_tasks,
            shots=config.shots,
            query_shots=config.query_shots,
            power_iters=config.power_iters,
            seed=config.seed,
            device=config.device,
            dtype=config.dtype,
            progress=config.progress,
            plots=config.plots,
        )
        if config.study_seeds > 1:
            seeds = run_seeds(settings, config.study_seeds, out / "study")
            print(format_seeds(seeds), flush=True)
            result["study"] = seeds
        else:
            study = run_study(settings, out / "study")
            print(format_study(study), flush=True)
            result["study"] = study
    if config.mode in ("train", "both") and config.methods:
        result["train"] = _compare(config, out / "train", callbacks)
    elif config.mode in ("train", "both"):
        result["train"] = _train(config, out / "train", callbacks)
    return result


def _problem(config: SineConfig, eval_steps: int) -> SineProblem:
    return SineProblem(
        shots=config.shots,
        query_shots=config.query_shots,
        test_tasks=config.test_tasks,
        eval_steps=eval_steps,
        seed=config.seed,
        device=resolve_device(config.device),
        dtype=resolve_dtype(config.dtype),
    )


def _compare(config: SineConfig, out: Path, callbacks: Sequence[Callback]) -> dict[str, Any]:
    """``--methods``: every method through the shared comparison, ranked by the meta-test
    MSE after K adaptation steps."""
    problem = _problem(config, config.steps)
    steps = sorted({0, 1, min(config.steps, config.test_steps), config.test_steps})

    def evaluate(method: Method, run: RunResult) -> Evaluation:
        k = method.steps or config.steps
        curve = problem.test_curve(run.model, list(range(config.test_steps + 1)), run.inner)
        mean, std = curve.mean(0).tolist(), curve.std(0).tolist()
        return Evaluation(
            score=mean[min(k, config.test_steps)],
            cells=[f"{mean[s]:.3f} ± {std[s]:.3f}" for s in steps],
            data={"test_curve": {"mean": mean, "std": std}},
            csv_rows=[{"adapt_steps": s, "mse_mean": mean[s], "mse_std": std[s]} for s in steps],
            per_task=curve[:, min(k, config.test_steps)].tolist(),
        )

    return compare(
        problem,
        parse_methods(config.methods, config.steps),
        config,
        out,
        recipe="sine",
        evaluate=evaluate,
        columns=[f"{s} steps" for s in steps],
        title=f"sine: query MSE on {config.test_tasks} new tasks after each number of "
        f"adaptation steps (mean ± std); ranked after K",
        curve=("eval/meta_test_loss", "meta-test MSE after K steps"),
        callbacks=callbacks,
    )


def _train(config: SineConfig, out: Path, callbacks: Sequence[Callback]) -> dict[str, Any]:
    method = parse_method(config.rule)
    method.check(config.steps)
    problem = _problem(config, method.steps or config.steps)
    run = train(problem, method, config, out, recipe="sine", callbacks=callbacks)
    metrics: dict[str, Any] = {
        "method": method.spec,
        "step": run.step,
        "completed": run.completed,
        "interrupted": run.interrupted,
        "history": [
            {"step": r["step"], "meta_test_loss": r["eval/meta_test_loss"]}
            for r in run.records
            if "eval/meta_test_loss" in r
        ],
        "train_time_s": training_time(run.records),
    }
    if not run.completed:
        print(
            f"sine train: stopped at meta-step {run.step}/{config.meta_steps}; the checkpoint "
            f"in {out} resumes it (same command with --resume)",
            flush=True,
        )
        return metrics
    start = time.perf_counter()
    adapt_steps = list(range(config.test_steps + 1))
    curve = problem.test_curve(run.model, adapt_steps, run.inner)
    mean, std = curve.mean(0).tolist(), curve.std(0).tolist()
    metrics["test_curve"] = {"steps": adapt_steps, "mean": mean, "std": std}
    metrics["inner"] = run.inner.describe()
    regime = _regime(config, problem, run.model) if run.inner.default else []
    metrics["K_lr_max_H_mean"] = sum(regime) / len(regime) if regime else None
    metrics["eval_time_s"] = time.perf_counter() - start
    rows = [
        {"adapt_steps": s, "mse_mean": m, "mse_std": d}
        for s, m, d in zip(adapt_steps, mean, std, strict=True)
    ]
    write_csv(out / "summary.csv", rows)
    write_json(out / "result.json", metrics)
    if config.plots:
        plot_curves(
            out / "meta_test_curve.png",
            {method.display: (adapt_steps, mean, std)},
            xlabel="test-time adaptation steps",
            ylabel="query MSE (mean +- std over tasks)",
            title=f"sine: meta-test loss after meta-training, {config.test_tasks} tasks",
        )
        hist = metrics["history"]
        at, loss = [h["step"] for h in hist], [h["meta_test_loss"] for h in hist]
        plot_curves(
            out / "meta_test_vs_step.png",
            {method.display: (at, loss, None)},
            xlabel="meta-step",
            ylabel=f"query MSE after {problem.eval_steps} steps",
            logy=True,
            title="sine: meta-test loss during meta-training",
        )
    shown = sorted({0, 1, min(config.steps, config.test_steps), config.test_steps})
    print(
        f"sine meta-training with {method.display}: {run.step} meta-steps, K={problem.eval_steps}, "
        f"{_inner_text(config, run.inner)}, meta-batch {config.meta_batch} "
        f"(training {metrics['train_time_s']:.0f} s); meta-test query MSE on "
        f"{config.test_tasks} new tasks; "
        + (
            f"at the learned initialization K * lr * max_k ||H_k|| = "
            f"{metrics['K_lr_max_H_mean']:.3g} (mean over {len(regime)} test tasks)"
            if regime
            else "K * lr * max_k ||H_k|| not measured (it assumes one fixed lr, all "
            "parameters adapting)"
        )
        + "\n\n"
        + markdown_table(
            ["adaptation steps", *map(str, shown)],
            [["MSE (mean +- std)", *[f"{mean[s]:.3f} +- {std[s]:.3f}" for s in shown]]],
        ),
        flush=True,
    )
    return metrics


def _regime(config: SineConfig, problem: SineProblem, model: torch.nn.Module) -> list[float]:
    """K * lr * max_k ||H_k|| at the learned initialization, on up to 10 test tasks
    (cf. the study's regime line; plain GD at the fixed lr, all parameters)."""
    gen = torch.Generator().manual_seed(config.seed + 3)
    params, loss_fn = dict(model.named_parameters()), problem.loss_fn(model)
    xs, ys = problem.test_support
    return [
        curvature_regime(
            loss_fn,
            params,
            (xs[i], ys[i]),
            steps=problem.eval_steps,
            lr=config.inner_lr,
            iters=config.power_iters,
            generator=gen,
        )[0]
        for i in range(min(10, config.test_tasks))
    ]


def _inner_text(config: SineConfig, inner: InnerParams) -> str:
    """How the inner loop stepped: the fixed lr or the learned rates, and what adapted."""
    text = f"inner lr {config.inner_lr}"
    if inner.learned:
        s = inner.stats()
        text = (
            f"learned inner lr ({inner.mode}, from {config.inner_lr}; now mean "
            f"{s['inner/lr_mean']:.4g}, range [{s['inner/lr_min']:.4g}, {s['inner/lr_max']:.4g}])"
        )
    return text + (f", ANIL (adapting {', '.join(inner.adapt)})" if inner.adapt else "")
