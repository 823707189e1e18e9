"""The one meta-training loop every recipe uses.

A recipe supplies a :class:`MetaProblem` (model, functional loss, task sampler,
evaluation) and a :class:`~recipes.common.methods.Method`; :func:`train` does the
rest: seeding, device, the outer Adam loop over meta-batches, metrics as JSON lines,
periodic evaluation, atomic checkpoints, ``--resume``, and a graceful stop on
SIGTERM / Ctrl-C / ``--stop-after``. The inner loop's other meta-parameters (a learned
step size, ANIL's adapt list; :mod:`recipes.common.inner`) come from the config when it
is an :class:`~recipes.common.inner.InnerConfig`: the learned rates join the network in
the outer optimizer, in every ``tmg.adapt`` call, in the checkpoints and in evaluation.

Tasks: task ``i`` of the global meta-batch of meta-step ``s`` is drawn by
``problem.sample_tasks(generator, 1)`` from a generator seeded with
``tmg.distributed.task_seed(seed, s, i)``. The meta-batch is a function of ``(seed, s)``
alone, not of a stream carried from step to step or of the number of processes: under
``torchrun`` (:mod:`recipes.common.parallel`) each rank draws only its own indices, the
union is the single-process meta-batch, and a checkpoint resumes on any number of ranks.
(Before this, one generator drew every meta-batch in turn; runs from then are refused by
the checkpoint format.) Tasks within a meta-batch are independent draws.

Resume gives bit-identical numbers on CPU in one process: the checkpoint holds the model,
the learned rates, Adam's state, the Python and torch random states, the step counter and
the records so far; evaluation uses generators of its own, so nothing else advances a
random stream. Across world sizes the numbers agree to float round-off (the ranks' shares
of the meta-gradient are summed in another order).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree

import torchopt_metagrad as tmg
from recipes.common.checkpoint import CheckpointError, save_checkpoint
from recipes.common.config import TrainConfig
from recipes.common.env import (
    get_rng_state,
    resolve_device,
    resolve_dtype,
    seed_everything,
)
from recipes.common.inner import InnerParams, check_method, inner_options
from recipes.common.interrupt import StopFlag, graceful_stop
from recipes.common.methods import Method, MetricFn, batched_direction, task_direction
from recipes.common.metrics import MetricsLog, remove_stale_temporaries
from recipes.common.outer import make_optimizer, outer_lr_at, set_outer_lr
from recipes.common.parallel import (
    gather_stats,
    is_writer,
    join,
    on_rank0,
    rank_context,
    reduce_meta_gradients,
)
from recipes.common.progress import progress_bar
from recipes.common.resume import RunExistsError, check_start, restore
from recipes.common.resume import identity as run_identity
from torchopt_metagrad.distributed import RankInfo

__all__ = ["Callback", "MetaProblem", "RunExistsError", "RunResult", "check_start", "train"]

LossFn = Callable[[dict[str, Tensor], Any], Tensor]
Task = tuple[Any, Any]


class MetaProblem(Protocol):
    """What a recipe defines: tasks, model, loss and evaluation (no training loop)."""

    def make_model(self) -> nn.Module:
        """A freshly initialized network (called right after seeding)."""
        ...

    def loss_fn(self, model: nn.Module) -> LossFn:
        """``loss(params, batch) -> scalar`` for ``model`` with the given params."""
        ...

    def sample_tasks(self, generator: torch.Generator, n: int) -> list[Task]:
        """``n`` training tasks ``(support, query)``, drawn with ``generator`` only."""
        ...

    def evaluate(self, model: nn.Module, inner: InnerParams) -> dict[str, float]:
        """Periodic evaluation of the current initialization (deterministic), adapting
        with ``inner``'s step size and adapt list."""
        ...


def metric_fn_of(problem: MetaProblem, model: nn.Module) -> MetricFn | None:
    """The problem's outer metrics beside the loss, if it defines any: an optional
    ``metric_fn(model) -> metrics(params, batch) -> {name: 0-dim tensor}`` (e.g. the
    query accuracy), logged as ``train/<name>`` with the query loss."""
    factory = getattr(problem, "metric_fn", None)
    return factory(model) if factory is not None else None


#: Called after every meta-step with ``(step, record, stop)``; may request a stop.
Callback = Callable[[int, dict[str, Any], StopFlag], None]


@dataclass
class RunResult:
    """How a training run ended.

    Attributes:
        model: the network with the final (or last finished) meta-parameters.
        inner: the inner loop's step size (learned rates at their final values) and
            adapt list, as evaluation should use them.
        step: meta-steps done.
        completed: all ``meta_steps`` are done.
        interrupted: stopped early by a signal or ``--stop-after`` (resumable).
        records: every metrics record, as in the JSON-lines file.
        wall_time_s: seconds spent in this invocation.
        run_dir: where the checkpoint and metrics are.
    """

    model: nn.Module
    inner: InnerParams
    step: int
    completed: bool
    interrupted: bool
    records: list[dict[str, Any]] = field(default_factory=list)
    wall_time_s: float = 0.0
    run_dir: Path = Path()


def train(
    problem: MetaProblem,
    method: Method,
    config: TrainConfig,
    run_dir: str | Path,
    *,
    recipe: str,
    callbacks: Sequence[Callback] = (),
    desc: str = "",
) -> RunResult:
    """Meta-train ``problem``'s model with ``method``; see the module docstring.

    Checkpoints go to ``run_dir/checkpoint.pt``, metrics to ``run_dir/metrics.jsonl``
    (one record per meta-step: ``step``, ``train/query_loss``, rule diagnostics, and
    ``eval/...`` entries every ``eval_every`` steps).

    Raises:
        FileNotFoundError: ``config.resume`` but no checkpoint in ``run_dir``.
        CheckpointError: (a ``ValueError``) the checkpoint is corrupted, or was written
            by a run with other settings (the message lists the differences).
    """
    start_time = time.perf_counter()
    run_dir = Path(run_dir)
    ckpt_path = run_dir / "checkpoint.pt"
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype)
    info = join(device, config.dist_timeout)
    tmg.distributed.share(config.meta_batch, info)  # every rank needs a task: a clear error
    steps = method.steps or config.steps
    learn_lr, anil, inner_opt = inner_options(config)
    check_method(method, learn_lr, anil, steps, inner_opt)
    identity = run_identity(recipe, method, config)

    def start() -> dict[str, Any] | None:
        """Rank 0 decides: refuse an existing run, or read the checkpoint to resume."""
        state = check_start(recipe, method, config, run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(run_dir)
        if config.overwrite:
            ckpt_path.unlink(missing_ok=True)
        return state

    state = on_rank0(info, start)
    seed_everything(config.seed)
    model = problem.make_model().to(device=device, dtype=dtype)
    inner = InnerParams.build(
        model, learn_lr=learn_lr, anil=anil, steps=steps, lr=config.inner_lr, optimizer=inner_opt
    )
    meta_params = [*model.parameters(), *inner.parameters()]
    optimizer = make_optimizer(config, meta_params)
    step, records = 0, []
    if state is not None:
        restore(state, model, inner, optimizer, ckpt_path)
        step, records = int(state["step"]), list(state["records"])
        if step > config.meta_steps:
            raise CheckpointError(
                f"checkpoint {ckpt_path} is at meta-step {step}, past --meta-steps "
                f"{config.meta_steps}"
            )
        _say(f"{recipe}: {desc or method.display}: resumed from step {step} ({run_dir})")
    else:
        _say(f"{recipe}: {desc or method.display}: writing to {run_dir}")
    if info.world_size > 1:
        _say(
            f"{recipe}: {info.world_size} processes, meta-batch {config.meta_batch} split "
            f"{[tmg.distributed.share(config.meta_batch, RankInfo(r, info.world_size, r, device)) for r in range(info.world_size)]}"  # noqa: E501
        )

    def checkpoint() -> None:
        if not is_writer():
            return
        save_checkpoint(
            ckpt_path,
            {
                **identity,
                "step": step,
                "model": model.state_dict(),
                "inner": inner.state_dict(),
                "optimizer": optimizer.state_dict(),
                "rng": get_rng_state({}),
                "records": log.records,
            },
        )

    rule = method.build_rule() if method.is_rule else None
    loss_fn = problem.loss_fn(model)
    metric_fn = metric_fn_of(problem, model)
    batched = config.vmap_tasks and method.is_rule and method.flow is None
    first = step
    interrupted = False
    at = [step + 1]  # the meta-step under way, for errors on one rank of many
    log = MetricsLog(run_dir / "metrics.jsonl" if is_writer() else None, records)
    try:
        if state is None:
            checkpoint()  # step 0: there is always a last checkpoint to go back to
        with (
            graceful_stop() as stop,
            progress_bar(
                config.progress, total=config.meta_steps, initial=step, desc=desc or method.display
            ) as bar,
            rank_context(info, lambda: at[0]),
        ):
            while step < config.meta_steps:
                at[0] = step + 1
                tasks = _sample(problem, config, step, info)
                set_outer_lr(optimizer, outer_lr_at(config, step))
                step_start = time.perf_counter()
                sums = _meta_step(
                    model, inner, optimizer, rule, method, loss_fn, tasks, steps, device, dtype,
                    metric_fn=metric_fn, batched=batched, info=info, global_batch=config.meta_batch,
                    step=step + 1,
                )  # fmt: skip
                step += 1
                last = step == config.meta_steps
                if config.stop_after and step - first >= config.stop_after and not last:
                    stop.request("--stop-after")
                means, stopping = gather_stats(info, sums, len(tasks), stop.requested, step)
                if stopping:
                    stop.request("another rank")
                record = {"step": step, **_record(means), **inner.stats()}
                record["step_time_s"] = round(time.perf_counter() - step_start, 4)
                if (config.eval_every and step % config.eval_every == 0) or last:
                    record.update(
                        {f"eval/{k}": v for k, v in problem.evaluate(model, inner).items()}
                    )
                record["elapsed_s"] = round(time.perf_counter() - start_time, 3)
                log.append(record)
                bar.update(1)
                bar.set_postfix(loss=f"{record['train/query_loss']:.4g}")
                for callback in callbacks:
                    callback(step, record, stop)
                due = config.checkpoint_every and step % config.checkpoint_every == 0
                if due or last or stop.requested:
                    checkpoint()
                if stop.requested and not last:
                    interrupted = True
                    break
    finally:
        log.close()
    return RunResult(
        model=model,
        inner=inner,
        step=step,
        completed=step >= config.meta_steps,
        interrupted=interrupted,
        records=log.records,
        wall_time_s=time.perf_counter() - start_time,
        run_dir=run_dir,
    )


def _say(text: str) -> None:
    if is_writer():
        print(text, flush=True)


def _sample(problem: MetaProblem, config: TrainConfig, step: int, info: RankInfo) -> list[Task]:
    """This rank's tasks of meta-step ``step``: one generator per global task index."""
    seeds = tmg.distributed.meta_batch_seeds(config.seed, step, config.meta_batch, info)
    return [problem.sample_tasks(torch.Generator().manual_seed(s), 1)[0] for s in seeds]


def _meta_step(
    model: nn.Module,
    inner: InnerParams,
    optimizer: torch.optim.Optimizer,
    rule: Any,
    method: Method,
    loss_fn: LossFn,
    tasks: list[Task],
    steps: int,
    device: torch.device,
    dtype: torch.dtype,
    *,
    metric_fn: MetricFn | None = None,
    batched: bool = False,
    info: RankInfo,
    global_batch: int,
    step: int,
) -> dict[str, float]:
    """One outer step: every task adds ``1/global_batch`` of its direction to ``.grad``, the
    ranks' sums are added (one all-reduce), the outer optimizer steps. ``batched``: this
    rank's tasks at once under ``torch.func.vmap``. Returns ``{name: sum over this rank's
    tasks}`` of the query loss, the metrics and the rule diagnostics."""
    optimizer.zero_grad(set_to_none=False)
    meta_params = [*model.parameters(), *inner.parameters()]
    for p in meta_params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    params = dict(model.named_parameters())
    tasks = [_to(task, device, dtype) for task in tasks]
    kwargs = {"steps": steps, "scale": 1.0 / global_batch, "metric_fn": metric_fn}
    kwargs.update(inner.adapt_kwargs())
    if batched:
        stats = [batched_direction(method, rule, loss_fn, params, tasks, **kwargs)]
        weights = [float(len(tasks))]
    else:
        stats = [task_direction(method, rule, loss_fn, params, t, **kwargs) for t in tasks]
        weights = [1.0] * len(tasks)
    reduce_meta_gradients(info, meta_params, step)
    optimizer.step()
    sums = {"train/query_loss": sum(w * s.query_loss for s, w in zip(stats, weights, strict=True))}
    for name in ("metrics", "extras"):
        keys = dict.fromkeys(k for s in stats for k in getattr(s, name))
        for k in keys:
            total = sum(
                w * getattr(s, name).get(k, 0.0) for s, w in zip(stats, weights, strict=True)
            )
            sums[f"train/{k}" if name == "metrics" else k] = total
    return sums


def _record(means: dict[str, float]) -> dict[str, float]:
    """Query loss first, then the rest in the order the ranks reported them."""
    return {"train/query_loss": means["train/query_loss"], **means}


def _to(tree: Any, device: torch.device, dtype: torch.dtype) -> Any:
    def move(x: Any) -> Any:
        if isinstance(x, Tensor):
            return x.to(device=device, dtype=dtype if x.is_floating_point() else x.dtype)
        return x

    return pytree.tree_map(move, tree)
