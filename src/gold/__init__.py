"""Gold-reward tasks: a task writes its data files and scores any response with a program.

    task = get_task(cfg.task)          # TaskConfig: `name: sort|reverse|lookup` or `module: mypkg.mytask`
    task.make_data(cfg.task, seed)     # {"sft", "prompts", "val_prompts", "test_prompts", "preferences"} rows
    task.gold_score(example, response) # float in [0, 1]; `example` is the prompt row: {"input", "instruction", ...}

The gold scorer reads the task's input from the row (its `input` field, kept in the row's `meta` by the loaders),
never from the rendered prompt, so any prompt template or chat format scores the same.

A task of your own is a module (docs/tasks.md has a complete example) with either
  - the GoldTask parts (`name`, `instructions`, `sample_input`, `score`, `demo_mistake`, `response_pool`, see
    prefopt.gold.base), from which the files are built as for the built-in tasks; or
  - `make_data(cfg, seed) -> dict of rows` and `gold_score(example, response) -> float` written by hand.
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass
from typing import Any, Callable

BUILTIN = {"sort": "prefopt.gold.sort:SortTask", "reverse": "prefopt.gold.reverse:ReverseTask",
           "lookup": "prefopt.gold.lookup:LookupTask"}


class TaskError(ValueError):
    """A task module that cannot be used, or a gold score that is not a finite number: names module, function, row."""


@dataclass
class Task:
    """A loaded task: where it came from, its data builder and its checked gold scorer."""

    name: str
    source: str  # "prefopt.gold.sort:SortTask" or "mypkg.mytask"
    _make: Callable[[Any, int], dict]
    _score: Callable[[dict, str], float]

    def make_data(self, cfg, seed: int) -> dict[str, list[dict]]:
        data = self._make(cfg, seed)
        from prefopt.gold.base import FILES

        missing = [f for f in FILES if f not in data]
        if missing:
            raise TaskError(f"task {self.source}: make_data returned no {missing} (it must return {list(FILES)})")
        return data

    def gold_score(self, example: dict | str, response: str) -> float:
        """The gold score of `response` to the prompt row `example` (its `input`, or `meta.input`; a bare input
        string works too). Raises TaskError naming the task, the function and the row when the score is not a
        finite number."""
        row = example if isinstance(example, dict) else {"input": example}
        try:
            value = self._score(row, response)
        except TaskError:
            raise
        except Exception as e:  # noqa: BLE001 - a user's scorer may raise anything: say where
            raise TaskError(f"task {self.source}: gold_score failed on {_row_id(row)}: {type(e).__name__}: {e}") from e
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise TaskError(f"task {self.source}: gold_score returned {value!r} (not a number) for {_row_id(row)}") from None
        if not math.isfinite(value):
            raise TaskError(f"task {self.source}: gold_score returned {value} for {_row_id(row)}")
        return value


def _row_id(row: dict) -> str:
    pid = row.get("prompt_id") or (row.get("meta") or {}).get("prompt_id")
    return f"prompt {pid!r}" if pid else f"input {str(task_input(row))[:60]!r}"


def task_input(row: dict) -> str:
    """The task input of a prompt row: `input`, else `meta.input` (rows after the loaders)."""
    if isinstance(row.get("input"), str):
        return row["input"]
    meta = row.get("meta") or {}
    if isinstance(meta.get("input"), str):
        return meta["input"]
    raise TaskError(f"row {row.get('prompt_id', '')!r} has no task input (no `input` field): gold scoring needs the "
                    "task's own prompt rows")


def example(row: dict) -> dict:
    """The row a gold scorer or reward function reads: meta fields (instruction, input) + prompt_id + prompt."""
    out = dict(row.get("meta") or {})
    for k in ("prompt_id", "prompt", "instruction", "input"):
        if k in row and k not in out:
            out[k] = row[k]
    return out


def _from_parts(source: str, obj) -> Task:
    from prefopt.gold.base import build_data

    for part in ("name", "instructions", "sample_input", "score", "demo_mistake", "response_pool"):
        if not hasattr(obj, part):
            raise TaskError(f"task {source}: has no `{part}` (a GoldTask needs name, instructions, sample_input, "
                            "score, demo_mistake, response_pool; or define make_data and gold_score)")
    return Task(name=str(obj.name), source=source, _make=lambda cfg, seed: build_data(obj, cfg, seed),
                _score=lambda row, response: obj.score(task_input(row), response))


def _import(module: str):
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise TaskError(f"task module {module!r} cannot be imported: {e}") from None


def load_task(module: str) -> Task:
    """A user's task module (`mypkg.mytask`, or `mypkg.mytask:OBJECT` for a GoldTask object in it)."""
    mod_name, _, attr = module.partition(":")
    mod = _import(mod_name)
    if attr:
        if not hasattr(mod, attr):
            raise TaskError(f"task module {mod_name!r} has no {attr!r}")
        return _from_parts(module, getattr(mod, attr))
    if hasattr(mod, "make_data") or hasattr(mod, "gold_score"):
        for fn in ("make_data", "gold_score"):
            if not callable(getattr(mod, fn, None)):
                raise TaskError(f"task module {module!r} has no function `{fn}` (a task module defines make_data "
                                "and gold_score, or the GoldTask parts)")
        return Task(name=getattr(mod, "name", mod_name.rsplit(".", 1)[-1]), source=module,
                    _make=mod.make_data, _score=mod.gold_score)
    if hasattr(mod, "TASK"):
        return _from_parts(f"{module}:TASK", mod.TASK)
    return _from_parts(module, mod)


def get_task(spec) -> Task:
    """The task a TaskConfig (or a built-in name) names: `module` when set, else the built-in `name`."""
    if isinstance(spec, str):
        name, module = spec, ""
    else:
        name, module = spec.name, getattr(spec, "module", "")
    if module:
        return load_task(module)
    if name not in BUILTIN:
        raise TaskError(f"unknown task {name!r}; built-in tasks are {', '.join(BUILTIN)} (or set task.module)")
    mod, _, cls = BUILTIN[name].partition(":")
    return _from_parts(BUILTIN[name], getattr(importlib.import_module(mod), cls)())


def has_gold(task_cfg) -> bool:
    return bool(getattr(task_cfg, "module", "")) or task_cfg.name != "none"
