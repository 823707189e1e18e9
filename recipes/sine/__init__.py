"""Sine regression: BinomMAML's estimator study and meta-training (``python -m recipes.sine``),
with a learned inner step size (``--learn-lr``: Meta-SGD, MAML++) or ANIL (``--anil``)."""

from recipes.sine.recipe import SineConfig, main

__all__ = ["SineConfig", "main"]
