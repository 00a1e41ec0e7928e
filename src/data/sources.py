"""Where a dataset's rows come from, handed to the loaders one record at a time.

    rows = open_rows(spec, resolve)          # spec: a DatasetSpec
    for part, n, record in rows: ...         # n: the row's 1-based number in its part (what errors name)

A source is one of:

- a JSON array or JSONL file (.json / .jsonl, optionally gzipped): prefopt's own reader (`read_records`), whose
  errors name the line;
- a parquet, Arrow, CSV or TSV file, a `save_to_disk` folder, a folder laid out as a Hub dataset repo
  (data/train-*.parquet beside a README.md card), or a Hub dataset id: read through `datasets` as memory-mapped
  Arrow, so each row becomes a Python dict only when the loader reaches it and a 60K-row set is not held in memory
  a second time. A Hub id is read from the local HF cache when the Hub cannot be reached (`datasets` falls back to
  the cache; HF_HUB_OFFLINE=1 goes there at once);
- a mixture of those (`DatasetSpec.mixture`, as alignment-handbook's dataset_mixture): each part gives a seeded
  random `weight` fraction of its rows, and the parts' rows come in one seeded shuffled order.

`columns` selects (and renames) a dataset's columns before the formats see a record; an error in a renamed field
names the column as the dataset calls it. A split or column that does not exist is a ConfigError listing the ones
that do; a Hub id that is neither cached nor reachable is a DataError naming it.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from prefopt.config import ConfigError
from prefopt.data.errors import DataError
from prefopt.data.records import read_records
from prefopt.data.spec import DatasetSpec, MixturePart, is_json_file
from prefopt.dist.process import is_main_process

DATASET_SUFFIXES = (".parquet", ".arrow", ".csv", ".tsv")


def is_hub_id(path: str) -> bool:
    """Whether `path` has the form of a Hub dataset id (`name` or `owner/name`) and no local file's marks (a data
    file suffix, a leading `/`, `.` or `~`). Says nothing about whether the dataset exists: nothing is fetched."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if (not path or path.startswith(("/", ".", "~", "stage:")) or is_json_file(path)
            or path.lower().endswith(DATASET_SUFFIXES)):
        return False
    try:
        validate_repo_id(path)
    except HFValidationError:
        return False
    return True


def is_dataset_folder(p: Path) -> bool:
    """Whether folder `p` holds a `datasets` dataset: one `save_to_disk` wrote, or a Hub repo's layout (a README.md
    card, or data files at the top or under data/), rather than a stage folder with its own files."""
    if (p / "state.json").is_file() or (p / "dataset_dict.json").is_file() or (p / "README.md").is_file():
        return True
    return any(f.suffix.lower() in DATASET_SUFFIXES for d in (p, p / "data") if d.is_dir() for f in d.iterdir())


def check_problem(path: str) -> tuple[str, str] | None:
    """What `prefopt check` says about a dataset path, without reading or downloading it: ("problem", text),
    ("missing", text with a `{here}` slot: a file not on this machine, which `checks` words for where the run
    is) or None (a `stage:` reference, an existing file or dataset folder, or a Hub id)."""
    if not path or path.startswith("stage:"):
        return None
    p = Path(path).expanduser()
    if p.is_dir():
        if is_json_file(path) or not is_dataset_folder(p):
            return "problem", f"{path!r} is a directory, not a data file"
        return None  # a save_to_disk folder or a Hub-repo layout: what `datasets` finds in it is seen at run time
    if p.exists() or is_hub_id(path):
        return None  # a Hub id is checked for its form only: `check` downloads nothing
    extra = "" if is_json_file(path) or path.lower().endswith(DATASET_SUFFIXES) else \
        "; nor has it the form of a Hub dataset id (owner/name)"
    return "missing", f"file {path!r} does not exist{{here}}{extra}"


# ------------------------------------------------------------------------------------------------ one source


class _DatasetRows:
    """A `datasets.Dataset` as (row number, record) pairs: random access for a mixture's draws, or in order."""

    def __init__(self, ds):
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> tuple[int, dict]:
        return i + 1, self.ds[i]

    def __iter__(self) -> Iterator[tuple[int, dict]]:
        return enumerate(self.ds, start=1)  # Arrow batches, one dict at a time


@dataclass
class Part:
    """One source of rows: its label (what errors and counts name), its rows, and how a record is read."""

    label: str
    rows: Sequence  # (row number, record) pairs
    columns: dict | list
    format: str
    field_prefix: str
    weight: float = 1.0
    taken: int = 0
    kept: int = 0

    def record(self, rec: Any) -> Any:
        """`rec` with `columns` applied: only the named columns, under the fields the formats read."""
        if not self.columns or not isinstance(rec, dict):
            return rec
        if isinstance(self.columns, list):
            return {c: rec[c] for c in self.columns if c in rec}
        return {f: rec[c] for f, c in self.columns.items() if c in rec}

    def column(self, field: str | None) -> str | None:
        """A canonical field name in an error (`prompt[0].content`) as the dataset names it (`question[0].content`)."""
        if not field or not isinstance(self.columns, dict):
            return field
        head, rest = re.match(r"([^.\[]*)(.*)", field).groups()
        return self.columns[head] + rest if head in self.columns else field


def _label(path: str, name: str, split: str, hub_or_folder: bool) -> str:
    out = path
    if name:
        out += f", config {name}"
    if hub_or_folder or split:
        out += f", split {split or 'train'}"
    return out


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def _check_split(label: str, split: str, known: list[str], key: str = "split") -> None:
    """Refuse a split (or the names in `train+test` / `train[:100]`) that the dataset does not have."""
    if not known:
        return
    for want in re.split(r"\+", split):
        base = want.split("[", 1)[0].strip()
        if base not in known:
            raise ConfigError(f"{label}: no split {base!r} (`{key}`); the splits it has: {', '.join(known)}")


def _from_builder(path: str, label: str, name: str, split: str, revision: str, hub: bool, **kw):
    """A split through a `datasets` builder (what load_dataset does), with the split checked before any data is
    prepared, and a Hub id that cannot be had named in one line."""
    import datasets

    try:
        builder = datasets.load_dataset_builder(path, name or None, revision=revision or None, **kw)
    except OSError as e:  # ConnectionError (offline, no network), FileNotFoundError (no such repo or folder), HTTP
        if hub:
            offline = "HF_HUB_OFFLINE is set" if datasets.config.HF_HUB_OFFLINE else _one_line(e)
            raise DataError(path, None, None, f"no local file or folder of that name, and as a Hub dataset id it is "
                            f"neither in the local cache ({datasets.config.HF_DATASETS_CACHE}) nor reachable "
                            f"({offline})") from None
        raise DataError(path, None, None, f"cannot be read as a dataset: {_one_line(e)}") from None
    except ValueError as e:  # a config name it does not have, and datasets' other refusals of the arguments
        what = f"config {name!r}: " if name else ""
        raise ConfigError(f"{label}: {what}{_one_line(e)}") from None
    known = list(builder.info.splits or {}) or list(builder.config.data_files or {})
    _check_split(label, split or "train", known)
    builder.download_and_prepare()
    # Arrow's allocator keeps what preparing (parquet -> Arrow cache) freed: 57 MB on a 60K-row parquet, more
    # than the rows themselves take later. Handed back, loading a parquet set peaks below its JSONL copy.
    import pyarrow

    pyarrow.default_memory_pool().release_unused()
    return builder.as_dataset(split=split or "train")  # memory-mapped Arrow, not loaded into RAM


def _from_disk(path: Path, label: str, split: str):
    """A folder `save_to_disk` wrote: one Dataset, or a DatasetDict whose `split` is taken."""
    import datasets

    obj = datasets.load_from_disk(str(path))
    if isinstance(obj, datasets.DatasetDict):
        _check_split(label, split or "train", list(obj))
        return obj[split or "train"]
    if split and split != str(obj.split or "train"):
        raise ConfigError(f"{label}: this save_to_disk folder holds one dataset (split {str(obj.split or 'train')!r}), "
                          f"not a dataset dict: drop `split` or name that one")
    return obj


def _from_file(path: Path, label: str, split: str):
    import datasets

    suffix = path.suffix.lower()
    if suffix == ".arrow":
        _check_split(label, split or "train", ["train"])
        try:
            return datasets.Dataset.from_file(str(path))  # datasets' own Arrow stream files: mapped where they lie
        except Exception:  # noqa: BLE001 - an Arrow IPC *file* (Feather v2): through the builder, which reads both
            pass
    module = {".parquet": "parquet", ".arrow": "arrow", ".csv": "csv", ".tsv": "csv"}[suffix]
    kw = {"sep": "\t"} if suffix == ".tsv" else {}
    return _from_builder(module, label, "", split, "", hub=False, data_files={"train": [str(path.resolve())]}, **kw)


def open_part(src: DatasetSpec | MixturePart, resolve: Callable[[str], str] | None = None) -> Part:
    """One source's rows: a file, a dataset folder or a Hub id (see the module docstring)."""
    path = resolve(src.path) if resolve else src.path
    if not path:
        raise DataError("<config>", None, "path", "no dataset path given")
    path = str(path)
    p = Path(path).expanduser()
    part = Part(label=path, rows=(), columns=src.columns, format=src.format, field_prefix=src.field_prefix,
                weight=getattr(src, "weight", 1.0))
    if (is_json_file(path) or (p.is_file() and p.suffix.lower() not in DATASET_SUFFIXES)
            or (p.is_dir() and not is_dataset_folder(p))):
        part.rows = read_records(path)  # as before: any other file is read as JSON or JSONL; a plain folder refused
        return part
    if p.is_dir():
        part.label = _label(path, src.name, src.split, True)
        if (p / "state.json").is_file() or (p / "dataset_dict.json").is_file():
            ds = _from_disk(p, part.label, src.split)
        else:  # a local copy of a Hub dataset repo: data files found by datasets' own rules, its card's configs
            ds = _from_builder(str(p), part.label, src.name, src.split, "", hub=False)
    elif p.is_file():
        part.label = _label(path, "", src.split, False)
        ds = _from_file(p, part.label, src.split)
    elif is_hub_id(path):
        part.label = _label(path, src.name, src.split, True)
        ds = _from_builder(path, part.label, src.name, src.split, src.revision, hub=True)
    else:
        raise DataError(path, None, None, "file not found")
    part.rows = _DatasetRows(_select_columns(ds, src.columns, part.label))
    return part


def _select_columns(ds, columns: dict | list, label: str):
    if not columns:
        return ds
    wanted = list(columns.values()) if isinstance(columns, dict) else list(columns)
    for c in wanted:
        if c not in ds.column_names:
            key = next((f"columns.{f}" for f, v in columns.items() if v == c), "columns") \
                if isinstance(columns, dict) else "columns"
            raise ConfigError(f"{label}: no column {c!r} (`{key}`); the columns it has: {', '.join(ds.column_names)}")
    return ds.select_columns(list(dict.fromkeys(wanted)))  # no copy: the same mapped table, fewer columns


# ------------------------------------------------------------------------------------------------ spec -> rows


class Rows:
    """The records of a DatasetSpec: one part, or a mixture's parts in their drawn, shuffled order.

    Iterating yields (part, row number, record) with `columns` applied; `label` names the whole for messages."""

    def __init__(self, parts: list[Part], order: list[tuple[int, int]] | None, label: str):
        self.parts, self.order, self.label = parts, order, label

    @property
    def is_mixture(self) -> bool:
        return self.order is not None

    def __iter__(self) -> Iterator[tuple[Part, int, Any]]:
        if self.order is None:
            part = self.parts[0]
            for n, rec in part.rows:
                yield part, n, part.record(rec)
            return
        for i, j in self.order:
            part = self.parts[i]
            n, rec = part.rows[j]
            yield part, n, part.record(rec)


def mixture_order(sizes: list[int], weights: list[float], seed: int) -> list[tuple[int, int]]:
    """(part, row index) pairs: int(size x weight) rows drawn at random from each part (all of a part with
    weight 1), then all of them shuffled, both with `seed` (alignment-handbook: shuffle(seed).select(range(k)) per
    dataset, then a shuffle of the concatenation)."""
    rng = random.Random(seed)
    order = []
    for i, (n, w) in enumerate(zip(sizes, weights)):
        k = n if w >= 1 else int(n * w)
        order += [(i, j) for j in (range(n) if k == n else sorted(rng.sample(range(n), k)))]
    rng.shuffle(order)
    return order


def open_rows(spec: DatasetSpec, resolve: Callable[[str], str] | None = None) -> Rows:
    if not spec.mixture:
        part = open_part(spec, resolve)
        return Rows([part], None, part.label)
    parts = [open_part(p, resolve) for p in spec.mixture]
    order = mixture_order([len(p.rows) for p in parts], [p.weight for p in parts], spec.seed)
    for i, part in enumerate(parts):
        part.taken = sum(1 for k, _ in order if k == i)
    return Rows(parts, order, "mixture of " + " + ".join(p.label for p in parts))


def report_mixture(rows: Rows) -> list[dict]:
    """Each part's figures (label, weight, rows available, drawn, kept after the checks); printed once (rank 0)."""
    out = [{"source": p.label, "weight": p.weight, "available": len(p.rows), "drawn": p.taken, "kept": p.kept}
           for p in rows.parts]
    if is_main_process():
        lines = [f"  {d['kept']:,} from {d['source']} (weight {d['weight']:g}: {d['drawn']:,} of {d['available']:,} "
                 "drawn)" for d in out]
        print(f"[data] mixture of {len(out)} parts, {sum(d['kept'] for d in out):,} rows:\n" + "\n".join(lines),
              flush=True)
    return out
