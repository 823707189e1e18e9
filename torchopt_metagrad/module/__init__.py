"""The module front end: torchopt-style optimizers and a ``higher``-style context.

A thin layer over the core: :mod:`.slots` (where a module's adapted tensors live, and a
closure as a replayable inner loss), :mod:`.session` (which inner loop a step belongs
to, fed to the core's inner loop), :mod:`.optim` (``MetaSGD``, ``MetaAdam``,
``MetaOptimizer``) and :mod:`.higher_compat` (``innerloop_ctx``).
"""

from torchopt_metagrad.module.higher_compat import DifferentiableOptimizer, innerloop_ctx
from torchopt_metagrad.module.optim import MetaAdam, MetaOptimizer, MetaSGD

__all__ = ["DifferentiableOptimizer", "MetaAdam", "MetaOptimizer", "MetaSGD", "innerloop_ctx"]
