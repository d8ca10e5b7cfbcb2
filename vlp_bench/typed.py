"""Typed values from plain data: TOML and `--set section.key=value` overrides -> dataclasses,
validated once, and back to JSON-able dicts (saved with every run).

The mechanics only; what the sections are is vlp_bench/config.py. Mistakes are explained in one
line with a "did you mean" suggestion (vlp_bench.errors.suggest).
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from pathlib import Path
from typing import Any

from vlp_bench.errors import UserError, suggest


def _check_type(value: Any, tp: Any, where: str) -> Any:
    """Return `value` as type `tp` or raise UserError. Ints are accepted where floats are."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_type(value, arg, where)
            except UserError as e:
                errors.append(str(e))
        raise UserError(errors[0] if errors else f"{where}: invalid value {value!r}")
    if origin is typing.Literal:
        if value not in typing.get_args(tp):
            choices = ", ".join(repr(a) for a in typing.get_args(tp))
            raise UserError(f"{where}: {value!r} is not one of {choices}{suggest(value, typing.get_args(tp))}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise UserError(f"{where}: expected a list, got {type(value).__name__} {value!r}")
        (item,) = typing.get_args(tp)[:1] or (Any,)
        return [_check_type(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise UserError(f"{where}: expected a table, got {type(value).__name__} {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise UserError(f"{where}: expected a table, got {type(value).__name__} {value!r}")
        return from_dict(tp, value, where)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool):
        if isinstance(value, bool) and tp is not bool:
            raise UserError(f"{where}: expected {tp.__name__}, got bool {value!r}")
        if not isinstance(value, tp):
            raise UserError(f"{where}: expected {tp.__name__}, got {type(value).__name__} {value!r}")
        return value
    return value


def from_dict(cls: type, data: dict, where: str = "") -> Any:
    """Build dataclass `cls` from `data`; unknown keys and wrong types are UserErrors."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else key
        if key not in fields:
            raise UserError(f"unknown config key '{path}'{suggest(key, fields)}")
        kwargs[key] = _check_type(value, hints[key], path)
    try:
        obj = cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise UserError(f"{where or cls.__name__}: {e}") from None
    validate = getattr(obj, "validate", None)
    if validate is not None:
        try:
            validate()
        except ValueError as e:
            raise UserError(f"{where or cls.__name__}: {e}") from None
    return obj


def to_dict(obj: Any) -> Any:
    """Dataclasses (nested) -> plain JSON-able dicts."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    return obj


def load_toml(path: Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{path}: invalid TOML: {e}") from None


def parse_override(text: str) -> tuple[list[str], Any]:
    """'train.steps=100' -> (['train', 'steps'], 100). Values are TOML; bare words are strings."""
    if "=" not in text:
        raise UserError(f"--set expects section.key=value, got '{text}'")
    key, raw = text.split("=", 1)
    keys = [k.strip() for k in key.strip().split(".")]
    if not all(keys):
        raise UserError(f"--set expects section.key=value, got '{text}'")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()  # a bare word such as `cpu` or `baseline,simvlg`
    return keys, value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Set each `a.b.c=value` in a nested dict (creating tables as needed)."""
    for text in overrides:
        keys, value = parse_override(text)
        node = data
        for k in keys[:-1]:
            child = node.setdefault(k, {})
            if not isinstance(child, dict):
                raise UserError(f"--set {text}: '{k}' is a value, not a table")
            node = child
        node[keys[-1]] = value
    return data
