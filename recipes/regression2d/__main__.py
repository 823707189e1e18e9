"""``python -m recipes.regression2d``."""

from recipes.common.interrupt import run_cli
from recipes.regression2d.recipe import main

if __name__ == "__main__":
    run_cli("python -m recipes.regression2d", main, lambda r: bool(r.get("interrupted")))
