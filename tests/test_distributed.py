"""Task-parallel meta-training over 2 CPU processes (gloo) equals one process.

Each rank adapts its share of a global meta-batch with the rule, divides its loss by the
global batch, backpropagates, and ``tmg.distributed.average_meta_gradients(..., scale=
"sum")`` reduces the meta-gradients before the outer Adam step; after several outer steps
the meta-parameters equal a single process over the same global meta-batch (float64).
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.func import functional_call

import torchopt_metagrad as tmg

GLOBAL_BATCH, OUTER_STEPS, K = 5, 3, 3  # 5 tasks on 2 ranks: shares of 3 and 2
RULES = {
    "exact": lambda: tmg.Exact(),
    "binomial2": lambda: tmg.Binomial(2),
    "implicit_cg": lambda: tmg.ImplicitCG(2.0, maxiter=50, tol=1e-12),
}


def _train(rule_name: str, rank: int, world: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(1, 16), nn.Tanh(), nn.Linear(16, 1)).double()
    meta_opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    info = tmg.distributed.RankInfo(rank, world, rank, torch.device("cpu"))
    for step in range(OUTER_STEPS):
        # The global meta-batch of this step, drawn from one seed; each rank takes its slice.
        g = torch.Generator().manual_seed(1000 + step)
        amp, phase = (
            torch.rand(GLOBAL_BATCH, generator=g) + 0.5,
            torch.rand(GLOBAL_BATCH, generator=g),
        )
        x = torch.rand(GLOBAL_BATCH, 20, 1, generator=g, dtype=torch.float64) * 6 - 3
        y = amp[:, None, None] * torch.sin(x + phase[:, None, None])
        start = sum(
            tmg.distributed.share(GLOBAL_BATCH, tmg.distributed.RankInfo(r, world, r, info.device))
            for r in range(rank)
        )
        mine = range(start, start + tmg.distributed.share(GLOBAL_BATCH, info))
        params = dict(net.named_parameters())

        def loss(p, b):  # type: ignore[no-untyped-def]
            return ((functional_call(net, p, (b[0],)) - b[1]) ** 2).mean()

        meta_opt.zero_grad()
        total = torch.zeros((), dtype=torch.float64)
        for t in mine:
            out = tmg.adapt(
                loss, params, (x[t, :10], y[t, :10]), steps=K, lr=0.05, rule=RULES[rule_name]()
            )
            total = total + loss(out, (x[t, 10:], y[t, 10:]))
        (total / GLOBAL_BATCH).backward()
        tmg.distributed.average_meta_gradients(net, scale="sum")
        meta_opt.step()
    return {n: p.detach().clone() for n, p in net.named_parameters()}


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        params = {name: _train(name, rank, world) for name in RULES}
        if rank == 0:
            torch.save(params, out)
        tmg.distributed.teardown()  # barrier first: a bare destroy aborted 1 run in 15
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():  # a failure: leave without waiting for the peer
            dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_ranks_equal_one_process(tmp_path: Path):
    out = str(tmp_path / "rank0.pt")
    mp.spawn(_worker, args=(2, _free_port(), out), nprocs=2, join=True)  # every rule, one launch
    together = torch.load(out)
    for rule_name in RULES:
        alone = _train(rule_name, 0, 1)
        for name, value in alone.items():
            torch.testing.assert_close(together[rule_name][name], value, rtol=1e-10, atol=1e-12)


def test_helpers_alone_and_bad_input():
    info = tmg.distributed.setup()  # no torchrun environment: rank 0 of 1
    assert (info.rank, info.world_size) == (0, 1)
    assert [
        tmg.distributed.share(7, tmg.distributed.RankInfo(r, 3, r, info.device)) for r in range(3)
    ] == [3, 2, 2]
    with pytest.raises(ValueError, match="smaller than the number of ranks"):
        tmg.distributed.share(2, tmg.distributed.RankInfo(0, 3, 0, info.device))
    seeds = {tmg.distributed.task_seed(0, s, r) for s in range(10) for r in range(4)}
    assert len(seeds) == 40 and tmg.distributed.task_seed(0, 3, 1) == tmg.distributed.task_seed(
        0, 3, 1
    )
    w = torch.ones(2, requires_grad=True)
    w.grad = torch.full((2,), 3.0)
    tmg.distributed.average_meta_gradients([w])  # alone: unchanged
    tmg.distributed.teardown()  # alone: nothing to leave
    assert torch.equal(w.grad, torch.full((2,), 3.0))
    with pytest.raises(ValueError, match="scale must be"):
        tmg.distributed.average_meta_gradients([w], scale="max")


def test_meta_batch_seeds_do_not_depend_on_the_world_size():
    cpu = torch.device("cpu")
    alone = tmg.distributed.meta_batch_seeds(7, 3, 10, tmg.distributed.RankInfo(0, 1, 0, cpu))
    assert len(set(alone)) == 10
    for world in (2, 3, 4):
        union = [
            s
            for r in range(world)
            for s in tmg.distributed.meta_batch_seeds(
                7, 3, 10, tmg.distributed.RankInfo(r, world, r, cpu)
            )
        ]
        assert union == alone
    assert alone != tmg.distributed.meta_batch_seeds(
        7, 4, 10, tmg.distributed.RankInfo(0, 1, 0, cpu)
    )
