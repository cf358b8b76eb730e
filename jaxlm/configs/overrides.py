"""Typed `a.b=value` overrides on nested frozen dataclasses; loading configs by name or file."""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import importlib.util
import math
import traceback
import types
import typing
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

from jaxlm.configs.model import ModelConfig
from jaxlm.configs.presets import PRESETS, default_job, get_preset
from jaxlm.configs.run import RunConfig
from jaxlm.files import read_json

T = TypeVar("T")

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}
_NONE = {"none", "null"}


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    return "None" if tp is type(None) else getattr(tp, "__name__", str(tp))


def convert(raw: Any, tp: Any, key: str) -> Any:
    """`raw` (a string from the command line, or a JSON value) as a value of type `tp`.
    Surrounding spaces are dropped except for string fields (`train.sample_prompt="def "`)."""
    if isinstance(raw, str) and tp is not str:
        raw = raw.strip()
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        options = typing.get_args(tp)
        if type(None) in options and (
            raw is None or (isinstance(raw, str) and raw.lower() in _NONE)
        ):
            return None
        for option in options:
            if option is type(None):
                continue
            try:
                return convert(raw, option, key)
            except ValueError:
                pass
        raise ValueError(f"{key}={raw!r}: expected {_type_name(tp)}")
    if origin is Literal:
        for allowed in typing.get_args(tp):
            if raw == allowed or (isinstance(raw, str) and raw == str(allowed)):
                return allowed
        raise ValueError(f"{key}={raw!r}: expected {_type_name(tp)}")
    if tp is bool:
        if isinstance(raw, bool):
            return raw
        if isinstance(raw, str) and raw.lower() in _TRUE | _FALSE:
            return raw.lower() in _TRUE
        raise ValueError(f"{key}={raw!r}: expected a bool (true/false)")
    if tp is int:
        if isinstance(raw, int) and not isinstance(raw, bool):
            return raw
        if isinstance(raw, str):
            try:
                return int(raw.replace("_", ""))
            except ValueError:
                pass
        raise ValueError(f"{key}={raw!r}: expected an int")
    if tp is float:
        value = None
        if isinstance(raw, (int, float)) and not isinstance(raw, bool):
            value = float(raw)
        elif isinstance(raw, str):
            with contextlib.suppress(ValueError):
                value = float(raw.replace("_", ""))
        if value is None:
            raise ValueError(f"{key}={raw!r}: expected a float")
        if not math.isfinite(value):
            raise ValueError(f"{key}={raw!r}: expected a finite float")
        return value
    if tp is str:
        if isinstance(raw, str):
            return raw
        raise ValueError(f"{key}={raw!r}: expected a string")
    if dataclasses.is_dataclass(tp):
        if isinstance(raw, dict):
            return from_dict(tp, raw, prefix=f"{key}.")
        if not isinstance(raw, str):  # from a JSON file
            return from_dict(tp, raw, prefix=f"{key}.")  # raises, naming the section
        raise ValueError(f"{key} is a section; set one of its fields, e.g. {key}.<field>=value")
    raise TypeError(f"{key}: unsupported config field type {tp!r}")


def leaf_keys(cls: type, prefix: str = "") -> list[str]:
    """Every settable dotted key of dataclass `cls`."""
    keys = []
    hints = typing.get_type_hints(cls)
    for name in (f.name for f in dataclasses.fields(cls) if f.init):
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            keys += leaf_keys(tp, f"{prefix}{name}.")
        else:
            keys.append(prefix + name)
    return keys


def _unknown(key: str, root: type) -> ValueError:
    keys = leaf_keys(root)
    close = difflib.get_close_matches(key, keys, n=3, cutoff=0.6)
    if not close:  # a misspelt section still has a recognisable last part
        last = key.rsplit(".", 1)[-1]
        close = [
            k for k in keys if difflib.get_close_matches(last, [k.rsplit(".", 1)[-1]], 1, 0.75)
        ]
    hint = f" Did you mean {' or '.join(close[:3])}?" if close else ""
    return ValueError(f"unknown config key {key!r}.{hint} Valid keys: {', '.join(keys)}")


def _set(config: T, path: Sequence[str], raw: Any, full_key: str, root: type) -> T:
    fields = {f.name for f in dataclasses.fields(config) if f.init}  # type: ignore[arg-type]
    name = path[0]
    if name not in fields:
        raise _unknown(full_key, root)
    tp = typing.get_type_hints(type(config))[name]
    if len(path) == 1:
        value = convert(raw, tp, full_key)
    elif dataclasses.is_dataclass(tp):
        value = _set(getattr(config, name), path[1:], raw, full_key, root)
    else:
        raise _unknown(full_key, root)
    # Fields the config derived from others are derived again, unless this override sets them.
    rederive = {f: None for f in getattr(config, "derived_fields", ()) if f != name}
    try:
        return dataclasses.replace(config, **rederive, **{name: value})  # type: ignore[type-var]
    except ValueError as e:
        raise ValueError(f"{full_key}={raw!r}: {e}") from None


def apply_overrides(config: T, overrides: Iterable[str]) -> T:
    """`config` with each "a.b=value" applied in order, values converted to the field's type."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"override {item!r} must look like key.path=value")
        config = _set(config, key.split("."), raw, key, type(config))
    return config


def to_dict(config: Any) -> dict[str, Any]:
    """A JSON-ready dict of a (nested) config dataclass (constructor fields only)."""
    out = {}
    for f in dataclasses.fields(config):
        if f.init:
            value = getattr(config, f.name)
            out[f.name] = to_dict(value) if dataclasses.is_dataclass(value) else value
    return out


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Rebuild dataclass `cls` from `to_dict` output, type-checking every value."""
    if not isinstance(data, dict):
        where = f"{prefix[:-1]!r}" if prefix else "a config"
        raise ValueError(
            f"{where} must be a JSON object of {cls.__name__}'s fields, got {type(data).__name__}"
        )
    hints = typing.get_type_hints(cls)
    unknown = set(data) - {f.name for f in dataclasses.fields(cls) if f.init}
    if unknown:
        raise _unknown(prefix + sorted(unknown)[0], cls)
    return cls(**{k: convert(v, hints[k], prefix + k) for k, v in data.items()})


def load_python_file(path: str | Path) -> types.ModuleType:
    """Run a Python config/sweep file as a module of its own and return it."""
    path = Path(path)
    module_spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(module_spec)  # type: ignore[arg-type]
    try:
        module_spec.loader.exec_module(module)  # type: ignore[union-attr]
    except SyntaxError as e:
        raise ValueError(f"{path}:{e.lineno}: {e.msg} (the file is not valid Python)") from None
    except Exception as e:
        raise ValueError(f"{path}: running it failed: {_where(e, path)}") from e
    return module


def _where(e: BaseException, path: Path) -> str:
    """`e` as "line N: Type: message", N the deepest line of `path` in its traceback."""
    lines = [f.lineno for f in traceback.extract_tb(e.__traceback__) if Path(f.filename) == path]
    at = f"line {lines[-1]}: " if lines else ""
    return f"{at}{type(e).__name__}: {e}"


def call_user_function(path: str | Path, fn: Any) -> Any:
    """`fn()` from a user's file, its failure reported as one line naming the file and line."""
    try:
        return fn()
    except (ValueError, TypeError):
        raise
    except Exception as e:
        raise ValueError(f"{path}: {fn.__name__}() failed: {_where(e, Path(path))}") from e


def load_config(spec: str | None = None, overrides: Iterable[str] = ()) -> RunConfig:
    """A `RunConfig` from a preset name, a `.py` file with `get_config()`, or a `.json` file.

    The default (None) is the default training job: the "small" model on the stdlib corpus.
    Overrides are applied last.
    """
    if spec is None:
        config = default_job()
    elif spec.endswith((".py", ".json")):
        path = Path(spec)
        if not path.is_file():
            raise FileNotFoundError(f"config file {spec!r} does not exist")
        if spec.endswith(".json"):
            config = from_dict(RunConfig, read_json(path, what="a run config"))
        else:
            module = load_python_file(path)
            if not hasattr(module, "get_config"):
                raise ValueError(f"config file {spec!r} must define get_config()")
            config = call_user_function(path, module.get_config)
        if isinstance(config, ModelConfig):
            config = RunConfig(model=config)
        if not isinstance(config, RunConfig):
            raise TypeError(f"{spec!r} gave {type(config).__name__}, expected RunConfig")
    elif spec in PRESETS:
        config = RunConfig(model=get_preset(spec))
    elif Path(spec).exists() or spec.endswith((".yaml", ".yml", ".toml", ".ini", ".cfg")):
        raise ValueError(
            f"--config {spec!r}: give a preset name, a .py file with get_config() or a .json file"
        )
    else:
        get_preset(spec)  # raises with the list of presets and the closest names
        raise AssertionError("unreachable")
    return apply_overrides(config, overrides)
