"""Where a module's adapted tensors live, and a closure as a replayable inner loss.

:class:`Slots` reads and writes the adapted tensors of a module (a parameter shared
under several names is one tensor, written at every place). :func:`closure_loss`
turns a user's ``closure() -> loss`` into the core's replayable
:class:`~torchopt_metagrad._core.replay.StepLoss`: evaluated at flat parameters by
putting them in the module, with the train/eval flags of the step restored. The core
adds what every replay does (same RNG state; buffers the loss updates in place left as
the forward left them). So the engine reaches the module only through the record.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from torch import Tensor, nn

from torchopt_metagrad._core.flat import FlatSpec
from torchopt_metagrad._core.replay import StepLoss

__all__ = ["Slots", "closure_loss", "is_replaying"]

_thread = threading.local()


def is_replaying() -> bool:
    """True while a recorded closure is being re-run (inside a backward)."""
    return getattr(_thread, "depth", 0) > 0


class Slots:
    """Where each adapted tensor lives in a module.

    Only parameters that require grad (and, with ``include``, whose name is in it) are
    adapted; the others are left alone.
    """

    def __init__(self, module: nn.Module, include: frozenset[str] | None = None) -> None:
        self.modules = tuple(m for _, m in module.named_modules())
        groups: dict[int, list[tuple[nn.Module, str, str]]] = {}
        tensors: dict[int, Tensor] = {}
        for prefix, sub in module.named_modules():
            for attr, t in sub._parameters.items():
                if t is None or not t.requires_grad:
                    continue
                qual = f"{prefix}.{attr}" if prefix else attr
                groups.setdefault(id(t), []).append((sub, attr, qual))
                tensors[id(t)] = t
        if include is not None:
            groups = {k: v for k, v in groups.items() if any(q in include for *_, q in v)}
        self.locations = tuple(tuple(v) for v in groups.values())
        self.names = tuple(v[0][2] for v in self.locations)
        first: Tensor | None = None
        for key, name in zip(groups, self.names, strict=True):
            t = tensors[key]
            if not t.is_floating_point():
                raise TypeError(f"module parameter {name!r} must be floating point, got {t.dtype}")
            if first is None:
                first = t
            elif (t.dtype, t.device) != (first.dtype, first.device):
                raise ValueError(
                    f"module parameter {name!r} is {t.dtype} on {t.device} but "
                    f"{self.names[0]!r} is {first.dtype} on {first.device}; all adapted "
                    "parameters must share dtype and device"
                )

    def __len__(self) -> int:
        return len(self.locations)

    def read(self) -> list[Tensor]:
        """The tensors now at the first location of each adapted parameter."""
        return [locs[0][0]._parameters[locs[0][1]] for locs in self.locations]  # type: ignore[misc]

    def write(self, tensors: Sequence[Tensor]) -> None:
        """Put ``tensors`` at every location (like ``torchopt.MetaOptimizer``)."""
        for locs, t in zip(self.locations, tensors, strict=True):
            for module, attr, _ in locs:
                module._parameters[attr] = t  # type: ignore[assignment]

    @contextlib.contextmanager
    def replaced(self, tensors: Sequence[Tensor]) -> Iterator[None]:
        """Temporarily put ``tensors`` in the module (restores what was there)."""
        old = [[m._parameters[a] for m, a, _ in locs] for locs in self.locations]
        try:
            self.write(tensors)
            yield
        finally:
            for locs, olds in zip(self.locations, old, strict=True):
                for (module, attr, _), t in zip(locs, olds, strict=True):
                    module._parameters[attr] = t

    def status(self, current: Sequence[Tensor], theta: Sequence[Tensor]) -> str:
        """``"continue"`` (the module holds ``current``), ``"restored"`` (``theta``) or
        ``"replaced"``."""
        same = fresh = True
        for i, locs in enumerate(self.locations):
            for module, attr, _ in locs:
                t = module._parameters.get(attr)
                same = same and t is current[i]
                fresh = fresh and t is theta[i]
        if same:
            return "continue"
        return "restored" if fresh else "replaced"

    def first_replaced(self, current: Sequence[Tensor]) -> str | None:
        """The name of a location that does not hold ``current``."""
        for i, locs in enumerate(self.locations):
            for module, attr, qual in locs:
                if module._parameters.get(attr) is not current[i]:
                    return qual
        return None


def closure_loss(closure: Callable[[], Any], slots: Slots, spec: FlatSpec) -> StepLoss:
    """The closure's loss as a function of flat params, with this step's train/eval flags."""
    modes = tuple(m.training for m in slots.modules)
    calls = 0

    def fn(params: Tensor, batch: Any, meta: tuple[Tensor, ...]) -> Tensor:
        nonlocal calls
        calls += 1
        replay = calls > 1  # the first call is the forward evaluation
        flags = [m.training for m in slots.modules]
        _thread.depth = getattr(_thread, "depth", 0) + replay
        try:
            for m, flag in zip(slots.modules, modes, strict=True):
                m.training = flag
            with slots.replaced(spec.split(params)):
                return closure()
        finally:
            _thread.depth -= replay
            for m, flag in zip(slots.modules, flags, strict=True):
                m.training = flag

    return StepLoss(fn, None, batchable=False)
