"""The paper's tables, and ours in the same layout from finished studies.

    python -m recipes.collab_filter.paper runs/collab_filter/A runs/collab_filter/B ...

reads each study's ``results.json`` and prints one Markdown table: methods as rows,
``dataset setting`` as columns, the nRMSE (mean ± std over the held-out users) after
``--steps`` test-time steps, as the A-MAML paper's Tables 1 and 2 (Li et al., AISTATS
2023, section 5.3) print theirs. Their numbers, for reference, are :data:`PAPER`
(nRMSE, mean ± std over 100 test tasks; 50 inner steps / MAML 5 in Table 1, 100 / 10
in Table 2).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from recipes.common.methods import Method
from recipes.common.tables import markdown_table

__all__ = ["PAPER", "paper_table", "paper_value"]

_ROWS = ("A-MAML", "iMAML", "MAML", "FOMAML", "Reptile")
_COLS = [(d, s) for d in ("jester-1", "ml-100k", "ml-1m") for s in ("10shot-15val", "20shot-30val")]
_TABLE1 = """
0.074±0.005 0.027±0.002 0.053±0.005 0.023±0.003 0.094±0.008 0.035±0.004
0.114±0.007 0.050±0.003 0.082±0.004 0.033±0.002 0.138±0.010 0.052±0.004
0.120±0.001 0.036±0.000 0.123±0.001 0.050±0.003 0.140±0.002 0.059±0.001
0.292±0.012 0.115±0.004 0.174±0.008 0.068±0.004 0.270±0.011 0.104±0.006
0.270±0.012 0.106±0.004 0.166±0.008 0.063±0.003 0.266±0.011 0.101±0.006
"""
_TABLE2 = """
0.069±0.005 0.044±0.003 0.057±0.006 0.021±0.002 0.105±0.009 0.035±0.004
0.190±0.010 0.103±0.005 0.168±0.007 0.046±0.002 0.130±0.007 0.045±0.004
0.154±0.001 0.061±0.002 0.123±0.001 0.050±0.002 0.197±0.002 0.083±0.001
0.273±0.012 0.077±0.004 0.191±0.007 0.071±0.004 0.395±0.010 0.119±0.005
0.290±0.012 0.100±0.004 0.171±0.008 0.066±0.004 0.408±0.011 0.128±0.006
"""


def _parse(text: str) -> dict[tuple[str, str, str], str]:
    rows = [line.split() for line in text.strip().splitlines()]
    return {
        (method, d, s): cell.replace("±", " ± ")
        for method, row in zip(_ROWS, rows, strict=True)
        for (d, s), cell in zip(_COLS, row, strict=True)
    }


#: ``{(steps, maml_steps): {(method, dataset, setting): "mean ± std"}}``, the paper's values.
PAPER = {(50, 5): _parse(_TABLE1), (100, 10): _parse(_TABLE2)}


def paper_value(
    dataset: str, setting: str, steps: int, maml_steps: int, method: Method
) -> str | None:
    """The paper's number for this row and column, if the paper has one: the method's
    label is one of its five, the dataset a real one, and the horizons those of a table."""
    table = PAPER.get((steps, maml_steps), {})
    return table.get((method.label, dataset, setting))


def paper_table(results: Sequence[dict[str, Any]]) -> str:
    """Methods as rows, one column per study (``dataset setting``): nRMSE after the
    long horizon, mean ± std over the held-out users; beside a study of a real dataset at
    a table's horizons, the paper's number for the row (its label) in a ``paper`` column."""

    def paper(r: dict[str, Any], label: str) -> str | None:
        table = PAPER.get((int(r.get("steps", 0)), int(r.get("maml_steps", 0))), {})
        return table.get((label, r["dataset"], r["setting"]))

    labels = list(dict.fromkeys(k for r in results for k in r["methods"]))
    with_paper = [any(paper(r, label) for label in labels) for r in results]
    columns: list[str] = []
    for r, extra in zip(results, with_paper, strict=True):
        columns += [f"{r['dataset']} {r['setting']}", *(["paper"] if extra else [])]
    rows = []
    for label in labels:
        row = [label]
        for r, extra in zip(results, with_paper, strict=True):
            entry = r["methods"].get(label, {})
            if "nrmse_at_steps" in entry:
                row.append(f"{entry['nrmse_at_steps']:.3f} ± {entry['nrmse_std_at_steps']:.3f}")
            else:
                row.append("-")
            if extra:
                row.append(paper(r, label) or "-")
        rows.append(row)
    return markdown_table(["method", *columns], rows)


def main(argv: Sequence[str]) -> str:
    """Print the table of the studies in the folders ``argv``."""
    if not argv:
        raise SystemExit("usage: python -m recipes.collab_filter.paper RUN_DIR [RUN_DIR ...]")
    results = []
    for folder in argv:
        path = Path(folder) / "results.json"
        if not path.is_file():
            raise SystemExit(f"{path}: no such file (is {folder} a finished study?)")
        results.append(json.loads(path.read_text(encoding="utf-8")))
    text = paper_table(results)
    print(text, flush=True)
    return text


if __name__ == "__main__":
    main(sys.argv[1:])
