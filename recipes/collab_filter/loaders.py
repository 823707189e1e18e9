"""Readers for the published rating files, from a local path.

Every reader returns a :class:`Ratings` (one entry per rating, in file order) and checks
every line: a line with the wrong number of fields, a field that is not a number, a
rating outside the dataset's scale or a second rating of the same item by the same user
raises :class:`RatingsFormatError` naming the file and the line number (1-based, as an
editor shows it). Nothing is skipped silently.

Formats (``--format``, or ``auto`` from the file name):

* ``udata``: MovieLens-100K ``u.data``: ``user<TAB>item<TAB>rating<TAB>timestamp``;
* ``dat``: MovieLens-1M ``ratings.dat``: ``user::item::rating::timestamp``;
* ``inter``: RecBole's atomic file ``ml-100k.inter``: a header line
  ``user_id:token<TAB>item_id:token<TAB>rating:float<TAB>timestamp:float``, then
  tab-separated rows as in ``u.data`` (see :mod:`recipes.collab_filter.fetch_ml100k`);
* ``jester-csv``: a CSV export of Jester-1's ``jester-data-1.xls`` (no header): one row
  per user, the first column the number of jokes the user rated, then one column per
  joke, ratings in [-10, 10], ``99`` = not rated;
* ``jester-xls``: the published spreadsheet itself, read with the optional package
  ``xlrd`` (``pip install xlrd``); without it an ``ImportError`` names the package.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

__all__ = [
    "FORMATS",
    "JESTER_MISSING",
    "Ratings",
    "RatingsFormatError",
    "detect_format",
    "load_ratings",
]

#: Jester's code for "not rated".
JESTER_MISSING = 99.0
MOVIELENS_SCALE = (1.0, 5.0)
JESTER_SCALE = (-10.0, 10.0)
INTER_HEADER = ("user_id:token", "item_id:token", "rating:float", "timestamp:float")


class RatingsFormatError(ValueError):
    """A malformed line in a ratings file; the message names the file and line."""


@dataclass(frozen=True)
class Ratings:
    """Ratings as parallel arrays, one entry per rating in file order.

    Attributes:
        user: ``(n,)`` long, index into ``user_ids`` (users in order of first appearance).
        item: ``(n,)`` long, index into ``item_ids`` (items in order of first appearance).
        rating: ``(n,)`` float64.
        user_ids, item_ids: the ids as written in the file.
        scale: the rating scale ``(lowest, highest)`` of the dataset.
        source: where the ratings came from (a path, or a synthetic generator's name).
    """

    user: Tensor
    item: Tensor
    rating: Tensor
    user_ids: tuple[str, ...]
    item_ids: tuple[str, ...]
    scale: tuple[float, float]
    source: str

    def __len__(self) -> int:
        return int(self.rating.numel())


def detect_format(path: Path) -> str:
    """The format of ``path`` from its name (see the module docstring).

    Raises:
        ValueError: a name that says nothing about the format.
    """
    name = path.name.lower()
    if name.endswith(".inter"):
        return "inter"
    if name.endswith(".dat"):
        return "dat"
    if name.endswith(".xls"):
        return "jester-xls"
    if name.endswith(".csv"):
        return "jester-csv"
    if name == "u.data" or name.endswith(".data"):
        return "udata"
    raise ValueError(
        f"--data {path}: cannot tell the format from the file name; give --format "
        f"({', '.join(FORMATS)})"
    )


def load_ratings(path: str | Path, fmt: str = "auto") -> Ratings:
    """Read a ratings file (see the module docstring for the formats).

    Raises:
        FileNotFoundError: no file at ``path``.
        RatingsFormatError: a malformed line (file and line number in the message).
        ImportError: ``jester-xls`` without the optional package ``xlrd``.
        ValueError: an unknown format.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--data {path}: no such file")
    fmt = detect_format(path) if fmt == "auto" else fmt
    if fmt not in FORMATS:
        raise ValueError(f"--format: unknown format {fmt!r}; one of auto, {', '.join(FORMATS)}")
    return FORMATS[fmt](path)


class _Builder:
    """Collects ``(user, item, rating)`` triples with their line numbers and checks them."""

    def __init__(self, path: Path, scale: tuple[float, float]) -> None:
        self.path, self.scale = path, scale
        self.users: dict[str, int] = {}
        self.items: dict[str, int] = {}
        self.seen: dict[tuple[int, int], int] = {}
        self.u: list[int] = []
        self.i: list[int] = []
        self.r: list[float] = []

    def error(self, line: int, message: str) -> RatingsFormatError:
        return RatingsFormatError(f"{self.path}, line {line}: {message}")

    def number(self, text: str, line: int, what: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise self.error(line, f"{what} {text!r} is not a number") from None
        if not math.isfinite(value):
            raise self.error(line, f"{what} {text!r} is not finite")
        return value

    def add(self, user: str, item: str, rating: float, line: int) -> None:
        lo, hi = self.scale
        if not lo <= rating <= hi:
            raise self.error(line, f"rating {rating:g} is outside the scale [{lo:g}, {hi:g}]")
        if not user or not item:
            raise self.error(line, "empty user or item id")
        u = self.users.setdefault(user, len(self.users))
        i = self.items.setdefault(item, len(self.items))
        first = self.seen.setdefault((u, i), line)
        if first != line:
            raise self.error(line, f"user {user} rated item {item} already on line {first}")
        self.u.append(u)
        self.i.append(i)
        self.r.append(rating)

    def build(self) -> Ratings:
        if not self.r:
            raise RatingsFormatError(f"{self.path}: no ratings")
        return Ratings(
            user=torch.tensor(self.u, dtype=torch.long),
            item=torch.tensor(self.i, dtype=torch.long),
            rating=torch.tensor(self.r, dtype=torch.float64),
            user_ids=tuple(self.users),
            item_ids=tuple(self.items),
            scale=self.scale,
            source=str(self.path),
        )


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    with path.open(encoding="latin-1", newline="") as f:  # ML-1M's movie titles are latin-1
        for number, line in enumerate(f, 1):
            yield number, line.rstrip("\r\n")


def _read_separated(path: Path, sep: str, header: tuple[str, ...] | None = None) -> Ratings:
    """``user sep item sep rating sep timestamp`` lines (after ``header``, if given)."""
    builder = _Builder(path, MOVIELENS_SCALE)
    for number, line in _lines(path):
        if header is not None and number == 1:
            if tuple(line.split(sep)) != header:
                raise builder.error(number, f"expected the header {sep.join(header)!r}")
            continue
        fields = line.split(sep)
        if len(fields) != 4:
            raise builder.error(
                number, f"expected 4 {sep!r}-separated fields, found {len(fields)}: {line!r}"
            )
        user, item, rating, stamp = (f.strip() for f in fields)
        builder.number(stamp, number, "timestamp")
        builder.add(user, item, builder.number(rating, number, "rating"), number)
    return builder.build()


def read_udata(path: Path) -> Ratings:
    """MovieLens-100K ``u.data`` (tab-separated, no header)."""
    return _read_separated(path, "\t")


def read_dat(path: Path) -> Ratings:
    """MovieLens-1M ``ratings.dat`` (``::``-separated, no header)."""
    return _read_separated(path, "::")


def read_inter(path: Path) -> Ratings:
    """RecBole's ``ml-100k.inter`` (tab-separated, with its typed header line)."""
    return _read_separated(path, "\t", header=INTER_HEADER)


def _jester_rows(path: Path, rows: Iterable[tuple[int, list[str]]]) -> Ratings:
    """Jester-1's layout: the count of rated jokes, then one column per joke (99 = none)."""
    builder = _Builder(path, JESTER_SCALE)
    width = None
    for number, fields in rows:
        if width is None:
            width = len(fields)
            if width < 2:
                raise builder.error(number, "expected the count column and joke columns")
        if len(fields) != width:
            raise builder.error(number, f"expected {width} columns, found {len(fields)}")
        count = builder.number(fields[0], number, "the count of rated jokes")
        user = str(number)
        rated = 0
        for joke, text in enumerate(fields[1:], 1):
            value = builder.number(text, number, f"joke {joke}'s rating")
            if value == JESTER_MISSING:
                continue
            builder.add(user, str(joke), value, number)
            rated += 1
        if count != rated:
            raise builder.error(
                number, f"the first column says {count:g} rated jokes, the row has {rated}"
            )
    return builder.build()


def read_jester_csv(path: Path) -> Ratings:
    """A CSV export of ``jester-data-1.xls`` (no header; see the module docstring)."""
    with path.open(encoding="utf-8", newline="") as f:
        rows = [(n, [c.strip() for c in row]) for n, row in enumerate(csv.reader(f), 1)]
    return _jester_rows(path, rows)


def read_jester_xls(path: Path) -> Ratings:
    """The published ``jester-data-1.xls``, through the optional package ``xlrd``."""
    try:
        import xlrd
    except ImportError:
        raise ImportError(
            f"--data {path}: reading .xls needs the optional package 'xlrd' "
            "(pip install xlrd), or export the sheet to CSV and use --format jester-csv"
        ) from None
    sheet = xlrd.open_workbook(str(path)).sheet_by_index(0)
    rows = [(n + 1, [str(v) for v in sheet.row_values(n)]) for n in range(sheet.nrows)]
    return _jester_rows(path, rows)


FORMATS = {
    "udata": read_udata,
    "dat": read_dat,
    "inter": read_inter,
    "jester-csv": read_jester_csv,
    "jester-xls": read_jester_xls,
}
