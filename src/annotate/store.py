"""Where labels go: one complete JSON line per label, appended atomically; what an annotator has already done.

Two files, so that the `reward` and `dpo` stages can read the main one as it is:
  OUT                          A/B labels as preference rows: {"prompt", "chosen", "rejected", "label", "annotator",
                               "pair_id", "shown_order", "chosen_source", "time", "source"}; load_preferences reads
                               it (format `preference`, extra keys ignored)
  OUT's stem + .ties_skips.jsonl   ties and skips: {"prompt", "answer_a", "answer_b", "label": "tie" | "skip", ...};
                               no chosen/rejected, so no stage can mistake them for preferences

Why a side file and not a label field in OUT: the loaders take every row of a preference file, and a tie has no
chosen answer; a row that some readers must skip is a row some reader will one day train on.

Atomic append: the whole line is encoded first and written with one os.write on an O_APPEND descriptor while an
exclusive flock is held, then fsync'd before the page moves on. Readers never see half a line, two pages on the
same file never interleave, and a short write (disk full) is cut back off the file before the error is raised.
"""

from __future__ import annotations

import fcntl
import json
import os
import threading
from collections import Counter, defaultdict
from pathlib import Path

from prefopt.data.errors import DataError

PREFERENCE_LABELS = ("A", "B")
OTHER_LABELS = ("tie", "skip")
LABELS = PREFERENCE_LABELS + OTHER_LABELS


def side_path(out: str | Path) -> Path:
    """`labels.jsonl` -> `labels.ties_skips.jsonl` (ties and skips)."""
    out = Path(out)
    stem = out.name[: -len(".jsonl")] if out.name.endswith(".jsonl") else out.name
    return out.with_name(stem + ".ties_skips.jsonl")


def append_line(path: str | Path, row: dict) -> None:
    """Append `row` as one JSON line: a single write under an exclusive lock, then fsync; never a partial line."""
    data = (json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # released by close
        size = os.fstat(fd).st_size
        written = os.write(fd, data)
        if written != len(data):
            os.ftruncate(fd, size)
            raise OSError(f"{path}: short write ({written} of {len(data)} bytes); the line was removed")
        os.fsync(fd)
    finally:
        os.close(fd)


def read_labels(path: str | Path) -> list[dict]:
    """The label rows of a file written by append_line ([] if absent); DataError on a line that is not a whole
    JSON object, so the page never appends after a damaged file."""
    path = Path(path)
    if not path.exists():
        return []
    raw = path.read_bytes()
    if raw and not raw.endswith(b"\n"):
        n = raw.count(b"\n") + 1
        raise DataError(path, n, None, "the last line is incomplete (no newline): repair or remove it first")
    rows = []
    for n, line in enumerate(raw.split(b"\n")[:-1], start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise DataError(path, n, None, f"not a JSON line ({e})") from None
        if not isinstance(row, dict):
            raise DataError(path, n, None, f"expected a JSON object, got {type(row).__name__}")
        rows.append(row)
    return rows


class LabelStore:
    """The two label files of one page, the pairs each annotator has already labelled, and how many labels of
    each kind each annotator gave (both read once at start, then kept up to date by `record`)."""

    def __init__(self, out: str | Path):
        self.out, self.side = Path(out), side_path(out)
        self._lock = threading.Lock()  # gradio runs handlers in threads; flock alone orders processes
        self._done: dict[str, set[str]] = defaultdict(set)
        self._counts: Counter[tuple[str, str]] = Counter()  # (annotator, label) -> labels in the files
        for path in (self.out, self.side):
            for row in read_labels(path):
                if isinstance(row.get("annotator"), str) and isinstance(row.get("pair_id"), str):
                    self._done[row["annotator"]].add(row["pair_id"])
                    if row.get("label") in LABELS:
                        self._counts[row["annotator"], row["label"]] += 1
        self.out.parent.mkdir(parents=True, exist_ok=True)

    def counts(self) -> dict[str, dict[str, int]]:
        """{annotator: {"A": n, "B": n, "tie": n, "skip": n}} over both files, earlier sessions included."""
        with self._lock:
            out: dict[str, dict[str, int]] = {}
            for (annotator, label), n in sorted(self._counts.items()):
                out.setdefault(annotator, dict.fromkeys(LABELS, 0))[label] = n
            return out

    def done(self, annotator: str) -> set[str]:
        with self._lock:
            return set(self._done.get(annotator, ()))

    def record(self, row: dict) -> bool:
        """Append a label row unless this annotator already labelled this pair (a double click, a second tab);
        True if it was written."""
        if row["label"] not in LABELS:
            raise ValueError(f"unknown label {row['label']!r}")
        with self._lock:
            done = self._done[row["annotator"]]
            if row["pair_id"] in done:
                return False
            append_line(self.out if row["label"] in PREFERENCE_LABELS else self.side, row)
            done.add(row["pair_id"])
            self._counts[row["annotator"], row["label"]] += 1
            return True
