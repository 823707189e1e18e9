"""The few-shot networks: the 4-conv net and ResNet-12, with batch norm on batch statistics.

Both use ``BatchNorm2d(track_running_stats=False)``: every forward normalizes with the
statistics of the batch it sees (the support set in the inner loop, the query set in the
outer loss), as MAML's reference code does in training and at test time. The networks
hold no buffers, so the loss is a pure function of the parameters and a meta-batch's
inner loops can run together under ``torch.func.vmap``.

* ``conv4``: :func:`workloads.fewshot.conv4` (4 x [conv 3x3, BN, ReLU, max-pool 2]);
  64 channels by default, 32 for mini/tieredImageNet as in MAML.
* ``resnet12``: four residual blocks of 64, 160, 320, 640 channels (Lee et al., 2019;
  Oreshkin et al., 2018), each 3 x [conv 3x3, BN, LeakyReLU 0.1] with a 1x1 conv + BN
  shortcut, then max-pool 2; global average pooling and a linear head (no DropBlock).
"""

from __future__ import annotations

from torch import Tensor, nn

from workloads.fewshot import conv4

__all__ = ["MODELS", "make_model", "resnet12"]


class _ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(3):
            layers += [
                nn.Conv2d(cin if i == 0 else cout, cout, 3, padding=1, bias=False),
                nn.BatchNorm2d(cout, track_running_stats=False),
            ]
            if i < 2:
                layers.append(nn.LeakyReLU(0.1))
        self.body = nn.Sequential(*layers)
        self.shortcut = nn.Sequential(
            nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout, track_running_stats=False)
        )
        self.out = nn.Sequential(nn.LeakyReLU(0.1), nn.MaxPool2d(2))

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.body(x) + self.shortcut(x))


def resnet12(
    n_way: int = 5, in_channels: int = 3, widths: tuple[int, ...] = (64, 160, 320, 640)
) -> nn.Sequential:
    """ResNet-12 for few-shot classification (see the module docstring)."""
    blocks = [_ResBlock(a, b) for a, b in zip((in_channels, *widths[:-1]), widths, strict=True)]
    return nn.Sequential(
        *blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(widths[-1], n_way)
    )


MODELS = ("conv4", "resnet12")


def make_model(
    name: str, *, ways: int, channels: int, image_size: int, hidden: int
) -> nn.Sequential:
    """The network ``name`` for ``ways`` classes (``hidden``: conv4's channels;
    resnet12's first width, the others scaled as 64:160:320:640)."""
    if name == "conv4":
        return conv4(ways, in_channels=channels, hidden=hidden, image_size=image_size)
    if name == "resnet12":
        widths = tuple(round(hidden * w / 64) for w in (64, 160, 320, 640))
        return resnet12(ways, in_channels=channels, widths=widths)
    raise ValueError(f"--model must be one of {', '.join(MODELS)}, got {name!r}")
