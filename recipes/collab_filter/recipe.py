"""A-MAML's collaborative-filtering study: meta-learn a rating predictor per user.

    python -m recipes.collab_filter.fetch_ml100k --out data/ml-100k   # real MovieLens-100K
    python -m recipes.collab_filter --quick --data data/ml-100k/ml-100k.inter
    python -m recipes.collab_filter --dataset ml-1m --data DATA/ml-1m/ratings.dat
    python -m recipes.collab_filter --dataset jester-1 --data DATA/jester-data-1.xls
    python -m recipes.collab_filter --dataset synthetic-ml-1m --setting 20shot-30val
    python -m recipes.collab_filter ... --resume        # continue an interrupted study

One task per user (the 100 most-rated items, users with >= 20 ratings among them;
input the one-hot item, output the rating; see ``recipes.collab_filter.tasks``). Every
method meta-trains the same MLP 100-40-40-1 (tanh) initialization on the same stream of
meta-batches through the shared runner; then each learned initialization is trained by
gradient descent (step ``--inner-lr``) on ``--shots`` ratings of each of 100 held-out
users and scored on their other ratings: nRMSE = RMSE / (rating-scale width), mean and
std over the users, after each number of steps in ``--test-steps``. The ranking is at
``--steps`` test-time steps (the long horizon), the same for every method.

Defaults are the paper's Table 1: 10shot-15val, inner GD step 0.01, 5 tasks per
meta-batch, Adam 1e-3, 5,000 meta-steps, 50 inner steps for FOMAML, Reptile, iMAML and
A-MAML (the adjoint over the GD iterates, T = 50 x 0.01 = 0.5) and 5 for MAML, plus
Binomial(2) and Truncated(2) at both horizons. Table 2: ``--steps 100 --maml-steps 10``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

from recipes.collab_filter.loaders import FORMATS, load_ratings
from recipes.collab_filter.paper import paper_value
from recipes.collab_filter.synthetic import SYNTHETIC, generate, stats
from recipes.collab_filter.tasks import CollabFilterProblem, build_tasks
from recipes.common.checkpoint import CheckpointError
from recipes.common.compare import Evaluation, StepsCurve, compare, parse_methods
from recipes.common.config import TrainConfig, option, parse_config, vmap_tasks_option
from recipes.common.env import cpu_threads, resolve_device, resolve_dtype
from recipes.common.methods import Method
from recipes.common.metrics import write_json
from recipes.common.runner import Callback, RunResult

__all__ = ["DATASETS", "SETTINGS", "CollabFilterConfig", "main"]

#: Real datasets (read from --data) and their synthetic stand-ins.
DATASETS = ("ml-100k", "ml-1m", "jester-1", *SYNTHETIC)
#: ``--setting``: (support, validation) ratings per task. The paper's tables use the
#: first two; its text says 15shot-20val.
SETTINGS = {"10shot-15val": (10, 15), "20shot-30val": (20, 30), "15shot-20val": (15, 20)}
DEFAULT_DATA = "data/ml-100k/ml-100k.inter"


@dataclasses.dataclass(frozen=True)
class CollabFilterConfig(TrainConfig):
    """Options of the collaborative-filtering study; defaults are the paper's Table 1."""

    RECIPE: ClassVar[str] = "collab_filter"
    QUICK: ClassVar[dict[str, Any]] = {
        "steps": 20,
        "maml_steps": 2,
        "meta_steps": 40,
        "eval_every": 20,
        "checkpoint_every": 20,
        "test_steps": (0, 5, 20, 50),
    }

    dataset: str = option("ml-100k", "ratings (synthetic-*: generated stand-ins)", choices=DATASETS)
    data: str = option(
        "", f"the ratings file of a real dataset (ml-100k: {DEFAULT_DATA})", volatile=True
    )
    format: str = option("auto", "file format (auto: from the name)", choices=("auto", *FORMATS))
    data_seed: int = option(0, "seed of a synthetic dataset")
    items: int = option(100, "the most-rated items kept (one-hot input size)")
    min_ratings: int = option(20, "a user is a task with at least this many kept ratings")
    setting: str = option("10shot-15val", "support-validation ratings", choices=tuple(SETTINGS))
    shots: int = option(0, "support ratings per task (0: from --setting)")
    query_shots: int = option(0, "validation ratings per task (0: from --setting)")
    steps: int = option(50, "inner GD steps of the long-horizon methods (T = steps x lr)")
    maml_steps: int = option(5, "inner GD steps of MAML (exact) and the short-K rows")
    methods: tuple[str, ...] = option(
        (), "methods to compare, name[:key=value,...] (empty: the paper's five and four more)"
    )
    only: tuple[str, ...] = option(
        (),
        "train and evaluate only these methods of the list (by label): split one study over "
        "several processes writing to the same --out, then rerun with --resume and no --only "
        "for the whole table",
        volatile=True,
    )
    test_tasks: int = option(100, "held-out users for the meta-test")
    test_steps: tuple[int, ...] = option(
        (0, 5, 10, 50, 100), "test-time GD steps to report (--steps is always added)"
    )
    meta_steps: int = option(5000, "meta-steps per method (the paper's 5,000)", volatile=True)
    eval_every: int = option(500, "log the test nRMSE after --steps steps every this many")
    checkpoint_every: int = option(100, "checkpoint every this many meta-steps", volatile=True)
    vmap_tasks: bool = vmap_tasks_option(True, "faster for this small MLP on CPU")

    def __post_init__(self) -> None:
        shots, query = SETTINGS[self.setting]
        for name, value in (("shots", shots), ("query_shots", query)):
            if getattr(self, name) == 0:
                object.__setattr__(self, name, value)
        super().__post_init__()
        for name in ("items", "min_ratings", "test_tasks", "maml_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
        if self.dataset in SYNTHETIC and self.data:
            raise ValueError(f"--data: --dataset {self.dataset} is generated, not read")
        self.selected()  # bad --methods / --only: an argparse error

    def selected(self) -> list[Method]:
        """The methods to run in this process: :meth:`method_list`, filtered by ``--only``."""
        methods = self.method_list()
        labels = [m.display for m in methods]
        unknown = [name for name in self.only if name not in labels]
        if unknown:
            raise ValueError(f"--only: {unknown} not among the methods {labels}")
        return [m for m in methods if not self.only or m.display in self.only]

    def method_list(self) -> list[Method]:
        """The methods, parsed (the default list when ``--methods`` is empty)."""
        k, m = self.steps, self.maml_steps
        specs = self.methods or (
            "first_order:label=FOMAML",
            "reptile:label=Reptile",
            "implicit_cg:reg=1,maxiter=5,label=iMAML",
            "adjoint:label=A-MAML",
            f"exact:steps={m},label=MAML",
            f"binomial:order=2,steps={m},label=Binomial(2) K={m}",
            f"truncated:order=2,steps={m},label=Truncated(2) K={m}",
            f"binomial:order=2,label=Binomial(2) K={k}",
            f"truncated:order=2,label=Truncated(2) K={k}",
        )
        return parse_methods(specs, k)


def load_tasks(config: CollabFilterConfig) -> tuple[Any, dict[str, Any]]:
    """The tasks of ``config``'s dataset and a description of the data."""
    if config.dataset in SYNTHETIC:
        ratings = generate(SYNTHETIC[config.dataset], config.data_seed)
    else:
        path = config.data or (DEFAULT_DATA if config.dataset == "ml-100k" else "")
        if not path:
            raise FileNotFoundError(f"--dataset {config.dataset} needs --data PATH")
        if not Path(path).is_file() and config.dataset == "ml-100k":
            raise FileNotFoundError(
                f"--data {path}: no such file; get it with "
                "python -m recipes.collab_filter.fetch_ml100k --out data/ml-100k"
            )
        ratings = load_ratings(path, config.format)
    info = {"source": ratings.source, **stats(ratings)}
    if config.dataset not in SYNTHETIC:
        info["sha256"] = hashlib.sha256(Path(ratings.source).read_bytes()).hexdigest()
    return build_tasks(ratings, config.items, config.min_ratings), info


def check_same_data(out: Path, data: dict[str, Any], resume: bool) -> None:
    """``--data`` may move between invocations (it is not part of a run's identity), but a
    resumed study must read the same ratings: ``out/data.json`` records what the study
    started with, and a resume with other data is refused.

    Raises:
        CheckpointError: ``--resume`` with ratings that differ from the study's.
    """
    path = out / "data.json"
    if resume and path.is_file():
        before = json.loads(path.read_text(encoding="utf-8"))
        keys = [k for k in before if k != "source"]
        if any(before[k] != data.get(k) for k in keys):
            raise CheckpointError(
                f"{out} was started on other ratings ({before['source']}, "
                f"sha256 {before.get('sha256', '-')}) than --data {data['source']} "
                f"(sha256 {data.get('sha256', '-')}): resume with the same data"
            )
        return
    out.mkdir(parents=True, exist_ok=True)
    write_json(path, data)


def main(
    argv: Sequence[str] | None = None, *, callbacks: Sequence[Callback] = ()
) -> dict[str, Any]:
    """Run the study; returns ``{"methods": {label: {...}}, "ranking": [...], ...}``.

    Raises:
        FileNotFoundError: no ratings file, or ``--resume`` with nothing to resume.
        RatingsFormatError: a malformed line in the ratings file (file and line named).
        ValueError: a corrupted checkpoint, or one written with other settings.
    """
    config = parse_config(CollabFilterConfig, argv, description=__doc__.splitlines()[0])
    with cpu_threads(config.threads):
        return _run(config, callbacks)


def _run(config: CollabFilterConfig, callbacks: Sequence[Callback]) -> dict[str, Any]:
    methods = config.selected()
    tasks, data = load_tasks(config)
    problem = CollabFilterProblem(
        tasks,
        shots=config.shots,
        query=config.query_shots,
        test_tasks=config.test_tasks,
        inner_lr=config.inner_lr,
        eval_steps=config.steps,
        seed=config.seed,
        device=resolve_device(config.device),
        dtype=resolve_dtype(config.dtype),
    )
    counts = problem.counts()
    print(
        f"collab_filter: {data['source']}: {data['ratings']} ratings; {counts['tasks']} tasks "
        f"(users with >= {config.min_ratings} ratings among the {config.items} most-rated "
        f"items): {counts['test_tasks']} meta-test, {counts['train_tasks']} meta-train of which "
        f"{counts['train_tasks_drawable']} have >= {config.shots + config.query_shots} ratings "
        f"(the other {counts['train_tasks_too_small']} are always resampled)",
        flush=True,
    )
    test_steps = sorted(set(config.test_steps) | {config.steps})
    width = problem.scale_width
    setting = f"{config.shots}shot-{config.query_shots}val"

    def evaluate(method: Method, run: RunResult) -> Evaluation:
        rmse = problem.test_curve(run.model, test_steps, run.inner)
        nrmse = rmse / width
        mean, std = nrmse.mean(0).tolist(), nrmse.std(0).tolist()
        at = test_steps.index(config.steps)
        paper = paper_value(config.dataset, setting, config.steps, config.maml_steps, method)
        return Evaluation(
            score=mean[at],
            cells=[
                *(f"{m:.3f} ± {s:.3f}" for m, s in zip(mean, std, strict=True)),
                "-" if paper is None else paper,
            ],
            data={
                "nrmse_mean": mean,
                "nrmse_std": std,
                "rmse_mean": rmse.mean(0).tolist(),
                "nrmse_at_steps": mean[at],
                "nrmse_std_at_steps": std[at],
                "paper": paper,
            },
            csv_rows=[
                {"adapt_steps": k, "nrmse_mean": m, "nrmse_std": d, "rmse_mean": r}
                for k, m, d, r in zip(test_steps, mean, std, rmse.mean(0).tolist(), strict=True)
            ],
            per_task=nrmse[:, at].tolist(),
        )

    title = (
        f"{config.dataset}, {setting}, K = {config.steps} (MAML {config.maml_steps}), "
        f"{config.meta_steps} meta-steps x {config.meta_batch} tasks, outer "
        f"{config.outer_optimizer} {config.outer_lr:g}, inner lr {config.inner_lr:g}; nRMSE = "
        f"RMSE / {width:g} on {config.test_tasks} held-out users (mean ± std) after each "
        f"number of test-time GD steps; ranked after {config.steps}"
    )
    out = Path(config.out_dir)
    check_same_data(out, data, config.resume)
    summary = compare(
        problem,
        methods,
        config,
        out,
        recipe="collab_filter",
        evaluate=evaluate,
        columns=[*(f"{s} steps" for s in test_steps), "paper"],
        title=title,
        curve=("eval/test_nrmse", f"test nRMSE after {config.steps} steps"),
        steps_curve=StepsCurve(test_steps, "nrmse", "nRMSE (mean ± std over users)"),
        header={
            "dataset": config.dataset,
            "setting": setting,
            "steps": config.steps,
            "maml_steps": config.maml_steps,
            "meta_steps": config.meta_steps,
            "test_steps": test_steps,
            "data": data,
            "tasks": counts,
        },
        callbacks=callbacks,
    )
    return summary
