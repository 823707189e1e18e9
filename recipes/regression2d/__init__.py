"""A-MAML's CosMixture / Alpine study (``python -m recipes.regression2d``)."""

from recipes.regression2d.recipe import Regression2DConfig, main

__all__ = ["Regression2DConfig", "main"]
