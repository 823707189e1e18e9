"""The BinomMAML paper's table for one dataset: 1-shot and 5-shot, its five methods.

    python -m recipes.fewshot.paper --dataset miniimagenet --root DATA/mini --device cuda
    python -m recipes.fewshot.paper --dataset glyphs --meta-steps 500 --name paper-glyphs

Runs ``python -m recipes.fewshot`` twice with every option given here (the paper's
protocol by default: 5-way, K = 5, 20,000 meta-steps, 600 test tasks), with ``--shots 1``
into ``OUT/1shot`` and ``--shots 5`` into ``OUT/5shot``, then writes
``OUT/paper_table.md``: methods as rows, the 1-shot and 5-shot meta-test accuracy (95%
CI) as columns, and each method's gap to full MAML (the ``MAML`` row, ``exact``) in
parentheses, as the paper prints it. ``--resume`` continues both.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from recipes.common.config import parse_config
from recipes.common.metrics import write_text_atomic
from recipes.common.tables import markdown_table
from recipes.fewshot.recipe import FewshotConfig, main

__all__ = ["paper_table", "run_paper"]


def paper_table(results: dict[int, dict[str, Any]], reference: str = "MAML") -> str:
    """Methods as rows, ``{shots}-shot`` columns: ``acc ± ci (gap to reference)``, in %."""
    shots = sorted(results)
    labels = list(dict.fromkeys(k for s in shots for k in results[s]["methods"]))
    rows = []
    for label in labels:
        row: list[str] = [label]
        for s in shots:
            entry = results[s]["methods"].get(label, {})
            ref = results[s]["methods"].get(reference, {})
            if "test_accuracy" not in entry:
                row.append("-")
                continue
            cell = f"{100 * entry['test_accuracy']:.2f} ± {100 * entry['test_ci95']:.2f}"
            if "test_accuracy" in ref and label != reference:
                cell += f" ({100 * (entry['test_accuracy'] - ref['test_accuracy']):+.2f})"
            row.append(cell)
        rows.append(row)
    untrained = ["untrained init"] + [
        f"{100 * results[s]['untrained']['test_accuracy']:.2f} ± "
        f"{100 * results[s]['untrained']['test_ci95']:.2f}"
        for s in shots
    ]
    return markdown_table(["method", *[f"{s}-shot" for s in shots]], [*rows, untrained])


def run_paper(argv: Sequence[str]) -> str:
    """Run both shot settings with ``argv`` and write the table; returns it."""
    config = parse_config(FewshotConfig, argv)
    base = Path(config.out_dir)
    results = {}
    for shots in (1, 5):
        results[shots] = main([*argv, "--shots", str(shots), "--out", str(base / f"{shots}shot")])
        if results[shots].get("interrupted"):
            raise SystemExit(3)
    table = paper_table(results)
    text = (
        f"{config.dataset}, {config.ways}-way, K = {config.steps}, {config.meta_steps} "
        f"meta-steps; meta-test accuracy % (95% CI) on {config.test_tasks} tasks, gap to "
        f"MAML in parentheses\n\n{table}\n"
    )
    write_text_atomic(base / "paper_table.md", text)
    print(text + f"\n(written to {base / 'paper_table.md'})", flush=True)
    return text


if __name__ == "__main__":
    run_paper(sys.argv[1:])
