"""Few-shot image classification with any meta-gradient rule (BinomMAML's table).

    python -m recipes.fewshot --quick                       # glyphs, 5 methods, CPU minutes
    python -m recipes.fewshot --dataset omniglot --root DATA/omniglot --ways 5 --shots 1
    python -m recipes.fewshot --dataset miniimagenet --root DATA/mini --shots 5 --device cuda
    python -m recipes.fewshot --dataset hf --hub NAME       # a Hugging Face dataset
    python -m recipes.fewshot --methods exact binomial:order=2 first_order --meta-steps 2000
    python -m recipes.fewshot ... --resume                  # continue an interrupted study

Every method meta-trains the same initialization on the same stream of meta-train
episodes through the shared runner (one folder, checkpoint and ``metrics.jsonl`` per
method, the query accuracy logged beside the loss, the meta-val accuracy every
``--eval-every`` meta-steps); then each is adapted to ``--test-tasks`` fixed meta-test
episodes (``--test-steps`` steps) and ranked by mean query accuracy, reported with its
95% confidence interval, beside the untrained initialization adapted the same way.
Defaults follow the BinomMAML paper's protocol (MAML's): 5-way, K = 5 inner steps, 15
query images per class, meta-batch 4, Adam 1e-3, 10 test-time steps, 600 test tasks,
20,000 meta-steps; inner lr 0.4 on 28x28 sets and 0.01 on 84x84 ones; 64 conv channels,
32 on 84x84 images.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

from recipes.common.compare import Evaluation, compare, parse_methods
from recipes.common.config import option, parse_config, vmap_tasks_option
from recipes.common.env import cpu_threads, resolve_device, resolve_dtype, seed_everything
from recipes.common.inner import InnerConfig, InnerParams, inner_options
from recipes.common.methods import Method
from recipes.common.runner import Callback, RunResult
from recipes.fewshot.datasets import DATASETS, DataSpec, load_splits
from recipes.fewshot.models import MODELS
from recipes.fewshot.problem import FewshotProblem, mean_ci95

__all__ = ["PAPER_METHODS", "FewshotConfig", "main"]

#: The BinomMAML paper's rows.
PAPER_METHODS = (
    "first_order:label=FOMAML",
    "truncated:order=2,label=TruncMAML(2)",
    "binomial:order=2,label=BinomMAML(2)",
    "implicit_cg:reg=2,maxiter=5,label=iMAML",
    "exact:label=MAML",
)
#: Per dataset: the inner lr and the conv width when not given.
DEFAULTS = {
    "glyphs": (0.4, 64),
    "omniglot": (0.4, 64),
    "fashion-mnist": (0.4, 64),
    "miniimagenet": (0.01, 32),
    "tieredimagenet": (0.01, 32),
    "hf": (0.01, 32),
}


@dataclasses.dataclass(frozen=True)
class FewshotConfig(InnerConfig):
    """Options of the few-shot recipe (the paper's protocol by default)."""

    RECIPE: ClassVar[str] = "fewshot"
    QUICK: ClassVar[dict[str, Any]] = {
        "dataset": "glyphs",
        "hidden": 32,
        "query": 5,
        "meta_steps": 50,
        "eval_every": 25,
        "checkpoint_every": 25,
        "val_tasks": 20,
        "test_tasks": 100,
    }

    dataset: str = option("glyphs", "the data", choices=tuple(DATASETS))
    root: str = option("", "the dataset's folder (see --help's layouts)", volatile=True)
    hub: str = option("", "--dataset hf: a Hugging Face hub dataset name", volatile=True)
    cache_dir: str = option(
        "", "cache of generated/decoded data ($RECIPES_CACHE, ~/.cache/tmg-recipes)", volatile=True
    )
    image_column: str = option("", "--dataset hf: the image column (first Image feature)")
    label_column: str = option("label", "--dataset hf: the label column")
    image_size: int = option(0, "image side (0: the dataset's: 28, or 84 for ImageNet sets)")
    ways: int = option(5, "classes per episode (N)")
    shots: int = option(1, "support images per class (K-shot)")
    query: int = option(15, "query images per class")
    model: str = option("conv4", "network", choices=MODELS)
    hidden: int = option(0, "conv channels (0: 64, or 32 for 84x84 sets, as MAML)")
    methods: tuple[str, ...] = option(
        (), "methods to compare, name[:key=value,...] (empty: the paper's five)"
    )
    inner_lr: float = option(0.0, "inner step size (0: 0.4 for 28x28 sets, 0.01 for 84x84)")
    meta_steps: int = option(
        20000, "meta-steps per method (the paper stops at 20,000)", volatile=True
    )
    meta_batch: int = option(4, "tasks per meta-batch")
    eval_every: int = option(500, "meta-val accuracy every this many meta-steps")
    checkpoint_every: int = option(500, "checkpoint every this many meta-steps", volatile=True)
    val_tasks: int = option(100, "fixed meta-val episodes of the periodic validation", minimum=1)
    test_tasks: int = option(600, "fixed meta-test episodes of the final test")
    test_steps: int = option(10, "adaptation steps at meta-val / meta-test time")
    eval_chunk: int = option(25, "episodes adapted together in evaluation", volatile=True)
    vmap_tasks: bool = vmap_tasks_option(
        False, "evaluation's episodes too; 1.4-8x slower than the loop for conv4 on a 2-core CPU"
    )

    def __post_init__(self) -> None:
        lr, hidden = DEFAULTS.get(self.dataset, (0.01, 32))
        if self.inner_lr == 0:
            object.__setattr__(self, "inner_lr", lr)
        if self.hidden == 0:
            object.__setattr__(self, "hidden", hidden)
        super().__post_init__()
        for name in ("ways", "shots", "query", "test_tasks", "eval_chunk"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
        self.method_list()  # bad --methods: an argparse error

    def method_list(self) -> list[Method]:
        """The methods, parsed (the paper's five when ``--methods`` is empty)."""
        return parse_methods(self.methods or PAPER_METHODS, self.steps)


def main(
    argv: Sequence[str] | None = None, *, callbacks: Sequence[Callback] = ()
) -> dict[str, Any]:
    """Run the comparison; returns ``{"methods": {label: {...}}, "ranking": [...],
    "untrained": {...}, ...}``.

    Raises:
        FileNotFoundError: the dataset is missing (the message gives its layout), or
            ``--resume`` with nothing to resume.
        ValueError: a corrupted checkpoint, or one written with other settings.
    """
    config = parse_config(FewshotConfig, argv, description=__doc__.splitlines()[0])
    with cpu_threads(config.threads):
        return run(config, callbacks)


def run(config: FewshotConfig, callbacks: Sequence[Callback] = ()) -> dict[str, Any]:
    """:func:`main` for a config already built."""
    spec = DataSpec(
        root=config.root,
        hub=config.hub,
        cache=config.cache_dir,
        image_size=config.image_size,
        image_column=config.image_column,
        label_column=config.label_column,
    )
    splits = load_splits(config.dataset, spec)
    problem = FewshotProblem(
        splits,
        model=config.model,
        hidden=config.hidden,
        ways=config.ways,
        shots=config.shots,
        query=config.query,
        eval_steps=config.test_steps,
        test_steps=config.test_steps,
        val_tasks=config.val_tasks,
        test_tasks=config.test_tasks,
        chunk=config.eval_chunk,
        seed=config.seed,
        device=resolve_device(config.device),
        dtype=resolve_dtype(config.dtype),
        vectorize=config.vmap_tasks,
    )
    steps = [0, config.test_steps]

    def test(model: Any, inner: InnerParams) -> dict[str, Any]:
        acc = problem.accuracies(model, inner, "test", steps)
        (m0, ci0), (m, ci) = mean_ci95(acc[:, 0]), mean_ci95(acc[:, 1])
        return {"test_accuracy": m, "test_ci95": ci, "test_accuracy_0": m0, "test_ci95_0": ci0,
                "per_task": acc[:, 1].tolist()}  # fmt: skip

    def evaluate(method: Method, run: RunResult) -> Evaluation:
        found = test(run.model, run.inner)
        per_task = found.pop("per_task")
        return Evaluation(
            score=found["test_accuracy"],
            cells=[_pct(found["test_accuracy"], found["test_ci95"])],
            data=found,
            csv_rows=[found],
            per_task=per_task,
        )

    seed_everything(config.seed)  # the initialization every method starts from
    init = problem.make_model().to(device=problem.device, dtype=problem.dtype)
    _, anil, optimizer = inner_options(config)
    untrained = test(init, InnerParams.build(init, learn_lr="off", anil=anil, steps=config.steps,
                                             lr=config.inner_lr, optimizer=optimizer))  # fmt: skip
    untrained.pop("per_task")
    title = (
        f"{config.dataset} {config.ways}-way {config.shots}-shot, {config.model}-{config.hidden}, "
        f"K={config.steps} inner steps at lr {config.inner_lr:g}, {config.meta_steps} meta-steps x "
        f"{config.meta_batch} tasks, outer {config.outer_optimizer} {config.outer_lr:g}; "
        f"query accuracy on {config.test_tasks} meta-test tasks after {config.test_steps} steps"
    )
    out = Path(config.out_dir)
    summary = compare(
        problem,
        config.method_list(),
        config,
        out,
        recipe="fewshot",
        evaluate=evaluate,
        columns=[f"accuracy % (95% CI), {config.test_steps} steps"],
        title=title,
        higher_is_better=True,
        curve=("eval/val_accuracy", f"meta-val accuracy after {config.test_steps} steps"),
        header={"dataset": config.dataset, "untrained": untrained},
        callbacks=callbacks,
    )
    print(
        f"untrained initialization, same tasks and adaptation: "
        f"{_pct(untrained['test_accuracy'], untrained['test_ci95'])} %",
        flush=True,
    )
    return summary


def _pct(mean: float, ci: float) -> str:
    return f"{100 * mean:.2f} ± {100 * ci:.2f}"
