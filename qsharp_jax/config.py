"""Typed dataclass configs, loaded from YAML and overridden with ``key=value`` strings.

``load(MyConfig, "cfg.yaml", ["eta=0.05", "model.depth=3"])`` reads the file, applies the overrides
(values parsed as YAML scalars/lists; dotted keys reach into nested dataclasses) and checks every
key and type, so a typo fails at start-up instead of after an hour of training.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Sequence, TypeVar

import yaml

T = TypeVar("T")


def load(cls: type[T], path: str | Path | None = None, overrides: Sequence[str] = ()) -> T:
    """Build ``cls`` from an optional YAML file plus ``key=value`` overrides."""
    values: dict[str, Any] = {}
    if path is not None:
        loaded = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: a config file must hold a mapping of field: value")
        values = loaded
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r} must look like key=value (e.g. eta=0.1)")
        *parents, leaf = key.split(".")
        node = values
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r}: {part!r} is not a nested config")
        node[leaf] = yaml.safe_load(raw)
    return _build(cls, values, prefix="")


def _build(cls: type[T], values: dict[str, Any], prefix: str) -> T:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ValueError(
            f"unknown config key(s) {[prefix + u for u in unknown]} for {cls.__name__}; "
            f"valid keys: {sorted(prefix + f for f in fields)}"
        )
    hints = typing.get_type_hints(cls)
    kwargs = {name: _coerce(hints[name], value, prefix + name) for name, value in values.items()}
    return cls(**kwargs)


def _coerce(hint: Any, value: Any, key: str) -> Any:
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ValueError(f"config key {key!r} needs a mapping for {hint.__name__}, got {value!r}")
        return _build(hint, value, prefix=key + ".")
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        for option in args:
            try:
                return _coerce(option, value, key)
            except ValueError:
                continue
        raise ValueError(f"config key {key!r}: {value!r} matches none of {hint}")
    if hint is type(None):
        if value is None:
            return None
        raise ValueError(f"config key {key!r} must be null, got {value!r}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            value = [value]
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(args[0], v, key) for v in value)
        if len(args) != len(value):
            raise ValueError(f"config key {key!r} needs {len(args)} items, got {value!r}")
        return tuple(_coerce(a, v, key) for a, v in zip(args, value))
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint in (int, str, bool) and type(value) is hint:
        return value
    if hint is Any:
        return value
    raise ValueError(f"config key {key!r} must be of type {getattr(hint, '__name__', hint)}, got {value!r}")
