"""Files: JSONL rows (gzip too, written atomically) and content hashes of rows and of model weights. The one home
of these helpers; torch-free, so config-level code may use them."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterable, Iterator


def open_text(path: str | Path, mode: str = "rt"):
    path = str(path)
    if path.endswith(".gz"):
        return gzip.open(path, mode, encoding="utf-8")
    return open(path, mode, encoding="utf-8")


def read_jsonl(path: str | Path) -> list[dict]:
    with open_text(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def iter_jsonl(path: str | Path) -> Iterator[dict]:
    with open_text(path) as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> int:
    """Write rows to a temporary name and rename: a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    n = 0
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    os.replace(tmp, path)
    return n


def weights_sha256(model_dir: str | Path) -> str:
    """Content hash of a checkpoint's weight files (safetensors/bin), so outputs name exactly what made them.

    For a hub id (no local folder) the id itself is hashed: the best we can do without downloading."""
    d = Path(model_dir)
    if not d.is_dir():
        return "hub:" + hashlib.sha256(str(model_dir).encode()).hexdigest()[:16]
    cache = d / ".weights_sha256"
    files = sorted(p for p in d.iterdir() if p.suffix in (".safetensors", ".bin") and p.is_file())
    stamp = ";".join(f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files)
    if cache.exists():
        saved_stamp, _, saved = cache.read_text().partition("\n")
        if saved_stamp == stamp:
            return saved.strip()
    h = hashlib.sha256()
    for p in files:
        h.update(p.name.encode())
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    digest = h.hexdigest()[:16]
    try:
        cache.write_text(stamp + "\n" + digest)
    except OSError:
        pass
    return digest


def content_hash(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16]


def sha256_file(path: str | Path) -> str:
    """The SHA-256 of a file's bytes (read in 1 MiB blocks): checkpoint manifests, stage markers, cache keys."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
