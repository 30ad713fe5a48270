"""The user's data files: where they are, and their rows.

`data.path` entries are files, folders (every .jsonl / .parquet file under them, sorted)
or globs. Rows come from JSONL (one JSON object per line) or Parquet (read a row group at a
time with pyarrow, so memory stays bounded). A row that cannot be used is never silently
dropped: it is counted by reason in a `SkipCounter`, or under `data.strict` raises a
one-line `DataError` naming the file and line (JSONL) or row (Parquet).
"""

from __future__ import annotations

import glob
import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from engine.config import expand_path

from .errors import DataError

ROW_FORMATS = (".jsonl", ".parquet")


class SkipCounter:
    """Bad rows and samples left out, by reason; under `strict` the first one is an error."""

    def __init__(self, strict: bool):
        self.strict, self.counts = strict, Counter()

    def skip(self, reason: str, where: str, why: str) -> None:
        if self.strict:
            raise DataError(f"{where}: {why} (data.strict=true; fix the row, or set data.strict=false to skip "
                            "and count such rows)")
        self.counts[reason] += 1


def expand_data_paths(entries: list[str], key: str = "data.path") -> list[Path]:
    """Files named by `entries` (files, folders, globs), in a stable order; each entry must
    name at least one file."""
    files: list[Path] = []
    for entry in entries:
        path = expand_path(str(entry))
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.suffix in ROW_FORMATS and p.is_file())
        elif path.is_file():
            found = [path]
        elif glob.has_magic(str(path)):
            found = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
        else:
            raise DataError(f"config key '{key}' entry {entry!r} does not exist: name a file, a folder or a glob")
        if not found:
            raise DataError(f"config key '{key}' entry {entry!r} holds no .jsonl or .parquet file: point it at the "
                            "data files")
        for f in found:
            if f.suffix not in ROW_FORMATS:
                raise DataError(f"config key '{key}' file {f} is neither .jsonl nor .parquet: convert it to one of "
                                "them")
        files.extend(found)
    return files


def work_units(path: Path, chunk_bytes: int) -> list[tuple[str, int, int]]:
    """How a file is split between processes: JSONL into byte ranges of about
    `chunk_bytes` (cut at line ends by the reader), Parquet into its row groups."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            groups = pq.ParquetFile(path).num_row_groups
        except Exception:  # unreadable: one unit that reports it
            return [(str(path), 0, -1)]
        return [(str(path), g, g + 1) for g in range(groups)] or [(str(path), 0, 0)]
    size = path.stat().st_size if path.is_file() else 0
    cuts = list(range(0, size, max(1, chunk_bytes))) + [size]
    return [(str(path), a, b) for a, b in zip(cuts[:-1], cuts[1:])] or [(str(path), 0, 0)]


def iter_unit(unit: tuple[str, int, int], skips: SkipCounter) -> Iterator[tuple[str, dict]]:
    """(where, row) for the rows of one work unit; `where` is `file:line` (JSONL) or
    `file row N` (Parquet) for messages. Unreadable files and malformed lines are skipped."""
    path, start, end = Path(unit[0]), unit[1], unit[2]
    if path.suffix == ".parquet":
        yield from _parquet_rows(path, start, end, skips)
    else:
        yield from _jsonl_rows(path, start, end, skips)


def _jsonl_rows(path: Path, start: int, end: int, skips: SkipCounter) -> Iterator[tuple[str, dict]]:
    """Lines that start in [start, end): a range owns the line that crosses its end."""
    try:
        f = open(path, "rb")
    except OSError as e:
        if start == 0:
            skips.skip("unreadable_file", str(path), f"cannot be read ({e.strerror})")
        return
    with f:
        if start > 0:
            f.seek(start - 1)
            if f.read(1) != b"\n":
                f.readline()  # the line in progress belongs to the previous range
        pos = f.tell()
        while pos < end:
            raw = f.readline()
            if not raw:
                break
            where = _LazyWhere(path, pos)  # the line number is counted only if a message needs it
            pos += len(raw)
            if not raw.strip():
                continue
            try:
                row = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                why = "is not UTF-8 text" if isinstance(e, UnicodeDecodeError) else f"is not valid JSON ({e.msg})"
                skips.skip("bad_json", where, why)
                continue
            if not isinstance(row, dict):
                skips.skip("bad_json", where, "is not a JSON object")
                continue
            yield where, row


class _LazyWhere:
    """`file:line`, counted only when a message needs it (rows are many, errors few)."""

    def __init__(self, path: Path, offset: int):
        self.path, self.offset = path, offset

    def __str__(self) -> str:
        return f"{self.path}:{_line_number(self.path, self.offset)}"

    def __format__(self, spec: str) -> str:
        return format(str(self), spec)


def _line_number(path: Path, offset: int) -> int:
    with open(path, "rb") as f:
        return f.read(offset).count(b"\n") + 1


def _parquet_rows(path: Path, first: int, last: int, skips: SkipCounter) -> Iterator[tuple[str, dict]]:
    import pyarrow.parquet as pq

    try:
        reader = pq.ParquetFile(path)
        groups = range(reader.num_row_groups) if last < 0 else range(first, last)
        number = sum(reader.metadata.row_group(g).num_rows for g in range(groups.start)) if len(groups) else 0
    except Exception as e:  # pyarrow raises ArrowInvalid / OSError for broken files
        skips.skip("unreadable_file", str(path), f"is not a readable Parquet file ({str(e).splitlines()[0][:100]})")
        return
    for group in groups:
        for row in reader.read_row_group(group).to_pylist():
            yield f"{path} row {number}", row
            number += 1
