"""Reading a JSON array or JSONL file (optionally gzipped) into numbered records: the one reader every loader,
data source and stage uses for prefopt's own files. Bad lines come back as `_BadRecord` so that `skip_bad_rows`
can skip just that line; whole-file problems are a DataError naming the file."""

from __future__ import annotations

import gzip
import json
import zlib
from pathlib import Path
from typing import Any

from prefopt.data.errors import DataError


class _BadRecord:
    """A JSONL line that could not be read; it becomes a DataError (or a skip) when the loader reaches it."""

    def __init__(self, problem: str):
        self.problem = problem


def _read_bytes(path: Path) -> bytes:
    if path.suffix != ".gz":
        return path.read_bytes()
    try:
        with gzip.open(path, "rb") as f:
            return f.read()
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(path, None, None, f"not a readable gzip file ({e})") from None


def read_records(path: str | Path) -> list[tuple[int, Any]]:
    """(row number, parsed object) for a JSON array file or a JSONL file (optionally gzipped).

    Row numbers are 1-based JSONL line numbers, or 1-based array indices for a JSON array. A JSONL line that is not
    valid UTF-8 or JSON comes back as a bad record, so that `skip_bad_rows` can skip just that line."""
    path = Path(path)
    if path.is_dir():
        raise DataError(path, None, None, "is a directory, not a data file (name a .json/.jsonl file inside it)")
    if not path.is_file():
        raise DataError(path, None, None, "file not found")
    raw = _read_bytes(path)
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    if raw.lstrip().startswith(b"["):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            line = raw[: e.start].count(b"\n") + 1
            raise DataError(path, None, None, f"not valid UTF-8 at line {line} ({e.reason})") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(path, None, None, f"invalid JSON array at line {e.lineno}: {e.msg}") from None
        except RecursionError:
            raise DataError(path, None, None, "JSON nested too deeply to read") from None
        return [(i + 1, row) for i, row in enumerate(data)]
    if raw.lstrip().startswith(b"{") and raw.strip().count(b"\n"):
        try:  # one pretty-printed object (e.g. {"data": [...]}) rather than one object per line
            whole = json.loads(raw)
        except (ValueError, RecursionError):
            whole = None
        if isinstance(whole, dict):
            raise DataError(path, None, None, f"is one JSON object (keys {sorted(whole)[:5]}), not rows: expected a "
                            "JSON array of rows or one JSON object per line (JSONL)")
    out: list[tuple[int, Any]] = []
    for n, line in enumerate(raw.split(b"\n"), start=1):
        if not line.strip():
            continue
        try:
            out.append((n, json.loads(line.decode("utf-8"))))
        except UnicodeDecodeError as e:
            out.append((n, _BadRecord(f"not valid UTF-8 ({e.reason} at byte {e.start} of the line)")))
        except json.JSONDecodeError as e:
            out.append((n, _BadRecord(f"invalid JSON: {e.msg}")))
        except RecursionError:
            out.append((n, _BadRecord("JSON nested too deeply to read")))
    return out


def json_object(path, n: int, rec: Any) -> dict:
    """Record n of `path` as the JSON object a row must be: DataError (file, row) for a line that could not be read
    or a value of another type."""
    if isinstance(rec, _BadRecord):
        raise DataError(path, n, None, rec.problem)
    if not isinstance(rec, dict):
        raise DataError(path, n, None, f"expected a JSON object, got {type(rec).__name__}")
    return rec
