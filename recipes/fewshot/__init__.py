"""Few-shot image classification with every rule (``python -m recipes.fewshot``)."""

from recipes.fewshot.recipe import FewshotConfig, main

__all__ = ["FewshotConfig", "main"]
