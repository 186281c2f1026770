"""Typed frozen dataclasses overlaid by YAML files and dotted `section.key=value` overrides.

The dataclass is the single source of truth (defaults, types, docs); YAML only overrides. Unknown
keys fail with one line that names the file and the key, so a typo never silently does nothing.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar, get_args, get_origin

import yaml

from jaxlm.errors import UserError

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

T = TypeVar("T", bound="DataclassInstance")  # a config dataclass


def _convert(tp: Any, value: Any, where: str) -> Any:
    origin = get_origin(tp)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):  # a dataclass, not an instance
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise UserError(f"{where}: expected a mapping, got {value!r}")
        return build(tp, value, where)
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _convert(a, value, where)
            except UserError as e:
                errors.append(str(e))
        raise UserError(errors[0] if errors else f"{where}: bad value {value!r}")
    if origin is Literal:
        if value not in get_args(tp):
            choices = ", ".join(repr(a) for a in get_args(tp))
            raise UserError(f"{where}: {value!r} is not one of {choices}")
        return value
    if origin is tuple:
        args = get_args(tp)
        if not isinstance(value, list | tuple):
            value = [value]
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(args[0], v, f"{where}[{i}]") for i, v in enumerate(value))
        if len(args) != len(value):
            raise UserError(f"{where}: expected {len(args)} values, got {len(value)}")
        pairs = enumerate(zip(args, value, strict=True))
        return tuple(_convert(a, v, f"{where}[{i}]") for i, (a, v) in pairs)
    if tp is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp is bool and isinstance(value, bool):
        return value
    if tp is str and isinstance(value, str | int | float):
        return str(value)
    if tp is Any:
        return value
    raise UserError(f"{where}: expected {getattr(tp, '__name__', tp)}, got {value!r}")


def build(cls: type[T], data: dict[str, Any], where: str = "config") -> T:
    """Instantiate dataclass `cls` from a nested dict, converting and checking every field."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - names)
    if unknown:
        raise UserError(
            f"{where}: unknown key {unknown[0]!r}; known keys: {', '.join(sorted(names))}"
        )
    kwargs = {k: _convert(hints[k], _onto_default(cls, k, v), f"{where}.{k}")
              for k, v in data.items()}  # fmt: skip
    try:
        return cls(**kwargs)
    except (TypeError, UserError) as e:  # __post_init__'s checks, named after the file too
        raise UserError(f"{where}: {e}") from None


def _onto_default(cls: type, name: str, value: Any) -> Any:
    """A partial section (`log: {every: 50}`) overlaid on the field's own default instance, so a
    parent's default (the SAE trainer's `LogSection(tensorboard=False)`) is kept, not replaced by
    the section class's defaults."""
    if not isinstance(value, dict):
        return value
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    if f.default is not dataclasses.MISSING:
        default = f.default
    elif f.default_factory is not dataclasses.MISSING:
        default = f.default_factory()
    else:
        return value
    if dataclasses.is_dataclass(default) and not isinstance(default, type):
        own = {g.name: to_dict(getattr(default, g.name)) for g in dataclasses.fields(default)
               if g.init}  # fmt: skip
        return merge(own, value)
    return value


def to_dict(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, tuple | list):
        return [to_dict(v) for v in obj]
    return obj


def merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def parse_override(text: str, cls: type | None = None) -> dict:
    """`section.key=value` -> {"section": {"key": value}}, the value parsed as YAML. With `cls`
    (the config dataclass) the keys are checked here, so a typo's error names the --set, not the
    YAML file it is later merged into."""
    if "=" not in text:
        raise UserError(f"--set {text!r}: expected section.key=value")
    path, raw = text.split("=", 1)
    value = yaml.safe_load(raw) if raw else ""
    out: dict = {}
    cur = out
    keys = path.strip().split(".")
    for i, k in enumerate(keys):
        if cls is not None:
            names = {f.name for f in dataclasses.fields(cls) if f.init}
            if k not in names:
                where, known = ".".join(keys[:i]) or "the config", ", ".join(sorted(names))
                raise UserError(f"--set {text}: {where} has no key {k!r}; known keys: {known}")
            tp = typing.get_type_hints(cls)[k]
            last = i == len(keys) - 1
            cls = tp if isinstance(tp, type) and dataclasses.is_dataclass(tp) and not last else None
        if i < len(keys) - 1:
            cur = cur.setdefault(k, {})
    cur[keys[-1]] = value
    return out


def load(cls: type[T], path: str | Path | None = None, overrides: list[dict] | None = None) -> T:
    """Defaults of `cls`, overlaid by the YAML at `path`, then by each override dict in order."""
    data: dict = {}
    where = "config"
    if path is not None:
        p = Path(path)
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise UserError(f"{p}: cannot read ({str(e).splitlines()[0]})") from None
        if not isinstance(loaded, dict):
            raise UserError(f"{p}: expected a mapping at the top level")
        data, where = loaded, str(p)
    for o in overrides or []:
        data = merge(data, o)
    return build(cls, data, where)
