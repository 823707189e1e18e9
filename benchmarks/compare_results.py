"""Compare two reports of ``bench_rules.py`` row by row: time and memory ratios to torchopt.

Usage: ``python benchmarks/compare_results.py OLD.md NEW.md``. Times are compared as each
run's ratio to ``torchopt.MetaSGD`` in the same run (absolute seconds across runs mean
little on a shared machine); peak live memory is deterministic and compared directly.
"""

from __future__ import annotations

import re
import sys

ROW = re.compile(r"\| (\d+) \| ([^|]+?) \| ([\d.]+) \| ([\d.]*) \| ([\d.]+) \| ([\d.]*) \|")


def rows(path: str) -> dict[tuple[str, int, str], tuple[float, float]]:
    """``(model, K, rule) -> (time ratio to torchopt, peak live MiB)``."""
    out, model = {}, ""
    with open(path, encoding="utf-8") as f:
        lines = f.readlines()
    for line in lines:
        if line.startswith("## "):
            model = line[3:].split(":")[0].strip()
        match = ROW.match(line)
        if match and match.group(4):
            key = (model, int(match.group(1)), match.group(2).strip())
            out[key] = (float(match.group(4)), float(match.group(5)))
    return out


def main(old_path: str, new_path: str) -> None:
    old, new = rows(old_path), rows(new_path)
    print("| model | K | rule | × torchopt time, old | new | new/old | peak live MiB, old | new |")
    print("|:--|--:|:--|--:|--:|--:|--:|--:|")
    for key in old:
        if key in new:
            (t0, m0), (t1, m1) = old[key], new[key]
            print(
                f"| {key[0]} | {key[1]} | {key[2]} | {t0:.2f} | {t1:.2f} | {t1 / t0:.2f} "
                f"| {m0:.2f} | {m1:.2f} |"
            )


if __name__ == "__main__":
    main(*sys.argv[1:3])
