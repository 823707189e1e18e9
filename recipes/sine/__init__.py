"""Sine regression: BinomMAML's estimator study and meta-training (``python -m recipes.sine``)."""

from recipes.sine.recipe import SineConfig, main

__all__ = ["SineConfig", "main"]
