"""Typed training configuration: task card + method defaults + `key=value` overrides.

A `TrainConfig` is a tree of dataclasses. It is built in three layers:

1. method defaults (`--policy diffusion|flow`): process, inference steps, network size;
2. the task card: horizons, observation keys, action dimension, dataset path, episode length,
   and the card's optional `train:` mapping of dotted overrides (task-specific tuning);
3. command-line overrides `section.key=value` with dotted keys, e.g. `optim.lr=3e-4`,
   `policy.backbone.down_dims=[64,128]`.

Every override is validated: an unknown key fails with the closest known keys, a value of the
wrong type fails naming the key, the expected type and the value that came.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from diffpolicy.policies.errors import ConfigError

# ----------------------------------------------------------------------------- generic machinery


def flat_keys(obj: Any, prefix: str = "") -> list[str]:
    """All dotted leaf keys of a dataclass / dict tree, e.g. `["optim.lr", "train.steps", ...]`."""
    if dataclasses.is_dataclass(obj):
        items = [(f.name, getattr(obj, f.name)) for f in dataclasses.fields(obj)]
    elif isinstance(obj, dict):
        items = list(obj.items())
    else:
        return [prefix]
    keys: list[str] = []
    for name, value in items:
        keys.extend(flat_keys(value, f"{prefix}.{name}" if prefix else name))
    return keys


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _fail_type(key: str, tp: Any, text: str) -> ConfigError:
    return ConfigError(f"config key {key!r} expects {_type_name(tp)}, got {text!r}")


def coerce(text: str, tp: Any, key: str) -> Any:
    """Convert the command-line text `text` to the annotated type `tp` of `key`, or fail clearly.

    Supported: bool, int, float, str, `Literal[...]`, `list[X]`, `X | None`, `dict[str, Any]`.
    """
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if type(None) in args and text.strip().lower() in ("none", "null", "~"):
            return None
        others = [a for a in args if a is not type(None)]
        for option in others:
            try:
                return coerce(text, option, key)
            except ConfigError:
                continue
        raise _fail_type(key, tp, text)
    if origin is Literal:
        for option in args:
            if str(option) == text:
                return option
        raise _fail_type(key, tp, text)
    if tp is bool:
        parsed = yaml.safe_load(text) if text else None
        if isinstance(parsed, bool):
            return parsed
        raise _fail_type(key, tp, text)
    if tp is int:
        try:
            parsed = yaml.safe_load(text)
        except yaml.YAMLError:
            raise _fail_type(key, tp, text) from None
        if isinstance(parsed, int) and not isinstance(parsed, bool):
            return parsed
        if isinstance(parsed, float) and parsed.is_integer() and "." not in text:  # 1e5
            return int(parsed)
        try:
            as_float = float(text)
        except ValueError:
            raise _fail_type(key, tp, text) from None
        if as_float.is_integer() and "." not in text:
            return int(as_float)
        raise _fail_type(key, tp, text)
    if tp is float:
        try:
            return float(text)
        except ValueError:
            raise _fail_type(key, tp, text) from None
    if tp is str:
        return text
    if origin in (list, tuple):
        try:
            parsed = yaml.safe_load(text)
        except yaml.YAMLError:
            raise _fail_type(key, tp, text) from None
        if not isinstance(parsed, list):
            raise _fail_type(key, tp, text)
        item_tp = args[0] if args else Any
        return [coerce(json.dumps(v) if not isinstance(v, str) else v, item_tp, key) for v in parsed]
    if origin is dict or tp is Any:
        try:
            return yaml.safe_load(text)
        except yaml.YAMLError:
            raise _fail_type(key, tp, text) from None
    raise ConfigError(f"config key {key!r} has an annotation {tp!r} that overrides do not support")


def _type_of_value(value: Any) -> Any:
    """The type an override must have to replace `value` inside a free-form dict."""
    if value is None:
        return Any
    if isinstance(value, list):
        return list[_type_of_value(value[0])] if value else list
    if isinstance(value, float):
        return float
    return type(value)


def _unknown_key(key: str, root: Any) -> ConfigError:
    known = flat_keys(root)
    close = difflib.get_close_matches(key, known, n=5, cutoff=0.5)
    if not close:  # match on the last part, e.g. "lr" -> "optim.lr"
        last = key.rsplit(".", 1)[-1]
        close = [k for k in known if k.rsplit(".", 1)[-1] in
                 difflib.get_close_matches(last, [q.rsplit(".", 1)[-1] for q in known], n=5, cutoff=0.6)]
    hint = f"; did you mean {', '.join(close)}?" if close else f"; known keys: {', '.join(known)}"
    return ConfigError(f"unknown config key {key!r}{hint}")


def _set(obj: Any, parts: list[str], text: str, key: str, root: Any) -> Any:
    """Return a copy of `obj` with the leaf at `parts` set from `text`."""
    name, rest = parts[0], parts[1:]
    if dataclasses.is_dataclass(obj):
        names = {f.name for f in dataclasses.fields(obj)}
        if name not in names:
            raise _unknown_key(key, root)
        current = getattr(obj, name)
        hint = typing.get_type_hints(type(obj))[name]
        if rest:
            if not (dataclasses.is_dataclass(current) or isinstance(current, dict)):
                raise _unknown_key(key, root)
            return dataclasses.replace(obj, **{name: _set(current, rest, text, key, root)})
        if dataclasses.is_dataclass(current):
            raise ConfigError(f"config key {key!r} is a section; set one of its keys: "
                              f"{', '.join(flat_keys(current, key))}")
        return dataclasses.replace(obj, **{name: coerce(text, hint, key)})
    if isinstance(obj, dict):
        if name not in obj:
            raise _unknown_key(key, root)
        current = obj[name]
        if rest:
            if not isinstance(current, dict):
                raise _unknown_key(key, root)
            return {**obj, name: _set(current, rest, text, key, root)}
        return {**obj, name: coerce(text, _type_of_value(current), key)}
    raise _unknown_key(key, root)


def parse_override(item: str) -> tuple[str, str]:
    """Split `"a.b=value"` into `("a.b", "value")`."""
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {item!r} is not of the form key=value (e.g. optim.lr=3e-4)")
    return key.strip(), value.strip()


def apply_overrides(config: Any, overrides: list[str] | dict[str, Any]) -> Any:
    """Return a copy of the dataclass tree `config` with `overrides` applied in order.

    `overrides` is a list of `"dotted.key=value"` strings (values as text, coerced to the
    annotated type) or a mapping `{dotted.key: value}` (values are written back to text first,
    so they are validated the same way).
    """
    items = (list(overrides.items()) if isinstance(overrides, dict)
             else [parse_override(item) for item in overrides])
    for key, value in items:
        text = value if isinstance(value, str) else json.dumps(value)
        config = _set(config, key.split("."), text, key, config)
    return config


def from_dict(cls: type, data: dict[str, Any], where: str) -> Any:
    """Build the dataclass `cls` from a nested dict (e.g. a saved `config.json`), strictly."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping for {cls.__name__}, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown} for {cls.__name__}; known: {sorted(names)}")
    kwargs = {}
    for name, value in data.items():
        tp = hints[name]
        kwargs[name] = (from_dict(tp, value, f"{where}.{name}")
                        if isinstance(tp, type) and dataclasses.is_dataclass(tp) else value)
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"{where}: {exc}") from None
