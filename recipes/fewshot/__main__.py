"""``python -m recipes.fewshot``."""

import sys

from recipes.common.checkpoint import CheckpointError
from recipes.fewshot.recipe import main

if __name__ == "__main__":
    try:
        result = main()
    except (FileNotFoundError, CheckpointError, ImportError) as err:
        sys.exit(f"python -m recipes.fewshot: error: {err}")
    sys.exit(3 if result.get("interrupted") else 0)
