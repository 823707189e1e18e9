"""Peak *live tensor storage* measurement.

Peak resident set size (RSS) mixes allocator caching, the Python heap and library
code into one figure, so a 10x difference in the tensors a meta-gradient keeps alive
can disappear in it. :class:`LiveMemoryTracker` instead counts the bytes of tensor
storages that are alive, op by op, and keeps the running maximum.

How it works:
    The tracker pushes a :class:`~torch.utils._python_dispatch.TorchDispatchMode`. For
    every tensor output of every ATen op it finds the untyped storage (unwrapping
    ``torch.func`` batched / grad / functional wrapper tensors first, see
    :func:`unwrap_functorch`), and if that storage is new -- not one of the op's input
    storages and not seen before -- adds ``storage.nbytes()`` to the running total. A
    :func:`weakref.finalize` is attached to the storage's Python object; PyTorch keeps
    that object alive exactly as long as the C++ storage (PyObject preservation), so the
    callback fires when the storage is really freed -- including storages that only the
    autograd graph holds (saved tensors) -- and the bytes are subtracted. A storage that
    grows (``resize_``, ``out=`` ops) is re-measured each time an op returns it.

Limits:
    * Only storages allocated *inside* the ``with`` block are counted. Tensors created
      before entering (model parameters, data, earlier graphs) count zero, and freeing
      them inside the block does not lower the figure; ``current_bytes`` and
      ``peak_bytes`` are relative to entry and never negative.
    * Only memory that backs tensor storages and comes out of a dispatched op is seen:
      kernel workspaces and temporaries allocated and freed inside one op (e.g. inside
      a convolution or a fused kernel), allocator caching/fragmentation, and non-tensor
      state (Python objects, autograd node bookkeeping) are not counted.
    * Figures are storage sizes, not allocator block sizes (the CUDA caching allocator
      rounds to 512-byte blocks), so on CUDA use :func:`peak_cuda_bytes` for the
      allocator's view.
    * Sizes are accumulated over all devices unless ``device`` is given.
    * Ops run by other threads are only seen where PyTorch propagates the dispatch-mode
      state to them (it does for the autograd engine's worker threads). After the block
      exits, the numbers are frozen: later frees are no longer subtracted.
    * The mode adds Python overhead to every op: do not time code while tracking it.
    * Tensors whose storage cannot be reached (sparse, nested, some tensor subclasses)
      and ``meta`` tensors are skipped; ``untracked_outputs`` counts the skipped outputs.

Example:
    >>> with LiveMemoryTracker() as mem:
    ...     x = torch.empty(1024)
    ...     del x
    >>> mem.peak_bytes, mem.current_bytes
    (4096, 0)
"""

from __future__ import annotations

import resource
import sys
import threading
import weakref
from collections.abc import Callable
from types import TracebackType
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__ = [
    "LiveMemoryTracker",
    "peak_cuda_bytes",
    "peak_live_bytes",
    "peak_rss_bytes",
    "reset_peak_rss",
    "track_live_memory",
    "unwrap_functorch",
]

# Ops whose output is a freshly allocated tensor that nevertheless arrives as an input:
# ``torch.tensor(...)``, ``torch.as_tensor``, ``torch.from_numpy`` build the tensor outside
# the dispatcher and then pass it through ``lift_fresh``.
_FRESH_INPUT_OPS = frozenset(
    op
    for op in (
        getattr(torch.ops.aten.lift_fresh, "default", None),
        getattr(getattr(torch.ops.aten, "lift_fresh_copy", None), "default", None),
    )
    if op is not None
)

_MAX_UNWRAP_DEPTH = 64


def unwrap_functorch(tensor: torch.Tensor) -> torch.Tensor:
    """Strip ``torch.func`` wrapper tensors down to the tensor that owns the storage.

    ``torch.func.vmap`` wraps tensors in ``BatchedTensorImpl``, ``grad``/``vjp``/``jvp``
    in ``TensorWrapper`` and ``functionalize`` in ``FunctionalTensorWrapper``; none of
    them has an accessible storage. Each layer is removed with
    ``torch._C._functorch.get_unwrapped`` (functional wrappers with
    ``torch._from_functional_tensor``) until a plain tensor is reached. In PyTorch 2.x
    dispatch modes run below the functorch layers, so the tensors a dispatch mode sees
    are normally already plain; this is the defensive path for anything else.

    Args:
        tensor: Any tensor, wrapped or not.

    Returns:
        The innermost tensor (``tensor`` itself when it is not wrapped).

    Raises:
        TypeError: If ``tensor`` is not a ``torch.Tensor``.
    """
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"tensor must be a torch.Tensor, got {type(tensor).__name__}")
    functorch = torch._C._functorch
    for _ in range(_MAX_UNWRAP_DEPTH):
        if functorch.is_functorch_wrapped_tensor(tensor):
            tensor = functorch.get_unwrapped(tensor)
        elif torch._is_functional_tensor(tensor):
            tensor = torch._from_functional_tensor(tensor)
        else:
            break
    return tensor


def _storage_of(tensor: torch.Tensor) -> torch.UntypedStorage | None:
    """Return the untyped storage behind ``tensor``, or None if it has none we can count."""
    try:
        base = unwrap_functorch(tensor)
        if base.is_meta or base.layout != torch.strided:
            return None
        return base.untyped_storage()
    except (RuntimeError, NotImplementedError, TypeError):
        return None


class _TrackingMode(TorchDispatchMode):
    """Dispatch mode that reports every op's inputs and outputs to a tracker."""

    def __init__(self, tracker: LiveMemoryTracker) -> None:
        super().__init__()
        self._tracker = tracker

    def __torch_dispatch__(
        self,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self._tracker._record(func, (args, kwargs), out)
        return out


class LiveMemoryTracker:
    """Track live tensor-storage bytes allocated inside a ``with`` block.

    Each new storage is counted once (views and in-place results share their input's
    storage and add nothing); its bytes are subtracted when the storage is freed. See
    the module docstring for what is and is not counted.

    Args:
        device: Only count storages on this device type (``"cpu"``, ``"cuda"``, or a
            ``torch.device``; the index is ignored). ``None`` counts every device.

    Example:
        >>> with LiveMemoryTracker() as mem:
        ...     y = model(x).sum()
        ...     y.backward()
        >>> mem.peak_bytes
    """

    def __init__(self, device: str | torch.device | None = None) -> None:
        if device is not None and not isinstance(device, (str, torch.device)):
            raise TypeError(
                f"device must be a str, torch.device or None, got {type(device).__name__}"
            )
        self._device_type: str | None = None if device is None else torch.device(device).type
        self._lock = threading.RLock()
        self._live: dict[int, list[Any]] = {}  # id(storage) -> [nbytes, finalizer]
        self._current = 0
        self._peak = 0
        self._num_storages = 0
        self._untracked = 0
        self._mode: _TrackingMode | None = None

    # ----------------------------------------------------------------- results
    @property
    def current_bytes(self) -> int:
        """Bytes of storages allocated in the block and still alive (at exit, once exited)."""
        return self._current

    @property
    def peak_bytes(self) -> int:
        """Maximum of :attr:`current_bytes` since entry or the last :meth:`reset_peak`."""
        return self._peak

    @property
    def num_storages(self) -> int:
        """How many distinct new storages were counted."""
        return self._num_storages

    @property
    def untracked_outputs(self) -> int:
        """How many op outputs were skipped because their storage could not be reached."""
        return self._untracked

    @property
    def active(self) -> bool:
        """Whether the tracker is currently inside its ``with`` block."""
        return self._mode is not None

    def reset_peak(self) -> None:
        """Set :attr:`peak_bytes` to the current live bytes (like CUDA's reset_peak)."""
        with self._lock:
            self._peak = self._current

    # ------------------------------------------------------------ context mgmt
    def __enter__(self) -> LiveMemoryTracker:
        if self._mode is not None:
            raise RuntimeError("LiveMemoryTracker is already active; it cannot be re-entered")
        with self._lock:
            self._live.clear()
            self._current = self._peak = self._num_storages = self._untracked = 0
        self._mode = _TrackingMode(self)
        self._mode.__enter__()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        mode, self._mode = self._mode, None
        if mode is not None:
            mode.__exit__(exc_type, exc, tb)
        with self._lock:
            for entry in list(self._live.values()):
                entry[1].detach()
            self._live.clear()

    # ---------------------------------------------------------------- internals
    def _on_free(self, key: int) -> None:
        with self._lock:
            entry = self._live.pop(key, None)
            if entry is not None:
                self._current -= entry[0]

    def _record(self, func: Any, inputs: Any, out: Any) -> None:
        outputs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        if not outputs:
            return
        if func in _FRESH_INPUT_OPS:
            input_keys: set[int] = set()
        else:
            input_keys = set()
            for t in tree_flatten(inputs)[0]:
                if isinstance(t, torch.Tensor):
                    s = _storage_of(t)
                    if s is not None:
                        input_keys.add(id(s))
        with self._lock:
            for t in outputs:
                storage = _storage_of(t)
                if storage is None:
                    self._untracked += 1
                    continue
                if self._device_type is not None and storage.device.type != self._device_type:
                    continue
                key = id(storage)
                nbytes = int(storage.nbytes())
                entry = self._live.get(key)
                if entry is not None:
                    if entry[0] != nbytes:  # resized in place
                        self._current += nbytes - entry[0]
                        entry[0] = nbytes
                elif key in input_keys:
                    continue  # view / in-place result of a storage we do not own
                else:
                    fin = weakref.finalize(storage, self._on_free, key)
                    fin.atexit = False
                    self._live[key] = [nbytes, fin]
                    self._current += nbytes
                    self._num_storages += 1
                if self._current > self._peak:
                    self._peak = self._current


def track_live_memory(device: str | torch.device | None = None) -> LiveMemoryTracker:
    """Return a :class:`LiveMemoryTracker` to use as a context manager.

    Args:
        device: See :class:`LiveMemoryTracker`.

    Returns:
        A fresh, not yet entered tracker: ``with track_live_memory() as mem: ...``.
    """
    return LiveMemoryTracker(device=device)


def peak_live_bytes(fn: Callable[[], object], device: str | torch.device | None = None) -> int:
    """Run ``fn()`` under a :class:`LiveMemoryTracker` and return its peak live bytes.

    Args:
        fn: Zero-argument callable (use ``functools.partial`` for arguments).
        device: See :class:`LiveMemoryTracker`.

    Returns:
        Peak bytes of tensor storages allocated by ``fn`` and alive at the same time.

    Raises:
        TypeError: If ``fn`` is not callable.
    """
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {type(fn).__name__}")
    with LiveMemoryTracker(device=device) as mem:
        fn()
    return mem.peak_bytes


def peak_cuda_bytes(
    fn: Callable[[], object], device: int | str | torch.device | None = None
) -> int:
    """Peak CUDA-allocator bytes allocated by ``fn()`` above what was allocated before.

    Synchronizes, resets the device's peak statistics
    (``torch.cuda.reset_peak_memory_stats``), runs ``fn``, synchronizes again and returns
    ``torch.cuda.max_memory_allocated`` minus the bytes allocated before the call. This
    counts the caching allocator's blocks, kernel workspaces included.

    Args:
        fn: Zero-argument callable.
        device: CUDA device; ``None`` uses the current device.

    Returns:
        Peak extra allocated bytes during ``fn``.

    Raises:
        TypeError: If ``fn`` is not callable.
        RuntimeError: If CUDA is not available.
    """
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {type(fn).__name__}")
    if not torch.cuda.is_available():
        raise RuntimeError("peak_cuda_bytes needs CUDA, and torch.cuda.is_available() is False")
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return int(torch.cuda.max_memory_allocated(device) - before)


def reset_peak_rss() -> bool:
    """Reset the process's peak-RSS high-water mark, where the OS allows it.

    On Linux this writes ``5`` to ``/proc/self/clear_refs``, which resets ``VmHWM`` and
    with it ``getrusage``'s ``ru_maxrss``, so :func:`peak_rss_bytes` afterwards measures
    the peak from now on. Elsewhere, or when the file cannot be written, nothing happens.

    Returns:
        True if the high-water mark was reset.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def peak_rss_bytes() -> int:
    """Peak resident set size of this process in bytes, from ``resource.getrusage``.

    ``ru_maxrss`` is in KiB on Linux and in bytes on macOS. It is the peak since the
    process started, or since the last successful :func:`reset_peak_rss`.

    Returns:
        Peak RSS in bytes.
    """
    maxrss = int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    return maxrss if sys.platform == "darwin" else maxrss * 1024
