"""A-MAML's collaborative-filtering study (``python -m recipes.collab_filter``)."""

from recipes.collab_filter.recipe import CollabFilterConfig, main

__all__ = ["CollabFilterConfig", "main"]
