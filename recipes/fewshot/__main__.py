"""``python -m recipes.fewshot``."""

from recipes.common.interrupt import run_cli
from recipes.fewshot.recipe import main

if __name__ == "__main__":
    run_cli("python -m recipes.fewshot", main, lambda r: bool(r.get("interrupted")), (ImportError,))
