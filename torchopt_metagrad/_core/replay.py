"""One inner step's loss, evaluated once by the inner loop and replayed identically later.

Snapshot rules recompute a step's inner loss in the backward. Two things would make the
recomputation differ from the forward, silently: randomness (dropout draws new masks)
and buffers the loss updates in place (batch norm's running statistics and
``num_batches_tracked`` would be updated a second time, so changing the rule would
change the trained model). :class:`StepLoss` handles both:

* RNG: the default CPU generator's state (and the CUDA device's, for CUDA params) is
  captured before the forward evaluation; if the evaluation drew random numbers, every
  replay runs from that state inside ``torch.random.fork_rng``;
* buffers: the first step of each inner loop is evaluated under :class:`_Watch`, a
  ``TorchDispatchMode`` that notes in-place writes to tensors the loss did not create
  (schema-annotated writes such as ``add_``, and batch norm's running statistics, which
  ``native_batch_norm`` updates without an annotation); if any, every replay runs under
  :class:`_Shield`, which redirects those writes to copies, so the tensors stay exactly
  as the forward left them. Assumption (as for batch norm): the loss does not read back
  what it wrote; the watch checks it within the first step (a written tensor that
  another op reads), and a replay of such a loss raises instead of returning a number
  computed with other values than the forward's. The watch runs on the first step only
  (its Python cost per op is paid once); a loss that starts writing to buffers only at a
  later step is not detected.

A replay that needs either cannot be batched with ``vmap`` (each row would need its own
RNG state); records then loop over the products.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_map

__all__ = ["StepLoss", "evaluate_pure"]


def evaluate_pure(
    fn: Callable[[Tensor, Any, tuple[Tensor, ...]], Tensor], params: Tensor, batch: Any
) -> tuple[Any, bool]:
    """``(fn(params, batch, ()), pure)`` without side effects: random draws are undone and
    in-place writes to outside tensors go to copies; ``pure``: there were neither."""
    cuda = params.device.type == "cuda"
    with torch.random.fork_rng(devices=[params.device] if cuda else []):
        rng = torch.get_rng_state()
        cuda_rng = torch.cuda.get_rng_state(params.device) if cuda else None
        with _Shield() as shield:
            value = fn(params, batch, ())
        drew = not torch.equal(rng, torch.get_rng_state())
        if cuda_rng is not None:
            drew = drew or not torch.equal(cuda_rng, torch.cuda.get_rng_state(params.device))
    return value, not drew and not shield._copies


class StepLoss:
    """``fn(params_flat, batch, meta)``: the inner loss of one step, replayable.

    Attributes:
        fn: the loss as a function of flat params, the batch and the loss's
            meta-parameters (a tuple of tensors, e.g. fixed entries of ``params``).
        batch: this step's batch (any object).
        batchable: ``fn`` is a pure function of its arguments (can run under vmap).
        meta: the meta-parameters ``fn`` gets in the forward (a replay may pass
            detached copies instead, to differentiate them).
    """

    __slots__ = (
        "__weakref__",
        "_cuda_rng",
        "_device",
        "_rng",
        "_versions",
        "batch",
        "batchable",
        "fn",
        "meta",
        "mutates",
        "reads_back",
    )

    def __init__(
        self,
        fn: Callable[[Tensor, Any, tuple[Tensor, ...]], Tensor],
        batch: Any,
        *,
        batchable: bool,
        meta: tuple[Tensor, ...] = (),
    ) -> None:
        self.fn = fn
        self.batch = batch
        self.batchable = batchable
        self.meta = meta
        self.mutates = False
        #: what the loss both updates in place and reads (found by the first step's watch)
        self.reads_back: str | None = None
        self._versions: list[tuple[Tensor, int]] = []
        self._rng: Tensor | None = None
        self._cuda_rng: Tensor | None = None
        self._device: torch.device | None = None

    @property
    def replays_state(self) -> bool:
        """True if a replay restores an RNG state or shields buffers (no vmap then)."""
        return self._rng is not None or self.mutates

    def evaluate(
        self,
        params: Tensor,
        *,
        record: bool,
        watch: bool,
        meta: tuple[Tensor, ...] | None = None,
    ) -> Tensor:
        """The forward evaluation; with ``record``, note what a replay must restore.

        Args:
            params: flat params (a leaf, or the unrolled graph's node).
            record: capture the RNG state (and detect writes with ``watch``).
            watch: run under the write detector (the first step of a loop).
            meta: stand-ins for :attr:`meta` (leaf copies, so that a walk of this
                evaluation's graph tells their use apart from a closed-over use).
        """
        meta = self.meta if meta is None else meta
        if not record:
            return self.fn(params, self.batch, meta)
        device = params.device
        cuda = device.type == "cuda"
        rng = torch.get_rng_state()
        cuda_rng = torch.cuda.get_rng_state(device) if cuda else None
        if watch:
            with _Watch() as w:
                loss = self.fn(params, self.batch, meta)
            self.mutates = w.found
            self.reads_back = w.read_back()
        else:
            loss = self.fn(params, self.batch, meta)
        self._versions = [(t, t._version) for t in tree_leaves(self.batch) if isinstance(t, Tensor)]
        drew = not torch.equal(rng, torch.get_rng_state())
        if cuda and cuda_rng is not None:
            drew = drew or not torch.equal(cuda_rng, torch.cuda.get_rng_state(device))
        if drew:
            self._rng, self._cuda_rng, self._device = rng, cuda_rng, device
        return loss

    def __call__(self, params: Tensor, meta: tuple[Tensor, ...] | None = None) -> Tensor:
        """Replay at ``params`` (with ``meta`` for :attr:`meta`): same random draws,
        buffers untouched."""
        with self.replaying():
            return self.fn(params, self.batch, self.meta if meta is None else meta)

    def check_unchanged(self) -> None:
        """Raise if a tensor of the batch was modified in place since the forward."""
        for t, version in self._versions:
            if t._version != version:
                raise RuntimeError(
                    f"a tensor of this step's batch (shape {tuple(t.shape)}) was modified in "
                    "place after the inner loop ran; the rule would recompute the step with "
                    "the new values. Modify a copy, or run the outer backward first"
                )

    def check_replayable(self) -> None:
        """Raise if a replay could not give the forward's value: the loss reads back what it
        updates in place, or a tensor of the batch was modified in place since."""
        if self.reads_back is not None:
            raise self.read_back_error()
        self.check_unchanged()

    def read_back_error(self) -> RuntimeError:
        """The error for a loss that updates a tensor in place and also reads it."""
        return RuntimeError(
            f"the inner loss updates {self.reads_back} in place and also reads it (a "
            "running statistic used in its output, e.g. an EMA-normalization layer in "
            "training mode), so a rule that recomputes a step cannot see what the forward "
            "saw and would return a wrong meta-gradient (and autograd refuses a value it "
            "saved that was changed in place since). Make the update out of place, keep "
            "the statistic fixed during the inner loop (eval mode), or, if the loss writes "
            "it before it reads it, use tmg.FirstOrder(), which recomputes nothing"
        )

    @contextlib.contextmanager
    def replaying(self) -> Iterator[None]:
        """Context of a replay (RNG state restored, in-place writes shielded)."""
        self.check_replayable()
        with contextlib.ExitStack() as stack:
            if self._rng is not None:
                cuda = self._cuda_rng is not None
                stack.enter_context(torch.random.fork_rng(devices=[self._device] if cuda else []))
                torch.set_rng_state(self._rng)
                if cuda:
                    torch.cuda.set_rng_state(self._cuda_rng, self._device)  # type: ignore[arg-type]
            if self.mutates:
                stack.enter_context(_Shield())
            yield


def _written(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[tuple[int, str]]:
    """``(position, name)`` of the arguments ``func`` writes in place."""
    schema = func._schema
    out = []
    training = False
    for i, a in enumerate(schema.arguments):
        value = args[i] if i < len(args) else kwargs.get(a.name)
        if a.name == "training" and value is True:
            training = True
        if a.alias_info is not None and a.alias_info.is_write:
            out.append((i, a.name))
    if training:  # native_batch_norm & co. update running stats without an annotation
        out += [
            (i, a.name)
            for i, a in enumerate(schema.arguments)
            if a.name in ("running_mean", "running_var") and (i, a.name) not in out
        ]
    return out


class _Guard(TorchDispatchMode):
    """Base: tracks storages created inside, finds writes to tensors created outside."""

    def __init__(self) -> None:
        super().__init__()
        self._made: set[int] = set()

    def _external_writes(
        self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> list[tuple[int, str, Tensor]]:
        found = []
        for i, name in _written(func, args, kwargs):
            t = args[i] if i < len(args) else kwargs.get(name)
            if isinstance(t, Tensor) and t.untyped_storage().data_ptr() not in self._made:
                found.append((i, name, t))
        return found

    def _note(self, out: Any) -> Any:
        for o in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(o, Tensor):
                self._made.add(o.untyped_storage().data_ptr())
        return out


class _Watch(_Guard):
    """Runs ops unchanged; ``found`` becomes True at an in-place write to an outside tensor;
    :meth:`read_back` names an outside tensor that is written and also read by another op
    (``.item()`` of an integer tensor excepted: batch norm with ``momentum=None`` reads its
    counter so, for its statistics, not its output)."""

    found = False

    def __init__(self) -> None:
        super().__init__()
        self._writes: dict[int, Tensor] = {}
        self._reads: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        written = self._external_writes(func, args, kwargs)
        if written:
            self.found = True
        mine = {id(t) for _, _, t in written}
        for _, _, t in written:
            self._writes[t.untyped_storage().data_ptr()] = t
        counter = func is torch.ops.aten._local_scalar_dense.default and not (
            args[0].is_floating_point() or args[0].is_complex()
        )
        if not counter:
            for t in tree_leaves((args, kwargs)):
                if isinstance(t, Tensor) and id(t) not in mine:
                    ptr = t.untyped_storage().data_ptr()
                    if ptr not in self._made:
                        self._reads.add(ptr)
        out = self._note(func(*args, **kwargs))
        self._made.difference_update(self._writes)  # an in-place op returns its outside input
        return out

    def read_back(self) -> str | None:
        """A description of a tensor the loss both updates in place and reads, or ``None``."""
        both = [t for ptr, t in self._writes.items() if ptr in self._reads]
        return None if not both else f"a tensor of shape {tuple(both[0].shape)}"


class _Shield(_Guard):
    """Redirects in-place writes to outside tensors to copies (later reads see the copy)."""

    def __init__(self) -> None:
        super().__init__()
        self._copies: dict[int, Tensor] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self._copies:
            swap = self._copies.get
            args = tree_map(lambda t: swap(id(t), t) if isinstance(t, Tensor) else t, args)
            kwargs = tree_map(lambda t: swap(id(t), t) if isinstance(t, Tensor) else t, kwargs)
        for i, name, t in self._external_writes(func, args, kwargs):
            copy = t.clone()
            self._copies[id(t)] = copy
            if i < len(args):
                args = (*args[:i], copy, *args[i + 1 :])
            else:
                kwargs = {**kwargs, name: copy}
        return self._note(func(*args, **kwargs))
