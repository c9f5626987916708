"""Typed dataclass configs from a YAML file plus ``key=value`` overrides, checked by tyro.

``load(MyConfig, "cfg.yaml", ["eta=0.05", "model.depth=3"])``: the file and the overrides (values
read as YAML: ``sizes=[1,2]``, ``path=null``) are turned into tyro arguments, and tyro builds the
dataclass — types checked, nested dataclasses reached by dotted keys, unknown keys rejected with a
"perhaps you meant" suggestion — so a typo fails at start-up instead of after an hour of training.
A file may begin with ``extends: base.yaml`` and give only what differs from that recipe.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import re
from pathlib import Path
from typing import Any, Mapping, Sequence, TypeVar

import tyro
import yaml

T = TypeVar("T")
EXTENDS = "extends"  # a config file's key naming the file it varies (see `_read_yaml`)


def load(cls: type[T], path: str | Path | None = None, overrides: Sequence[str] = ()) -> T:
    """Build ``cls`` from an optional YAML file plus ``key=value`` overrides (overrides win)."""
    values: dict[str, Any] = {}
    if path is not None:
        values = _read_yaml(Path(path))
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
        try:
            node[leaf] = yaml.safe_load(raw)
        except yaml.YAMLError as error:
            raise ValueError(f"override {item!r}: its value is not valid YAML ({_first_line(error)})") from None
    args = _to_args(values)
    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors), contextlib.redirect_stdout(errors):
            return tyro.cli(cls, args=args, config=(tyro.conf.FlagConversionOff,))
    except SystemExit as exit_:
        # tyro's boxed message, flattened; its flags (--key) read as the key=value keys they came from
        message = " ".join(re.sub(r"[-─━│┃╭╮╰╯]{2,}|[│┃╭╮╰╯]", " ", errors.getvalue()).split())
        message = re.sub(r"\s*For full helptext.*$", "", message)
        message = re.sub(r"\[/?[a-z][a-z ]*\]", "", message)  # tyro's rich markup ([bold]...[/bold])
        message = re.sub(r"\s*Argument helptext:.*$", "", message)
        message = re.sub(r"^(Unrecognized options|Invalid choice) ", "", message)
        parsing = re.match(r"Value error Error parsing ([\w.]+): (.*)", message)
        if parsing:  # our own __post_init__ messages name their field already
            name, rest = parsing.groups()
            message = rest if name == cls.__name__ or rest.startswith(name.split(".")[-1]) else f"{name}: {rest}"
        raise ValueError(f"invalid {cls.__name__} config: {message}") from exit_


def read_text(path: Path, what: str, kind: str) -> str:
    """A user's text file (``what``: "config file", "dataset file"; ``kind``: "YAML", "JSONL"), or
    a ValueError naming the file and what is wrong with it."""
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ValueError(f"{what} {path} not found") from None
    except IsADirectoryError:
        raise ValueError(f"{what} {path} is a directory; give a {kind} file") from None
    except UnicodeDecodeError:
        raise ValueError(f"{what} {path} is not text (not UTF-8); give a {kind} file") from None


def _read_yaml(path: Path, _children: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A config file's mapping, or a ValueError naming the file and what is wrong with it.

    A file whose top level has ``extends: other.yaml`` (a path relative to it) is that file's
    mapping with this one's values merged over it, nested mappings key by key, so a variant of a
    recipe states only what differs.
    """
    text = read_text(path, "config file", "YAML")
    try:
        loaded = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ValueError(f"config file {path} is not valid YAML: {_first_line(error)}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ValueError(f"config file {path} must hold a mapping of field: value, got a {type(loaded).__name__}")
    if EXTENDS not in loaded:
        return loaded
    parent = loaded.pop(EXTENDS)
    if not isinstance(parent, str) or not parent:
        raise ValueError(f"config file {path}: {EXTENDS} must be the path of another YAML config (relative to "
                         f"this file), got {parent!r}")
    children = (*_children, path.resolve())
    base = path.parent / parent
    if base.resolve() in children:
        chain = " -> ".join(str(p) for p in (*children, base.resolve()))
        raise ValueError(f"config file {path}: {EXTENDS} makes a cycle ({chain}); one of these files must not "
                         f"extend the others")
    try:
        return _merged(_read_yaml(base, children), loaded)
    except ValueError as error:
        raise ValueError(f"{error} (extended by {path})") from None


def _merged(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``over``'s values on top; mappings on both sides are merged key by key."""
    out = dict(base)
    for key, value in over.items():
        out[key] = _merged(out[key], value) if isinstance(value, Mapping) and isinstance(out.get(key), dict) \
            else value
    return out


def _first_line(error: Exception) -> str:
    return " ".join(str(error).split())


def _to_args(values: Mapping[str, Any], prefix: str = "") -> list[str]:
    args: list[str] = []
    for key, value in values.items():
        flag = f"--{prefix}{key}"
        if isinstance(value, Mapping):
            args += _to_args(value, prefix=f"{prefix}{key}.")
        elif isinstance(value, (list, tuple)):
            args += [flag, *(_token(v) for v in value)]
        else:
            args += [flag, _token(value)]
    return args


def _token(value: Any) -> str:
    return "None" if value is None else str(value)


def as_json(cfg: Any) -> Any:
    """A dataclass config (or a dict / list of them) as the plain JSON value it is saved as."""
    value = dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else cfg
    return json.loads(json.dumps(value))


def defaults_of(cls: type) -> dict[str, Any]:
    """The JSON of a dataclass config's field defaults (fields without one left out), what a config
    saved before a field existed is read with (see :func:`differences`). Field by field, so a class
    whose defaults do not validate together (e.g. a task-dependent length) still has them."""
    return {f.name: as_json(f.default if f.default is not dataclasses.MISSING else f.default_factory())
            for f in dataclasses.fields(cls)
            if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING}


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``: the dotted keys of ``key=value`` overrides."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def differences(saved: Mapping[str, Any], now: Mapping[str, Any], ignore: Sequence[str] = (),
                defaults: Mapping[str, Any] | None = None) -> list[str]:
    """The dotted fields where two saved configs differ (``ignore``: fields free to change),
    each as ``"field (saved X, now Y)"``; empty when they agree. ``defaults`` (the config class's
    default values, as :func:`as_json` writes them): a field that ``saved`` lacks (a config written
    before the field existed) counts as its default."""
    flat_saved, flat_now = flatten(saved), flatten(now)
    for key, value in flatten(defaults or {}).items():
        flat_saved.setdefault(key, value)
    keys = sorted(k for k in set(flat_saved) | set(flat_now) if k not in ignore and flat_saved.get(k) != flat_now.get(k))
    return [f"{k} (saved {flat_saved.get(k)!r}, now {flat_now.get(k)!r})" for k in keys]


def check_same(saved: Mapping[str, Any], now: Mapping[str, Any], where: str, ignore: Sequence[str] = (),
               defaults: Mapping[str, Any] | None = None) -> None:
    """Refuse to continue ``where`` (a run directory, a checkpoint) with another config."""
    differ = differences(saved, now, ignore, defaults)
    if differ:
        raise ValueError(f"{where} was written with another config; fields that differ: {', '.join(differ)}. "
                         "Use a new run directory, or the saved config.")
