"""Typed experiment configs: one YAML per experiment, one dataclass per stage, `--key=value` overrides.

An experiment YAML has a section per stage (``sft:``, ``dpo:``, ...). Each section loads into the stage's
dataclass (defined beside the stage, e.g. ``prefopt.sft.config.SFTStageConfig``). Stages built on a TRL trainer
declare ``TRL_CONFIG`` (e.g. ``"trl.SFTConfig"``): keys of that TRL config that the dataclass does not define pass
through, type-checked against TRL's own field types, into ``section.trainer_args``.

Overrides from the command line: ``--sft.learning_rate=1e-5`` or ``--sft.learning_rate 1e-5`` (the form ``wandb
agent`` passes), and top-level keys as ``--seed=3``. Values are parsed as YAML (``--stages=[sft,dpo]``).

Errors (unknown key, wrong type, missing required value) raise ``ConfigError`` naming the key and listing the
valid ones.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml


class ConfigError(ValueError):
    """A config that cannot be used: names the key and what was expected."""


class FieldError(ValueError):
    """A section's `__post_init__` refusing one of its own fields; `from_dict` names it `section.field`."""

    def __init__(self, field: str, problem: str):
        self.field, self.problem = field, problem
        super().__init__(f"'{field}' {problem}")


# ---------------------------------------------------------------------------------------------------------------
# Declarative value checks, called from each section's __post_init__
# ---------------------------------------------------------------------------------------------------------------


def check_range(obj: Any, name: str, *, gt: float | None = None, ge: float | None = None, lt: float | None = None,
                le: float | None = None, finite: bool = True) -> None:
    """Refuse `obj.name` outside the given bounds (or NaN/inf, unless finite=False) with a FieldError.

    `check_range(self, "learning_rate", gt=0)` -> "sft.learning_rate: must be a finite number > 0, got nan"."""
    value = getattr(obj, name)
    if value is None:
        return
    bounds = [f"{op} {b:g}" for op, b in ((">", gt), (">=", ge), ("<", lt), ("<=", le)) if b is not None]
    want = " and ".join(bounds)
    if isinstance(value, float) and not math.isfinite(value):
        if finite or math.isnan(value):
            raise FieldError(name, f"must be a finite number{' ' + want if want else ''}, got {value}")
    ok = ((gt is None or value > gt) and (ge is None or value >= ge) and (lt is None or value < lt)
          and (le is None or value <= le))
    if not ok:
        raise FieldError(name, f"must be {want}, got {value}")


def check_ranges(obj: Any, **bounds: dict) -> None:
    """Several `check_range` calls: `check_ranges(self, beta=dict(gt=0), sft_weight=dict(ge=0))`."""
    for name, b in bounds.items():
        check_range(obj, name, **b)


def check_choice(obj: Any, name: str, choices) -> None:
    """Refuse a value that is not one of `choices` (for names kept as plain strings, e.g. schedulers)."""
    value = getattr(obj, name)
    if value not in choices:
        raise FieldError(name, f"must be one of {', '.join(map(str, choices))}; got {value!r}")


MISSING = dataclasses.MISSING


# ---------------------------------------------------------------------------------------------------------------
# Coercion of one value to a field type
# ---------------------------------------------------------------------------------------------------------------


def _number(tp: type, value: Any, key: str):
    """An int or float field's value: the number, an integral float for an int, or a string that reads as one
    (YAML 1.1 reads `1e-5`, with no dot, as a string); never a bool (YAML's true is not 1)."""
    what = "an integer" if tp is int else "a number"
    if not isinstance(value, bool):
        if isinstance(value, int) or (isinstance(value, float) and (tp is float or value.is_integer())):
            return tp(value)
        if isinstance(value, str):
            try:
                return tp(value)
            except ValueError:
                pass
    raise ConfigError(f"{key}: expected {what}, got {value!r}")


def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert ``value`` (from YAML or the command line) to type ``tp``, or raise ConfigError naming ``key``."""
    origin = get_origin(tp)
    if tp is Any or tp is object:
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(value, arg, key)
            except ConfigError as e:
                errors.append((arg, e))
        for arg, e in errors:  # a mapping meant for a section (`dpo.pairs: {path: ...}`): its own error names the key
            if isinstance(value, dict) and dataclasses.is_dataclass(arg):
                raise e
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        choices = get_args(tp)
        if value in choices:
            return value
        raise ConfigError(f"{key}: expected one of {list(choices)}, got {value!r}")
    if origin in (list, tuple):
        if isinstance(value, str) and origin is list:
            # `--stages=sft,dpo` from a shell is a comma-separated list
            value = [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item_tp, *rest) = get_args(tp) or (Any,)
        if origin is tuple and rest and rest[0] is not Ellipsis:
            return tuple(coerce(v, t, f"{key}[{i}]") for i, (v, t) in enumerate(zip(value, get_args(tp))))
        items = [coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        args = get_args(tp)
        if args:
            return {k: coerce(v, args[1], f"{key}.{k}") for k, v in value.items()}
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a section (mapping) for {tp.__name__}, got {value!r}")
        return from_dict(tp, value, key)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp in (int, float):
        return _number(tp, value, key)
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    if isinstance(tp, type) and issubclass(tp, (str, int, float)):  # enums such as TRL's SchedulerType
        try:
            return tp(value)
        except Exception as e:  # noqa: BLE001
            raise ConfigError(f"{key}: cannot read {value!r} as {tp.__name__}: {e}") from None
    return value


# ---------------------------------------------------------------------------------------------------------------
# Dataclass <-> dict
# ---------------------------------------------------------------------------------------------------------------


def _passthrough_fields(cls) -> dict[str, Any]:
    """Fields of the TRL config a stage passes through (name -> type), or {}."""
    target = getattr(cls, "TRL_CONFIG", None)
    if not target:
        return {}
    module, _, name = target.rpartition(".")
    trl_cls = getattr(importlib.import_module(module), name)
    hints = typing.get_type_hints(trl_cls)
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(trl_cls) if f.init}


def valid_keys(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if f.init and f.name != "trainer_args"]


def from_dict(cls, data: dict, where: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping, checking every key and type."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where or cls.__name__}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs: dict[str, Any] = {}
    passthrough: dict[str, Any] = {}
    trl_fields: dict[str, Any] | None = None
    for k, v in data.items():
        key = f"{where}.{k}" if where else str(k)
        if k in fields and k != "trainer_args":
            kwargs[k] = coerce(v, hints[k], key)
            continue
        if trl_fields is None:
            trl_fields = _passthrough_fields(cls)
        if k in trl_fields:
            passthrough[k] = coerce(v, trl_fields[k], key)
            continue
        msg = f"unknown key '{key}'. Valid keys{' in ' + where if where else ''}: {', '.join(sorted(valid_keys(cls)))}"
        if getattr(cls, "TRL_CONFIG", None):
            msg += f" (and any field of {cls.TRL_CONFIG})"
        raise ConfigError(msg)
    for name, f in fields.items():
        if name not in kwargs and f.default is MISSING and f.default_factory is MISSING:
            key = f"{where}.{name}" if where else name
            raise ConfigError(f"missing required key '{key}' ({_type_name(hints[name])})")
    if "trainer_args" in fields:
        kwargs["trainer_args"] = passthrough
    try:
        return cls(**kwargs)
    except FieldError as e:  # __post_init__ validation of one field: name it as the user writes it
        raise ConfigError(f"{where + '.' if where else ''}{e.field}: {e.problem}") from None
    except (ValueError, TypeError) as e:  # __post_init__ validation across fields
        raise ConfigError(f"{where or cls.__name__}: {e}") from None


def to_dict(obj: Any) -> Any:
    """Dataclass -> plain dict for YAML/JSON; passthrough TRL keys are flattened back beside the section's own."""
    if dataclasses.is_dataclass(obj):
        out = {}
        for f in dataclasses.fields(obj):
            if not f.init:
                continue
            v = getattr(obj, f.name)
            if f.name == "trainer_args":
                out.update({k: to_dict(x) for k, x in v.items()})
            else:
                out[f.name] = to_dict(v)
        return out
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "value") and not isinstance(obj, (str, int, float, bool)):  # enums
        return obj.value
    return obj


# ---------------------------------------------------------------------------------------------------------------
# Overrides and files
# ---------------------------------------------------------------------------------------------------------------


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """``["--sft.learning_rate=1e-5", "--seed", "3"]`` -> ``{"sft.learning_rate": 1e-5, "seed": 3}``."""
    out: dict[str, Any] = {}
    i = 0
    while i < len(args):
        a = args[i]
        if not a.startswith("--") or a == "--":
            raise ConfigError(f"expected an override like --section.key=value, got {a!r}")
        body = a[2:]
        if "=" in body:
            key, raw = body.split("=", 1)
        else:
            if i + 1 >= len(args) or args[i + 1].startswith("--"):
                raise ConfigError(f"override --{body} has no value (use --{body}=VALUE)")
            key, raw = body, args[i + 1]
            i += 1
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        out[key.replace("-", "_") if "." not in key else key] = value
        i += 1
    return out


def apply_overrides(data: dict, overrides: dict[str, Any]) -> dict:
    data = json.loads(json.dumps(data))  # deep copy of plain data
    for dotted, value in overrides.items():
        node = data
        *parents, leaf = dotted.split(".")
        for p in parents:
            if node.get(p) is None:
                node[p] = {}
            if not isinstance(node[p], dict):
                raise ConfigError(f"override --{dotted}: '{p}' is not a section")
            node = node[p]
        node[leaf] = value
    return data


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file not found: {path}")
    if not path.is_file():
        raise ConfigError(f"{path} is a directory, not a config file")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return data



def dump_yaml(obj: Any) -> str:
    return yaml.safe_dump(to_dict(obj), sort_keys=False, allow_unicode=True)
