"""``python -m recipes.collab_filter``."""

import sys

from recipes.collab_filter.loaders import RatingsFormatError
from recipes.collab_filter.recipe import main
from recipes.common.checkpoint import CheckpointError

if __name__ == "__main__":
    try:
        result = main()
    except (FileNotFoundError, CheckpointError, RatingsFormatError, ImportError) as err:
        sys.exit(f"python -m recipes.collab_filter: error: {err}")
    sys.exit(3 if result.get("interrupted") else 0)
