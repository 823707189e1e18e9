"""A-MAML's collaborative-filtering study (``python -m recipes.collab_filter``).

``main`` and ``CollabFilterConfig`` are imported on first use, so that the submodules with
a command line of their own (``fetch_ml100k``, ``synthetic``, ``paper``) run with
``python -m`` without being imported twice.
"""

from typing import Any

__all__ = ["CollabFilterConfig", "main"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from recipes.collab_filter import recipe

        return getattr(recipe, name)
    raise AttributeError(f"module 'recipes.collab_filter' has no attribute {name!r}")
