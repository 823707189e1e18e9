"""Get the real MovieLens-100K ratings from the ``recbole`` wheel on PyPI.

    python -m recipes.collab_filter.fetch_ml100k --out data/ml-100k
    python -m recipes.collab_filter.fetch_ml100k --wheel recbole-1.2.1-py3-none-any.whl

On a machine that reaches only package registries: ``pip download recbole==VERSION
--no-deps`` fetches the wheel (a zip file) into a temporary folder, and the member
``recbole/dataset_example/ml-100k/ml-100k.inter`` (100,000 ratings of MovieLens-100K,
tab-separated, with RecBole's header line) is copied out of the zip with ``zipfile``;
recbole is never installed or imported. The file is then read with the recipe's
``.inter`` loader (every line checked) and its ratings counted. It lands in ``--out``
(``data/`` is git-ignored): MovieLens's licence forbids redistributing the data, so it is
never committed. Checked with recbole 1.2.1: 100,000 ratings, 943 users, 1,682 items,
SHA-256 below.
"""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Sequence
from pathlib import Path

from recipes.collab_filter.loaders import read_inter
from recipes.common.metrics import write_atomic

__all__ = ["MEMBER", "extract", "main"]

MEMBER = "recbole/dataset_example/ml-100k/ml-100k.inter"
VERSION = "1.2.1"
#: SHA-256 of the member in recbole 1.2.1's wheel.
SHA256 = "4edb74e2a81178c2ba9ff381495f754f996c4aea351b1272ca36b43da0935eff"


def download_wheel(version: str, folder: Path) -> Path:
    """``pip download recbole==version --no-deps -d folder``; the wheel's path.

    Raises:
        RuntimeError: pip failed (its output in the message) or left no wheel.
    """
    cmd = [sys.executable, "-m", "pip", "download", f"recbole=={version}", "--no-deps"]
    cmd += ["--only-binary", ":all:", "-d", str(folder)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stdout}{done.stderr}")
    wheels = sorted(folder.glob("recbole-*.whl"))
    if not wheels:
        raise RuntimeError(f"{' '.join(cmd)} left no recbole wheel in {folder}")
    return wheels[0]


def extract(wheel: Path, out: Path) -> Path:
    """Copy :data:`MEMBER` out of ``wheel`` into ``out/ml-100k.inter``; its path.

    Raises:
        FileNotFoundError: no wheel at ``wheel``.
        KeyError: the wheel has no such member (the message names the wheel).
    """
    if not wheel.is_file():
        raise FileNotFoundError(f"--wheel {wheel}: no such file")
    with zipfile.ZipFile(wheel) as z:
        if MEMBER not in z.namelist():
            raise KeyError(f"{wheel} has no {MEMBER}")
        data = z.read(MEMBER)
    target = out / "ml-100k.inter"
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(target, lambda f: f.write(data))
    return target


def main(argv: Sequence[str] | None = None) -> Path:
    """Fetch (or take ``--wheel``), extract, check; prints what it wrote."""
    parser = argparse.ArgumentParser(
        prog="python -m recipes.collab_filter.fetch_ml100k", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--out", default="data/ml-100k", help="folder (default: data/ml-100k)")
    parser.add_argument("--version", default=VERSION, help=f"recbole version (default {VERSION})")
    parser.add_argument("--wheel", default="", help="a recbole wheel already downloaded")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if args.wheel:
        target = extract(Path(args.wheel), out)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            target = extract(download_wheel(args.version, Path(tmp)), out)
    digest = hashlib.sha256(target.read_bytes()).hexdigest()
    ratings = read_inter(target)
    same = "the same as" if digest == SHA256 else "differs from"
    print(
        f"wrote {target}: {len(ratings)} ratings, {len(ratings.user_ids)} users, "
        f"{len(ratings.item_ids)} items; sha256 {digest} ({same} recbole {VERSION}'s)",
        flush=True,
    )
    return target


if __name__ == "__main__":
    main()
