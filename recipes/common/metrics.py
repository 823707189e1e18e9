"""Metrics as JSON lines (one record per line, flushed as written) and CSV/JSON summaries.

The JSON-lines file stays readable whatever happens to the run: every record is
one complete line written and flushed at once, and :func:`read_jsonl` skips a
torn last line (a process killed mid-write). On resume the file is rewritten from
the records saved in the checkpoint, so records after the checkpoint are not
duplicated.

Under ``torchrun`` only rank 0 writes (:func:`recipes.common.parallel.is_writer`): the other
ranks hold the same values, and their writes here are skipped.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, BinaryIO

from recipes.common.parallel import is_writer

__all__ = [
    "MetricsLog",
    "read_jsonl",
    "remove_stale_temporaries",
    "training_time",
    "write_atomic",
    "write_csv",
    "write_json",
    "write_text_atomic",
]


class MetricsLog:
    """Append-only JSON-lines log of metric records.

    Args:
        path: the ``.jsonl`` file (``None``: keep the records in memory only, as the ranks
            other than 0 do).
        records: records already logged (from a checkpoint); the file is rewritten
            to hold exactly these before new ones are appended.
    """

    def __init__(
        self, path: str | os.PathLike[str] | None, records: Sequence[Mapping[str, Any]] = ()
    ):
        self.path = Path(path) if path is not None else None
        self.records: list[dict[str, Any]] = [dict(r) for r in records]
        self._file: io.TextIOWrapper | None = None
        self._closed = False
        if self.path is not None:
            write_text_atomic(self.path, "".join(_line(r) for r in self.records))
            self._file = self.path.open("a", encoding="utf-8")

    def append(self, record: Mapping[str, Any]) -> None:
        """Log one record (written and flushed immediately)."""
        if self._closed:
            raise ValueError(f"metrics log {self.path} is closed")
        self.records.append(dict(record))
        if self._file is not None:
            self._file.write(_line(record))
            self._file.flush()

    def close(self) -> None:
        """Flush to disk and close (idempotent)."""
        self._closed = True
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None

    def __enter__(self) -> MetricsLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _line(record: Mapping[str, Any]) -> str:
    return json.dumps(_jsonable(record), sort_keys=False) + "\n"


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def read_jsonl(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Records of a JSON-lines file; a torn (unterminated, unparsable) last line is skipped."""
    records = []
    lines = Path(path).read_text(encoding="utf-8").split("\n")
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:  # the last line, cut off by a kill mid-write
                break
            raise
    return records


def write_atomic(path: str | os.PathLike[str], write: Callable[[BinaryIO], object]) -> None:
    """Call ``write(file)`` on a temporary file beside ``path``, fsync, then ``os.replace``.

    A process killed at any moment leaves either the old file or the new one, never a
    torn one; the temporary file is removed if ``write`` fails. Under ``torchrun`` only
    rank 0 writes.
    """
    if not is_writer():
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # as open() would create it (mkstemp: 0600)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


#: Suffix of :func:`write_atomic`'s temporary files (``.<name>.<random>.tmp``).
TMP_SUFFIX = ".tmp"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def remove_stale_temporaries(folder: str | os.PathLike[str]) -> list[Path]:
    """Delete the temporary files a process killed mid-write (SIGKILL, power loss) left in
    ``folder`` (``.<name>.<random>.tmp`` beside ``<name>``); returns them. Called when a
    run starts (one writer per folder), never while another process writes there."""
    removed = []
    if is_writer() and Path(folder).is_dir():
        for tmp in Path(folder).glob(f".*{TMP_SUFFIX}"):
            if tmp.is_file():
                tmp.unlink(missing_ok=True)
                removed.append(tmp)
    return removed


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically (see :func:`write_atomic`)."""
    data = text.encode("utf-8")
    write_atomic(path, lambda f: f.write(data))


def write_json(path: str | os.PathLike[str], value: Any) -> None:
    """Write ``value`` as indented JSON, atomically."""
    write_text_atomic(path, json.dumps(_jsonable(value), indent=2) + "\n")


def write_csv(path: str | os.PathLike[str], rows: Iterable[Mapping[str, Any]]) -> None:
    """Write rows (dicts; the union of their keys, in first-seen order, is the header)."""
    rows = list(rows)
    header: list[str] = []
    for row in rows:
        header += [k for k in row if k not in header]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=header, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(path, buffer.getvalue())


def training_time(records: Iterable[Mapping[str, Any]]) -> float:
    """Seconds of training recorded in ``elapsed_s``, summed over resumed invocations."""
    total, last = 0.0, 0.0
    for record in records:
        elapsed = float(record.get("elapsed_s", 0.0))
        if elapsed < last:  # a resumed invocation restarted the clock
            total += last
        last = elapsed
    return total + last
