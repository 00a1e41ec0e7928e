"""Whether two runs of an experiment computed the same figures: every value in each stage's `summary.json`, times,
paths and `perf/*` (throughput) left out. For speed changes that must leave the results alone.

    python bench/compare_runs.py runs/before/quickstart runs/after/quickstart
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

SKIP = ("second", "perf", "time", "model", "path", "file", "dir", "resumed", "cache", "wandb", "run_id")


def flat(x, prefix: str = ""):
    if isinstance(x, dict):
        for k, v in x.items():
            yield from flat(v, f"{prefix}/{k}")
    elif isinstance(x, list):
        for i, v in enumerate(x):
            yield from flat(v, f"{prefix}[{i}]")
    else:
        yield prefix, x


def compare(a: Path, b: Path) -> tuple[int, list[str]]:
    """(figures compared, lines naming each difference or missing stage)."""
    n, diffs = 0, []
    for f in sorted(a.glob("*/summary.json")):
        g = b / f.parent.name / "summary.json"
        if not g.exists():
            diffs.append(f"{f.parent.name}: no summary.json in {b}")
            continue
        left, right = dict(flat(json.loads(f.read_text()))), dict(flat(json.loads(g.read_text())))
        for key, value in left.items():
            if any(s in key.lower() for s in SKIP):
                continue
            n += 1
            if right.get(key) != value:
                diffs.append(f"{f.parent.name}{key}: {value!r} != {right.get(key)!r}")
    return n, diffs


def main(argv=None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print(__doc__)
        return 2
    n, diffs = compare(Path(args[0]), Path(args[1]))
    print("\n".join(diffs[:50]))
    print(f"{n} figures compared, {len(diffs)} differ")
    return 1 if diffs else 0


if __name__ == "__main__":
    sys.exit(main())
