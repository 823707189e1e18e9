"""``python -m recipes.sine``."""

from recipes.common.interrupt import run_cli
from recipes.sine.recipe import main

if __name__ == "__main__":
    run_cli("python -m recipes.sine", main, lambda r: bool(r.get("train", {}).get("interrupted")))
