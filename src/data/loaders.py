"""Format loaders: every supported file format -> one canonical row form.

    load_sft(spec, template)          -> rows {"prompt", "completion", "meta"}
    load_preferences(spec, template)  -> rows {"prompt", "chosen", "rejected", "meta"}
    load_prompts(spec, template)      -> rows {"prompt_id", "prompt", "meta"}

`prompt` is canonical (see templates.py): an Alpaca-rendered string or a list of chat messages. `meta` keeps the
original instruction/input where the format has them (AlpacaEval output rows need them).
A bad row raises DataError naming the file, the row and the field, unless `spec.skip_bad_rows` is set; then it
is counted in `LoadResult.skipped`. A dataset that ends up empty is always an error.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from prefopt.data.errors import DataError
from prefopt.data.spec import DatasetSpec
from prefopt.data.templates import make_prompt, messages_to_prompt
from prefopt.utils import content_hash, open_text


@dataclass
class LoadResult:
    path: str
    rows: list[dict]
    skipped: int = 0
    skipped_reasons: list[str] = field(default_factory=list)

    def __len__(self):
        return len(self.rows)


def read_records(path: str | Path) -> list[tuple[int, Any]]:
    """(row number, parsed object) for a JSON array file or a JSONL file (optionally gzipped).

    Row numbers are 1-based JSONL line numbers, or 1-based array indices for a JSON array."""
    path = Path(path)
    if not path.exists():
        raise DataError(path, None, None, "file not found")
    try:
        with open_text(path) as f:
            text = f.read()
    except UnicodeDecodeError as e:
        line = None
        try:
            raw = path.read_bytes()
            line = raw[: e.start].count(b"\n") + 1
        except Exception:  # noqa: BLE001
            pass
        raise DataError(path, line, None, f"not valid UTF-8 ({e.reason} at byte {e.start})") from None
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(path, None, None, f"invalid JSON array at line {e.lineno}: {e.msg}") from None
        return [(i + 1, row) for i, row in enumerate(data)]
    out = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            out.append((n, json.loads(line)))
        except json.JSONDecodeError as e:
            out.append((n, _BadJSON(e.msg)))
    return out


class _BadJSON:
    def __init__(self, msg: str):
        self.msg = msg


def _text(row: dict, key: str, path, n, required: bool = True, allow_empty: bool = False) -> str:
    if key not in row or row[key] is None:
        if required:
            raise DataError(path, n, key, "missing")
        return ""
    v = row[key]
    if not isinstance(v, str):
        raise DataError(path, n, key, f"expected a string, got {type(v).__name__}")
    if required and not allow_empty and not v.strip():
        raise DataError(path, n, key, "empty")
    return v


def detect_format(row: Any, kind: str) -> str:
    if not isinstance(row, dict):
        return "unknown"
    keys = set(row)
    if "conversations" in keys:
        return "sharegpt"
    if "messages" in keys:
        return "messages"
    if "instruction" in keys:
        return "alpaca"
    if kind == "preference" and {"chosen", "rejected"} <= keys and "prompt" not in keys:
        return "hh"
    if kind == "preference" and "prompt" in keys:
        return "preference"
    if "completion" in keys:
        return "prompt_completion"
    if "prompt" in keys:
        return "prompt"
    return "unknown"


def _load(spec: DatasetSpec, kind: str, parse: Callable[[dict, str, Any, int], dict], resolve=None) -> LoadResult:
    path = resolve(spec.path) if resolve else spec.path
    if not path:
        raise DataError("<config>", None, "path", "no dataset path given")
    records = read_records(path)
    result = LoadResult(path=str(path), rows=[])
    fmt = spec.format
    for n, row in records:
        try:
            if isinstance(row, _BadJSON):
                raise DataError(path, n, None, f"invalid JSON: {row.msg}")
            if not isinstance(row, dict):
                raise DataError(path, n, None, f"expected a JSON object, got {type(row).__name__}")
            row_fmt = detect_format(row, kind) if fmt == "auto" else fmt
            result.rows.append(parse(row, row_fmt, path, n))
        except DataError as e:
            if not spec.skip_bad_rows:
                raise
            result.skipped += 1
            if len(result.skipped_reasons) < 20:
                result.skipped_reasons.append(str(e))
        if spec.limit and len(result.rows) >= spec.limit:
            break
    if not result.rows:
        raise DataError(path, None, None, f"no usable rows ({result.skipped} skipped)")
    return result


# ------------------------------------------------------------------------------------------------ SFT


def _sft_row(template: str):
    def parse(row: dict, fmt: str, path, n) -> dict:
        if fmt == "alpaca":
            instruction = _text(row, "instruction", path, n)
            inp = _text(row, "input", path, n, required=False)
            return {
                "prompt": make_prompt(instruction, inp, template),
                "completion": _text(row, "output", path, n),
                "meta": {"instruction": instruction, "input": inp},
            }
        if fmt == "prompt_completion":
            prompt = _text(row, "prompt", path, n)
            return {"prompt": prompt, "completion": _text(row, "completion", path, n), "meta": {}}
        raise DataError(path, n, None, f"format '{fmt}' is not readable as SFT data here")

    return parse


def load_sft(spec: DatasetSpec, template: str = "alpaca", resolve=None) -> LoadResult:
    return _load(spec, "sft", _sft_row(template), resolve)


# ------------------------------------------------------------------------------------------------ preferences


def _pref_row(template: str):
    def parse(row: dict, fmt: str, path, n) -> dict:
        if fmt == "alpaca":
            instruction = _text(row, "instruction", path, n)
            inp = _text(row, "input", path, n, required=False)
            prompt = make_prompt(instruction, inp, template)
            meta = {"instruction": instruction, "input": inp}
        elif fmt == "preference":
            prompt = _text(row, "prompt", path, n)
            meta = {}
        else:
            raise DataError(path, n, None, f"format '{fmt}' is not readable as preference data here")
        chosen = _text(row, "chosen", path, n)
        rejected = _text(row, "rejected", path, n)
        return {"prompt": prompt, "chosen": chosen, "rejected": rejected, "meta": meta}

    return parse


def load_preferences(spec: DatasetSpec, template: str = "alpaca", resolve=None) -> LoadResult:
    return _load(spec, "preference", _pref_row(template), resolve)


# ------------------------------------------------------------------------------------------------ prompts


def _prompt_row(template: str):
    def parse(row: dict, fmt: str, path, n) -> dict:
        if fmt == "alpaca":
            instruction = _text(row, "instruction", path, n)
            inp = _text(row, "input", path, n, required=False)
            prompt = make_prompt(instruction, inp, template)
            meta = {"instruction": instruction, "input": inp}
        elif fmt in ("prompt", "prompt_completion", "preference"):
            prompt = _text(row, "prompt", path, n)
            meta = {}
        elif fmt == "messages":
            prompt = messages_to_prompt(row["messages"], template)
            meta = {}
        else:
            raise DataError(path, n, None, f"format '{fmt}' has no prompt here")
        pid = row.get("prompt_id") or row.get("id") or content_hash(prompt)
        return {"prompt_id": str(pid), "prompt": prompt, "meta": meta}

    return parse


def load_prompts(spec: DatasetSpec, template: str = "alpaca", resolve=None) -> LoadResult:
    return _load(spec, "prompt", _prompt_row(template), resolve)
