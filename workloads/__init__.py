"""The meta-learning workloads shared by the recipes, the benchmarks and the examples.

* :mod:`workloads.sine`: sine regression (MAML's sinusoids), the MLP 1-40-40-1 with ReLU.
* :mod:`workloads.fewshot`: the 4-conv few-shot network and random N-way K-shot episodes.

Each module holds the network and the task sampler, drawn only from the
``torch.Generator`` passed in, so a seed gives the same tasks wherever they are used.
This package lives beside the library, not in it (``import workloads`` from the
repository root).
"""

from workloads import fewshot, sine

__all__ = ["fewshot", "sine"]
