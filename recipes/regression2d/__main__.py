"""``python -m recipes.regression2d``."""

import sys

from recipes.common.checkpoint import CheckpointError
from recipes.regression2d.recipe import main

if __name__ == "__main__":
    try:
        result = main()
    except (FileNotFoundError, CheckpointError) as err:
        sys.exit(f"python -m recipes.regression2d: error: {err}")
    sys.exit(3 if result.get("interrupted") else 0)
