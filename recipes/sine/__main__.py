"""``python -m recipes.sine``."""

import sys

from recipes.common.checkpoint import CheckpointError
from recipes.sine.recipe import main

if __name__ == "__main__":
    try:
        result = main()
    except (FileNotFoundError, CheckpointError) as err:
        sys.exit(f"python -m recipes.sine: error: {err}")
    sys.exit(3 if result.get("train", {}).get("interrupted") else 0)
