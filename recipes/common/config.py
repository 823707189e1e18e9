"""Config dataclasses become the command line.

Every recipe declares one frozen dataclass (a subclass of :class:`RunConfig`, or of
:class:`TrainConfig` when it meta-trains) whose fields are its options and whose
defaults are the paper's values. :func:`parse_config` turns the fields into
``argparse`` options (``snake_case`` field -> ``--kebab-case`` option; ``bool`` fields
get ``--x/--no-x``; ``tuple`` fields take several values), applies the class's
``QUICK`` preset when ``--quick`` is given (explicit options still win), and, when the
class has a ``rule`` field, adds one option per knob of the registered rules (read from
the rule dataclasses, so no rule is named here) and folds them into the rule spec:
``--rule binomial --order 2`` is the spec ``binomial:order=2``.

Field metadata (through :func:`option`): ``help``, ``choices``, and ``volatile=True``
for options that do not change the numbers a run produces (where to write, progress
bars, how far to run this time): a checkpoint is resumable only by a config equal to
its own in every other field.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing
from collections.abc import Sequence
from typing import Any, ClassVar, TypeVar, get_args, get_origin, get_type_hints

from recipes.common.env import resolve_device, resolve_dtype
from recipes.common.methods import knob_options, parse_method
from recipes.common.parallel import quiet_other_ranks

__all__ = [
    "RunConfig",
    "TrainConfig",
    "config_dict",
    "option",
    "parse_config",
    "stable_fields",
]

C = TypeVar("C", bound="RunConfig")
DEVICES = ("auto", "cpu", "cuda")
OUTER_OPTIMIZERS = ("adam", "sgd")
OUTER_SCHEDULES = ("constant", "cosine", "step")


def option(
    default: Any,
    help: str,
    *,
    choices: Sequence[Any] | None = None,
    volatile: bool = False,
    minimum: int | None = None,
) -> Any:
    """A config field with its command-line help (and choices, volatility, the smallest
    value a count may take: ``minimum=1`` for a number of tasks, shots, steps...)."""
    meta = {
        "help": help,
        "choices": tuple(choices) if choices else None,
        "volatile": volatile,
        "minimum": minimum,
    }
    return dataclasses.field(default=default, metadata=meta)


def vmap_tasks_option(default: bool, note: str = "") -> Any:
    """The ``--vmap-tasks`` option with a recipe's default (and a note on its speed)."""
    return option(
        default,
        "run a meta-batch's tasks together under torch.func.vmap (the same meta-gradient up "
        "to float round-off; methods that cannot, reptile and flow=, run the loop)"
        + (f"; {note}" if note else ""),
    )


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Options every recipe has: seeding, device, where to write, how to report."""

    #: Overrides applied by ``--quick`` (field name -> value); explicit options still win.
    QUICK: ClassVar[dict[str, Any]] = {}
    #: The recipe's name, used for the default output folder ``runs/<recipe>/<name>``.
    RECIPE: ClassVar[str] = "recipe"

    seed: int = option(0, "seed of the model initialization and of the task sampler")
    device: str = option("auto", "where to run (auto: cuda if available)", choices=DEVICES)
    dtype: str = option("float32", "floating-point type", choices=("float32", "float64"))
    threads: int = option(
        1,
        "torch CPU threads (0: torch's default); numbers are bit-identical only for equal threads",
        volatile=True,
    )
    name: str = option("default", "run name: outputs go to runs/<recipe>/<name>", volatile=True)
    out: str = option("", "output folder (overrides runs/<recipe>/<name>)", volatile=True)
    quick: bool = option(False, "the quick preset (< 3 min on a 2-core CPU)", volatile=True)
    progress: bool = option(True, "show tqdm progress bars (on stderr)", volatile=True)
    plots: bool = option(True, "write PNG plots with matplotlib", volatile=True)

    def __post_init__(self) -> None:
        resolve_device(self.device)  # --device cuda without CUDA: a clear error at parse time
        resolve_dtype(self.dtype)
        for f in dataclasses.fields(self):
            value, flag = getattr(self, f.name), "--" + f.name.replace("_", "-")
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"{flag} must be a finite number, got {value}")
            if isinstance(value, int) and not isinstance(value, bool):
                least = f.metadata.get("minimum") or 0
                if value < least:
                    raise ValueError(f"{flag} must be >= {least}, got {value}")

    @property
    def out_dir(self) -> str:
        """The output folder."""
        return self.out or f"runs/{self.RECIPE}/{self.name}"


@dataclasses.dataclass(frozen=True)
class TrainConfig(RunConfig):
    """Options of the shared meta-training loop (:func:`recipes.common.runner.train`)."""

    meta_steps: int = option(1000, "outer (meta) steps; a resumed run may extend it", volatile=True)
    meta_batch: int = option(5, "tasks per meta-batch")
    outer_lr: float = option(1e-3, "learning rate of the outer optimizer")
    outer_optimizer: str = option("adam", "outer optimizer", choices=OUTER_OPTIMIZERS)
    outer_momentum: float = option(0.0, "momentum of --outer-optimizer sgd")
    outer_schedule: str = option(
        "constant",
        "outer lr schedule: constant; cosine (from --outer-lr to 0 at meta-step "
        "--outer-decay-steps, then 0); step (times --outer-gamma every --outer-decay-steps)",
        choices=OUTER_SCHEDULES,
    )
    outer_decay_steps: int = option(0, "meta-steps of the cosine / step schedule")
    outer_gamma: float = option(0.5, "factor of the step schedule")
    vmap_tasks: bool = vmap_tasks_option(False)
    inner_lr: float = option(0.01, "inner gradient-descent step size")
    steps: int = option(5, "inner steps K during meta-training", minimum=1)
    eval_every: int = option(100, "evaluate every this many meta-steps (0: only at the end)")
    checkpoint_every: int = option(
        100, "write a checkpoint every this many meta-steps (and at the end)", volatile=True
    )
    stop_after: int = option(
        0,
        "stop gracefully after this many meta-steps in this invocation, as if SIGTERM came "
        "(0: run to the end)",
        volatile=True,
    )
    resume: bool = option(
        False,
        "continue from the run's checkpoint (same numbers as an uninterrupted run)",
        volatile=True,
    )
    dist_timeout: float = option(
        600.0,
        "under torchrun: seconds a rank waits in a collective for the others before the job "
        "stops with an error naming it",
        volatile=True,
    )
    overwrite: bool = option(
        False,
        "start afresh in an output folder that already holds a run (its checkpoint and "
        "metrics are replaced); without it such a folder is refused",
        volatile=True,
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("meta_batch", "meta_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
        if not self.outer_lr > 0 or not self.inner_lr > 0:
            raise ValueError("--outer-lr and --inner-lr must be > 0")
        if self.outer_schedule != "constant" and self.outer_decay_steps < 1:
            raise ValueError(
                f"--outer-schedule {self.outer_schedule} needs --outer-decay-steps >= 1"
            )
        if not self.dist_timeout > 0:
            raise ValueError(f"--dist-timeout must be > 0, got {self.dist_timeout}")
        if self.resume and self.overwrite:
            raise ValueError("--resume and --overwrite exclude each other")


def stable_fields(config: RunConfig) -> dict[str, Any]:
    """The fields that determine a run's numbers (everything not marked volatile)."""
    return {
        f.name: _plain(getattr(config, f.name))
        for f in dataclasses.fields(config)
        if not f.metadata.get("volatile", False)
    }


def config_dict(config: RunConfig) -> dict[str, Any]:
    """All fields as plain Python values (JSON- and ``weights_only``-loadable)."""
    return {f.name: _plain(getattr(config, f.name)) for f in dataclasses.fields(config)}


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def parse_config(cls: type[C], argv: Sequence[str] | None, description: str = "") -> C:
    """Build ``cls`` from command-line arguments.

    Precedence: the dataclass defaults, then ``cls.QUICK`` if ``--quick``, then the
    options given explicitly.

    Raises:
        SystemExit: bad options (argparse's usual exit with a message).
    """
    parser = argparse.ArgumentParser(
        prog=f"python -m recipes.{cls.RECIPE}",
        description=description,
        argument_default=argparse.SUPPRESS,
    )
    hints = get_type_hints(cls)
    names = set()
    for f in dataclasses.fields(cls):
        names.add(f.name)
        _add_field(parser, f, hints[f.name])
    knob_types: dict[str, Any] = {}
    if "rule" in names:
        group = parser.add_argument_group(
            "rule knobs", "passed to the rule given by --rule (its dataclass fields)"
        )
        for knob, (tp, owners) in knob_options().items():
            if knob in names:
                raise RuntimeError(f"config field {knob!r} collides with a rule knob")
            knob_types[knob] = tp
            group.add_argument(
                "--" + knob.replace("_", "-"),
                dest=f"knob__{knob}",
                metavar=_metavar(tp),
                help=f"knob of {', '.join(owners)}",
            )
    args = vars(parser.parse_args(list(argv) if argv is not None else None))
    values: dict[str, Any] = {}
    if args.get("quick", False):
        unknown = set(cls.QUICK) - names
        if unknown:
            raise RuntimeError(f"{cls.__name__}.QUICK names unknown fields {sorted(unknown)}")
        values.update(cls.QUICK)
    knobs = {k[len("knob__") :]: v for k, v in args.items() if k.startswith("knob__")}
    values.update({k: v for k, v in args.items() if not k.startswith("knob__")})
    if "rule" in names:
        rule = values.get("rule", getattr(cls, "rule", ""))
        if knobs:
            sep = "," if ":" in rule else ":"
            rule = rule + sep + ",".join(f"{k}={v}" for k, v in knobs.items())
        try:
            values["rule"] = parse_method(rule).spec
        except (ValueError, TypeError) as err:
            parser.error(f"--rule: {err}")
    try:
        config = cls(**values)
    except (ValueError, TypeError) as err:
        parser.error(str(err))
    quiet_other_ranks()  # under torchrun, only rank 0 prints
    return config


def _add_field(parser: argparse.ArgumentParser, f: dataclasses.Field[Any], tp: Any) -> None:
    flag = "--" + f.name.replace("_", "-")
    help_ = f.metadata.get("help", "") + f" (default: {_shown(f.default)})"
    choices = f.metadata.get("choices")
    if tp is bool:
        parser.add_argument(flag, action=argparse.BooleanOptionalAction, help=help_)
        return
    if get_origin(tp) is tuple:
        (item, *_) = get_args(tp)
        parser.add_argument(
            flag,
            nargs="*",
            type=_converter(item),
            choices=choices,
            help=help_,
            metavar=_metavar(item),
            action=_TupleAction,
        )
        return
    metavar = None if choices else _metavar(tp)
    parser.add_argument(flag, type=_converter(tp), choices=choices, help=help_, metavar=metavar)


class _TupleAction(argparse.Action):
    def __call__(self, parser: Any, namespace: Any, values: Any, option_string: Any = None):
        setattr(namespace, self.dest, tuple(values))


def _shown(value: Any) -> str:
    if isinstance(value, tuple):
        return " ".join(map(str, value)) or "none"
    return str(value).replace("%", "%%")


def _converter(tp: Any) -> Any:
    if get_origin(tp) in (typing.Union, types.UnionType):
        (inner,) = (a for a in get_args(tp) if a is not type(None))
        base = _converter(inner)

        def optional(text: str) -> Any:
            return None if text.lower() == "none" else base(text)

        return optional
    return tp


def _metavar(tp: Any) -> str:
    name = getattr(tp, "__name__", None) or str(tp)
    if get_origin(tp) in (typing.Union, types.UnionType):
        name = "|".join(getattr(a, "__name__", str(a)) for a in get_args(tp))
    return name.upper().replace("NONETYPE", "NONE")
