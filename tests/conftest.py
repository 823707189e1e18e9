"""Shared fixtures: tiny models and data the tests make themselves."""

from __future__ import annotations

import pytest
import torch
from torch import nn


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


class TinyRegression:
    """A tanh MLP regression problem: model, inner batch, outer batch, loss."""

    def __init__(self, dtype: torch.dtype = torch.float64, device: str = "cpu", seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(2, 6), nn.Tanh(), nn.Linear(6, 1)).to(dtype).to(device)

        def data(n: int) -> tuple[torch.Tensor, torch.Tensor]:
            x = torch.randn(n, 2, generator=gen, dtype=torch.float64).to(dtype).to(device)
            return x, torch.sin(x.sum(1, keepdim=True))

        self.inner = data(10)
        self.outer = data(10)

    @property
    def params(self) -> dict[str, torch.Tensor]:
        return dict(self.net.named_parameters())

    def loss(self, params: dict[str, torch.Tensor], batch: tuple[torch.Tensor, torch.Tensor]):
        x, y = batch
        return ((torch.func.functional_call(self.net, params, (x,)) - y) ** 2).mean()


@pytest.fixture
def problem() -> TinyRegression:
    return TinyRegression()
