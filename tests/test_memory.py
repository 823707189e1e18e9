"""Tests for torchopt_metagrad.diagnostics.memory (live tensor-storage tracking)."""

from __future__ import annotations

import gc
import itertools

import pytest
import torch

from torchopt_metagrad.diagnostics import (
    LiveMemoryTracker,
    peak_cuda_bytes,
    peak_live_bytes,
    peak_rss_bytes,
    reset_peak_rss,
    track_live_memory,
    unwrap_functorch,
)

F32 = 4  # bytes per float32


# --------------------------------------------------------------------------- basics
def test_known_allocation_peak_is_exact() -> None:
    with LiveMemoryTracker() as mem:
        x = torch.empty(1000)
        assert mem.current_bytes == 1000 * F32
    assert mem.peak_bytes == 1000 * F32
    assert mem.current_bytes == 1000 * F32
    assert mem.num_storages == 1
    del x


def test_dtype_and_shape_give_nbytes() -> None:
    with track_live_memory() as mem:
        _a = torch.zeros(10, 20, dtype=torch.float64)
        _b = torch.ones(7, dtype=torch.int8)
    assert mem.peak_bytes == 10 * 20 * 8 + 7


def test_freed_tensor_is_subtracted() -> None:
    with LiveMemoryTracker() as mem:
        a = torch.randn(256, 256)
        del a
        assert mem.current_bytes == 0
        b = torch.randn(128, 128)
        assert mem.current_bytes == 128 * 128 * F32
        del b
    assert mem.current_bytes == 0
    assert mem.peak_bytes == 256 * 256 * F32


def test_sequential_frees_keep_peak_at_one_buffer() -> None:
    with LiveMemoryTracker() as mem:
        for _ in range(20):
            t = torch.randn(1000)
            t = t * 2  # old storage freed on rebinding
        del t
    # at most two buffers (input and output of the multiply) alive at once
    assert mem.peak_bytes == 2 * 1000 * F32
    assert mem.current_bytes == 0


def test_views_and_inplace_are_not_double_counted() -> None:
    with LiveMemoryTracker() as mem:
        x = torch.zeros(64, 64)
        views = [x.view(-1), x[::2], x.t(), x[3:10, 5], x.unsqueeze(0), x.as_strided((8,), (3,))]
        x.add_(1.0)
        views[1].mul_(2.0)
        x.transpose_(0, 1)
        _ = x.detach()
        assert mem.current_bytes == 64 * 64 * F32
        del x
        assert mem.current_bytes == 64 * 64 * F32  # still referenced by the views
        del views, _
    assert mem.current_bytes == 0
    assert mem.peak_bytes == 64 * 64 * F32


def test_tensors_created_before_entry_are_not_counted() -> None:
    x = torch.randn(500)
    with LiveMemoryTracker() as mem:
        x.add_(1.0)
        _v = x.view(5, 100)
        del x  # freeing a pre-existing tensor must not go negative
        gc.collect()
        y = torch.empty(10)
    assert mem.current_bytes == 10 * F32
    assert mem.peak_bytes == 10 * F32
    del y


def test_tensor_factory_from_data_is_counted() -> None:
    with LiveMemoryTracker() as mem:
        t = torch.tensor([1.0, 2.0, 3.0])
    assert mem.current_bytes == 3 * F32
    del t


def test_resize_is_tracked() -> None:
    with LiveMemoryTracker() as mem:
        x = torch.empty(0)
        x.resize_(100)
        assert mem.current_bytes == 100 * F32
        x.resize_(300)
    assert mem.peak_bytes == 300 * F32
    del x


def test_reset_peak() -> None:
    with LiveMemoryTracker() as mem:
        a = torch.empty(1000)
        del a
        assert mem.peak_bytes == 1000 * F32
        mem.reset_peak()
        assert mem.peak_bytes == 0
        b = torch.empty(10)
    assert mem.peak_bytes == 10 * F32
    del b


def test_numbers_frozen_after_exit_and_reentry_resets() -> None:
    mem = LiveMemoryTracker()
    with mem:
        a = torch.empty(100)
    assert not mem.active
    del a
    gc.collect()
    assert mem.current_bytes == 100 * F32  # frozen at exit
    with mem:
        _b = torch.empty(3)
    assert mem.peak_bytes == 3 * F32


def test_cannot_enter_twice() -> None:
    mem = LiveMemoryTracker()
    with mem, pytest.raises(RuntimeError, match="already active"), mem:
        pass


def test_exception_inside_block_pops_mode() -> None:
    mem = LiveMemoryTracker()
    with pytest.raises(ZeroDivisionError), mem:
        _ = torch.empty(10)
        _ = 1 / 0
    assert not mem.active
    with LiveMemoryTracker() as other:
        _c = torch.empty(5)
    assert other.peak_bytes == 5 * F32
    assert mem.peak_bytes == 10 * F32


def test_nested_trackers_both_see_ops() -> None:
    with LiveMemoryTracker() as outer:
        _a = torch.empty(100)
        with LiveMemoryTracker() as inner:
            _b = torch.empty(50)
    assert inner.peak_bytes == 50 * F32
    assert outer.peak_bytes == 150 * F32


def test_device_filter() -> None:
    with LiveMemoryTracker(device="cuda") as mem:
        _a = torch.empty(100)
    assert mem.peak_bytes == 0
    with LiveMemoryTracker(device=torch.device("cpu")) as mem:
        _a = torch.empty(100)
    assert mem.peak_bytes == 100 * F32


def test_bad_arguments() -> None:
    with pytest.raises(TypeError, match="device"):
        LiveMemoryTracker(device=3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="fn"):
        peak_live_bytes(42)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="tensor"):
        unwrap_functorch([1.0])  # type: ignore[arg-type]


def test_peak_live_bytes_helper() -> None:
    def fn() -> None:
        a = torch.empty(200)
        b = torch.empty(300)
        del a, b

    assert peak_live_bytes(fn) == 500 * F32


# --------------------------------------------------------------------- autograd
def test_saved_tensors_live_until_graph_freed() -> None:
    p = torch.randn(1000, requires_grad=True)
    with LiveMemoryTracker() as mem:
        y = p.exp()  # exp saves its output for backward
        loss = y.sum()
        del y
        gc.collect()
        assert mem.current_bytes >= 1000 * F32  # kept alive by the graph
        loss.backward()
        del loss
        gc.collect()
    # only p.grad (1000 floats) remains
    assert mem.current_bytes == 1000 * F32
    p.grad = None


def test_backward_ops_are_seen() -> None:
    net = torch.nn.Linear(100, 100)
    x = torch.randn(32, 100)
    with LiveMemoryTracker() as mem:
        net(x).pow(2).sum().backward()
    # grads of weight and bias remain
    assert mem.current_bytes == (100 * 100 + 100) * F32
    net.zero_grad(set_to_none=True)


# ---------------------------------------------------------------------- functorch
def test_unwrap_functorch_inside_transforms() -> None:
    x = torch.randn(4, 5)
    seen: list[tuple[bool, int]] = []

    def probe(a: torch.Tensor) -> torch.Tensor:
        base = unwrap_functorch(a)
        seen.append(
            (torch._C._functorch.is_functorch_wrapped_tensor(a), base.untyped_storage().nbytes())
        )
        return a.sum()

    torch.func.vmap(probe)(x)
    torch.func.grad(probe)(x)
    torch.func.vmap(torch.func.grad(probe))(x)
    assert [w for w, _ in seen] == [True, True, True]
    assert all(n == 4 * 5 * F32 for _, n in seen)
    plain = torch.randn(3)
    assert unwrap_functorch(plain) is plain


def test_vmap_is_tracked() -> None:
    b, n = 16, 1000
    x = torch.randn(b, n)
    with LiveMemoryTracker() as mem:
        out = torch.func.vmap(lambda z: z.sin() * 2.0 + 1.0)(x)
    size = b * n * F32
    assert out.shape == (b, n)
    assert size <= mem.peak_bytes <= 3 * size
    assert mem.current_bytes == size
    assert mem.untracked_outputs == 0


def test_grad_and_vjp_are_tracked() -> None:
    n = 5000
    x = torch.randn(n)

    def f(a: torch.Tensor) -> torch.Tensor:
        return (a.sin() * a.cos()).sum()

    with LiveMemoryTracker() as mem:
        g = torch.func.grad(f)(x)
    size = n * F32
    assert g.shape == (n,)
    assert 2 * size <= mem.peak_bytes <= 8 * size  # sin, cos saved + a few temporaries
    assert mem.current_bytes == size

    with LiveMemoryTracker() as mem:
        out, vjp_fn = torch.func.vjp(torch.exp, x)
        (gx,) = vjp_fn(torch.ones_like(out))
    assert 3 * size <= mem.peak_bytes <= 6 * size  # out, cotangent, result
    del out, vjp_fn, gx


def test_vmap_of_grad_per_sample() -> None:
    w = torch.randn(50, 20)
    xs = torch.randn(64, 20)

    def loss(w_: torch.Tensor, x_: torch.Tensor) -> torch.Tensor:
        return torch.tanh(w_ @ x_).sum()

    with LiveMemoryTracker() as mem:
        per_sample = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(w, xs)
    size = per_sample.numel() * F32
    assert per_sample.shape == (64, 50, 20)
    assert size <= mem.peak_bytes <= 4 * size


# ----------------------------------------------------- unrolled meta-learning workload
def _mlp_params(gen: torch.Generator) -> list[torch.Tensor]:
    shapes = [(40, 1), (40,), (40, 40), (40,), (1, 40), (1,)]
    return [(0.3 * torch.randn(s, generator=gen)).requires_grad_() for s in shapes]


def _mlp(params: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    w1, b1, w2, b2, w3, b3 = params
    h = torch.relu(x @ w1.T + b1)
    h = torch.relu(h @ w2.T + b2)
    return h @ w3.T + b3


def _inner_loop_peak(steps: int, keep_graph: bool) -> int:
    gen = torch.Generator().manual_seed(0)
    meta = _mlp_params(gen)
    x = torch.randn(100, 1, generator=gen)
    y = torch.sin(x)
    with LiveMemoryTracker() as mem:
        params = list(meta)
        for _ in range(steps):
            loss = (_mlp(params, x) - y).pow(2).mean()
            grads = torch.autograd.grad(loss, params, create_graph=keep_graph)
            new = [p - 0.01 * g for p, g in zip(params, grads, strict=True)]
            params = new if keep_graph else [p.detach().requires_grad_() for p in new]
        outer = (_mlp(params, x) - y).pow(2).mean()
        if keep_graph:
            outer.backward()
        del params, outer
    return mem.peak_bytes


def test_peak_grows_with_kept_graphs_and_stays_flat_otherwise() -> None:
    ks = [2, 4, 8, 16]
    kept = [_inner_loop_peak(k, keep_graph=True) for k in ks]
    freed = [_inner_loop_peak(k, keep_graph=False) for k in ks]
    # kept graphs: strictly increasing, roughly linear (each step keeps ~same bytes)
    assert all(a < b for a, b in itertools.pairwise(kept))
    per_step = (kept[-1] - kept[0]) / (ks[-1] - ks[0])
    per_step_first = (kept[1] - kept[0]) / (ks[1] - ks[0])
    assert per_step > 0.5 * per_step_first
    assert kept[-1] > 4 * kept[0]
    # graphs freed every step: flat
    assert max(freed) <= 1.2 * min(freed)
    assert freed[-1] == freed[-2]
    assert kept[-1] > 5 * freed[-1]


# ---------------------------------------------------------------------------- RSS/CUDA
def test_peak_rss() -> None:
    before = peak_rss_bytes()
    assert before > 10 * 2**20  # a Python process with torch loaded
    assert isinstance(reset_peak_rss(), bool)
    assert peak_rss_bytes() > 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA error")
def test_peak_cuda_bytes_without_cuda() -> None:
    with pytest.raises(RuntimeError, match="CUDA"):
        peak_cuda_bytes(lambda: None)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_tracking() -> None:
    n = 1 << 20
    with LiveMemoryTracker(device="cuda") as mem:
        a = torch.empty(n, device="cuda")
        b = a * 2
        del a
    assert mem.peak_bytes == 2 * n * F32
    assert mem.current_bytes == n * F32
    del b
    assert peak_cuda_bytes(lambda: torch.empty(n, device="cuda")) >= n * F32

    p = torch.randn(n, device="cuda", requires_grad=True)
    with LiveMemoryTracker(device="cuda") as mem:
        p.exp().sum().backward()  # backward runs on the CUDA autograd thread
    assert mem.current_bytes == n * F32  # p.grad
    assert mem.peak_bytes >= 2 * n * F32
