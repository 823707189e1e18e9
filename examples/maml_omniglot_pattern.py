"""torchopt's MAML Omniglot loop, switched to another meta-gradient rule by one line.

``train`` is the training loop of torchopt's ``examples/few-shot/maml_omniglot.py``
(inner steps with ``inner_opt.step(loss)``, ``torchopt.extract_state_dict`` /
``torchopt.recover_state_dict`` of the net and of the inner optimizer between tasks,
the mean query loss's backward, an outer Adam step), unchanged except that the inner
optimizer is built by ``make_inner_opt``::

    inner_opt = torchopt.MetaSGD(net, lr=1e-1)                    # torchopt
    inner_opt = tmg.MetaSGD(net, lr=1e-1, rule=tmg.Exact())       # this library

The data are random 28x28 "characters" (this machine has no Omniglot), so the numbers
only show that the rules agree with torchopt where they are exact.

    python examples/maml_omniglot_pattern.py --rules unrolled exact binomial:order=1 first_order
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
import torchopt
from torch import nn

import torchopt_metagrad as tmg

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def make_net(n_way: int, hidden: int = 64) -> nn.Sequential:
    """The example's network (3 conv blocks with batch norm, momentum=1.0)."""
    blocks: list[nn.Module] = []
    for c_in in (1, hidden, hidden):
        blocks += [
            nn.Conv2d(c_in, hidden, 3),
            nn.BatchNorm2d(hidden, momentum=1.0, affine=True),
            nn.ReLU(inplace=False),
            nn.MaxPool2d(2, 2),
        ]
    return nn.Sequential(*blocks, nn.Flatten(), nn.Linear(hidden, n_way))


def synthetic_batches(
    iters: int, task_num: int, n_way: int, k_spt: int, k_qry: int, *, seed: int = 0
) -> list[Batch]:
    """``iters`` meta-batches ``(x_spt, y_spt, x_qry, y_qry)`` shaped like OmniglotNShot's."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(iters):
        protos = torch.rand(task_num, n_way, 1, 28, 28, generator=gen)

        def sample(k: int, protos: torch.Tensor = protos) -> tuple[torch.Tensor, torch.Tensor]:
            noise = 0.3 * torch.randn(task_num, n_way, k, 1, 28, 28, generator=gen)
            x = (protos.unsqueeze(2) + noise).flatten(1, 2)
            y = torch.arange(n_way).repeat_interleave(k).expand(task_num, -1)
            return x, y.contiguous()

        out.append((*sample(k_spt), *sample(k_qry)))
    return out


def train(
    net: nn.Module,
    meta_opt: torch.optim.Optimizer,
    make_inner_opt: Callable[[nn.Module], Any],
    batches: Sequence[Batch],
    n_inner_iter: int = 5,
) -> list[float]:
    """torchopt's ``train()`` loop; returns the mean query loss of each meta-batch."""
    net.train()
    inner_opt = make_inner_opt(net)  # the only line that differs between libraries
    log = []
    for x_spt, y_spt, x_qry, y_qry in batches:
        task_num = x_spt.size(0)
        qry_losses = []
        meta_opt.zero_grad()

        net_state_dict = torchopt.extract_state_dict(net, by="reference", detach_buffers=True)
        optim_state_dict = torchopt.extract_state_dict(inner_opt, by="reference")
        for i in range(task_num):
            for _ in range(n_inner_iter):
                spt_logits = net(x_spt[i])
                spt_loss = F.cross_entropy(spt_logits, y_spt[i])
                inner_opt.step(spt_loss)

            qry_logits = net(x_qry[i])
            qry_loss = F.cross_entropy(qry_logits, y_qry[i])
            qry_losses.append(qry_loss)

            torchopt.recover_state_dict(net, net_state_dict)
            torchopt.recover_state_dict(inner_opt, optim_state_dict)

        mean_loss = torch.mean(torch.stack(qry_losses))
        mean_loss.backward()
        meta_opt.step()
        log.append(mean_loss.item())
    return log


def run(
    make_inner_opt: Callable[[nn.Module], Any],
    *,
    iters: int = 2,
    task_num: int = 2,
    n_way: int = 3,
    k_spt: int = 1,
    k_qry: int = 2,
    hidden: int = 8,
    n_inner_iter: int = 3,
    dtype: torch.dtype = torch.float64,
    seed: int = 0,
) -> tuple[nn.Module, list[float]]:
    """Train a fresh seeded net on seeded synthetic data; returns the net and the loss log."""
    torch.manual_seed(seed)
    net = make_net(n_way, hidden).to(dtype)
    meta_opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    batches = [
        tuple(t.to(dtype) if t.is_floating_point() else t for t in b)
        for b in synthetic_batches(iters, task_num, n_way, k_spt, k_qry, seed=seed)
    ]
    log = train(net, meta_opt, make_inner_opt, batches, n_inner_iter)  # type: ignore[arg-type]
    return net, log


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--rules",
        nargs="+",
        default=["unrolled", "exact", "binomial:order=1"],
        help="rule specs, name[:knob=value,...] (tmg.parse_rule)",
    )
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--inner-steps", type=int, default=3)
    args = parser.parse_args(argv)
    try:
        rules = {text: tmg.parse_rule(text) for text in args.rules}
    except ValueError as err:
        parser.error(f"--rules: {err}")

    def sizes(net: nn.Module) -> torch.Tensor:
        return torch.cat([p.detach().reshape(-1) for p in net.parameters()])

    kw = {"iters": args.iters, "n_inner_iter": args.inner_steps}
    ref_net, ref_log = run(lambda net: torchopt.MetaSGD(net, lr=1e-1), **kw)
    ref = sizes(ref_net)
    print(f"{'inner optimizer':42s} {'last query loss':>16s} {'max |theta - torchopt|':>22s}")
    print(f"{'torchopt.MetaSGD(net, lr=0.1)':42s} {ref_log[-1]:16.8f} {0.0:22.3e}")
    out = {}
    for text, rule in rules.items():
        net, log = run(lambda net, rule=rule: tmg.MetaSGD(net, lr=1e-1, rule=rule), **kw)
        diff = float((sizes(net) - ref).abs().max())
        label = f"tmg.MetaSGD, rule {tmg.format_rule(rule)}"
        print(f"{label:42s} {log[-1]:16.8f} {diff:22.3e}")
        out[text] = diff
    return out


if __name__ == "__main__":
    main()
