"""One way to read configuration: strict, typed dataclass trees from dicts and dotted overrides.

Every config of the package (policy, training, and those of the controller, RL and server) is a
frozen dataclass whose fields carry type annotations; a field's `__post_init__` range checks use
the `check_*` helpers here. Three functions serve them all:

- `from_dict(cls, data, path="")`: build `cls` from a nested dict (parsed JSON / YAML) strictly:
  unknown and missing keys fail, every value is checked against its annotation (bool, int, float,
  str, `Literal[...]`, `X | None`, `list[X]`, `tuple[X, ...]`, dicts, nested dataclasses).
- `to_dict(config)`: the JSON-friendly inverse (tuples become lists).
- `apply_overrides(config, overrides)`: dotted `key=value` overrides (`optim.lr=3e-4`,
  `policy.backbone.hidden_dim=256`), text parsed by the annotated type; an unknown key fails with
  the closest known keys. The result is rebuilt with `from_dict`, so the same checks apply.

Every error is a `ConfigError` naming the dotted key, what was expected, and what came:
`config key 'process.eta': expected a number <= 1, got 1.5 (float)`.

Written here rather than taken from pydantic / OmegaConf: about 200 lines, no dependency, and the
messages name dotted keys exactly as the command line and the task cards spell them.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from typing import Any, Literal

import yaml

from diffpolicy.errors import ConfigError

__all__ = ["ConfigError", "apply_overrides", "check_bool", "check_choice", "check_float", "check_int",
           "check_spec", "fail", "flat_keys", "from_dict", "parse_override", "to_dict"]


# ----------------------------------------------------------------------------- value checks
def fail(path: str, expected: str, value: Any) -> ConfigError:
    """The error for `value` at dotted key `path`, which should have been `expected`."""
    return ConfigError(f"config key {path or '<root>'!r}: expected {expected}, got {value!r} ({type(value).__name__})")


def check_int(path: str, value: Any, minimum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise fail(path, "an integer", value)
    if minimum is not None and value < minimum:
        raise fail(path, f"an integer >= {minimum}", value)
    return value


def check_float(path: str, value: Any, minimum: float | None = None, strictly: bool = False,
                maximum: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise fail(path, "a finite number (float)", value)
    if minimum is not None and (value < minimum or (strictly and value == minimum)):
        raise fail(path, f"a number {'>' if strictly else '>='} {minimum}", value)
    if maximum is not None and value > maximum:
        raise fail(path, f"a number <= {maximum}", value)
    return float(value)


def check_choice(path: str, value: Any, choices: tuple[Any, ...]) -> Any:
    if value not in choices:
        raise fail(path, f"one of {list(choices)}", value)
    return value


def check_bool(path: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise fail(path, "a bool", value)
    return value


def check_spec(path: str, value: Any, required_key: str) -> dict[str, Any]:
    """A component spec: a dict with string keys and a string `required_key` naming the kind."""
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise fail(path, "a dict with string keys", value)
    if not isinstance(value.get(required_key), str):
        raise fail(f"{path}.{required_key}", "a string naming the kind", value.get(required_key))
    return dict(value)


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


# ----------------------------------------------------------------------------- reading dicts
def _type_name(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return f"one of {list(args)}"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    if origin in (list, tuple):
        return f"a list of {_type_name(args[0])}" if args else "a list"
    if origin is dict or tp is dict:
        return "a dict"
    return {bool: "a bool", int: "an integer", float: "a finite number (float)", str: "a string",
            type(None): "null"}.get(tp, getattr(tp, "__name__", str(tp)))


def _convert(tp: Any, value: Any, path: str) -> Any:
    """`value` checked against the annotation `tp` (and turned into it: lists into tuples, dicts
    into nested dataclasses)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, path)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for option in (a for a in args if a is not type(None)):
            try:
                return _convert(option, value, path)
            except ConfigError:
                continue
        raise fail(path, _type_name(tp), value)
    if origin is Literal:
        return check_choice(path, value, args)
    if tp is bool:
        return check_bool(path, value)
    if tp is int:
        return check_int(path, value)
    if tp is float:
        return check_float(path, value)
    if tp is str:
        if not isinstance(value, str):
            raise fail(path, "a string", value)
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise fail(path, _type_name(tp), value)
        item_tp = args[0] if args else Any
        try:
            items = [_convert(item_tp, v, f"{path}[{i}]") for i, v in enumerate(value)]
        except ConfigError:
            raise fail(path, _type_name(tp), value) from None
        return tuple(items) if origin is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise fail(path, "a dict", value)
        return value
    raise ConfigError(f"config key {path!r}: annotation {tp!r} is not supported by diffpolicy.config")


def _close(key: str, known: list[str]) -> list[str]:
    """Known dotted keys close to `key`, also by the last part (`lr` -> `optim.lr`)."""
    close = difflib.get_close_matches(key, known, n=5, cutoff=0.5)
    if not close:
        last = key.rsplit(".", 1)[-1]
        lasts = difflib.get_close_matches(last, [k.rsplit(".", 1)[-1] for k in known], n=5, cutoff=0.6)
        close = [k for k in known if k.rsplit(".", 1)[-1] in lasts]
    return close


def from_dict(cls: type, data: Any, path: str = "") -> Any:
    """Build the dataclass `cls` from a nested dict, strictly (module docstring); `path` prefixes
    the keys in messages (the place of this section in a larger config)."""
    if not isinstance(data, dict):
        raise fail(path, f"a dict with keys of {cls.__name__}", data)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        close = _close(unknown[0], sorted(fields))
        hint = f"; did you mean {', '.join(_join(path, k) for k in close)}?" if close else ""
        raise ConfigError(f"unknown config key {_join(path, unknown[0])!r}; expected keys of "
                          f"{cls.__name__}: {sorted(fields)}{hint}")
    missing = [name for name, f in fields.items() if name not in data
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"missing config key {_join(path, missing[0])!r} ({cls.__name__})")
    hints = typing.get_type_hints(cls)
    return cls(**{name: _convert(hints[name], value, _join(path, name)) for name, value in data.items()})


def to_dict(config: Any) -> Any:
    """A JSON-friendly copy of a dataclass tree (tuples become lists); `from_dict` inverts it."""
    if dataclasses.is_dataclass(config):
        return {f.name: to_dict(getattr(config, f.name)) for f in dataclasses.fields(config)}
    if isinstance(config, dict):
        return {key: to_dict(value) for key, value in config.items()}
    if isinstance(config, (list, tuple)):
        return [to_dict(value) for value in config]
    return config


# ----------------------------------------------------------------------------- overrides
def flat_keys(config: Any, prefix: str = "") -> list[str]:
    """All dotted leaf keys of a dataclass / dict tree, e.g. `["optim.lr", "train.steps", ...]`."""
    if dataclasses.is_dataclass(config):
        items = [(f.name, getattr(config, f.name)) for f in dataclasses.fields(config)]
    elif isinstance(config, dict):
        items = list(config.items())
    else:
        return [prefix]
    return [key for name, value in items for key in flat_keys(value, _join(prefix, name))]


def parse_override(item: str) -> tuple[str, str]:
    """Split `"a.b=value"` into `("a.b", "value")`."""
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {item!r} is not of the form key=value (e.g. optim.lr=3e-4)")
    return key.strip(), value.strip()


def _parse_text(text: str, tp: Any) -> Any:
    """Command-line text as a value for annotation `tp` (None: a free-form dict entry): YAML,
    except that numbers in any notation ("3e-4", "1e4") are numbers and a string field keeps the
    text as it is."""
    options = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)
    if text.strip().lower() in ("none", "null", "~"):
        return None
    if str in options:
        return text
    try:
        return int(text)
    except ValueError:
        pass
    try:
        number = float(text)
        return int(number) if number.is_integer() and "." not in text else number
    except ValueError:
        pass
    try:
        return yaml.safe_load(text) if text else None
    except yaml.YAMLError:
        return text


def _leaf(config: Any, parts: list[str], key: str) -> tuple[Any, Any]:
    """(annotation or None for a free-form dict entry, current value) of the dotted key in `config`."""
    node, tp = config, None
    for name in parts:
        if dataclasses.is_dataclass(node) and name in {f.name for f in dataclasses.fields(node)}:
            node, tp = getattr(node, name), typing.get_type_hints(type(node))[name]
        elif isinstance(node, dict) and name in node:
            node, tp = node[name], None
        else:
            close = _close(key, flat_keys(config))
            hint = f"; did you mean {', '.join(close)}?" if close else f"; known keys: {', '.join(flat_keys(config))}"
            raise ConfigError(f"unknown config key {key!r}{hint}")
    return tp, node


def _with_value(data: dict[str, Any], parts: list[str], value: Any) -> dict[str, Any]:
    head, rest = parts[0], parts[1:]
    return {**data, head: _with_value(data[head], rest, value) if rest else value}


def apply_overrides(config: Any, overrides: list[str] | tuple[str, ...] | dict[str, Any]) -> Any:
    """A copy of the dataclass tree `config` with dotted overrides applied in order.

    `overrides`: `"dotted.key=text"` strings or a mapping `{dotted.key: value}` (a task card's
    `train:` section); text, and string values of a mapping, are parsed for the key's annotated type.
    """
    items = (list(overrides.items()) if isinstance(overrides, dict)
             else [parse_override(item) for item in overrides])
    for key, value in items:
        tp, current = _leaf(config, key.split("."), key)
        if dataclasses.is_dataclass(current):
            raise ConfigError(f"config key {key!r} is a section; set one of its keys: "
                              f"{', '.join(flat_keys(current, key))}")
        if isinstance(value, str):  # command-line text, or a YAML string such as 3e-4 (YAML 1.1: no float)
            value = _parse_text(value, tp)
        if tp is None and current is not None and not _same_kind(value, current):  # free-form dict entry
            raise fail(key, f"{_type_name(type(current))} (the type of its current value {current!r})", value)
        data = _with_value(to_dict(config), key.split("."), to_dict(value))
        try:
            config = from_dict(type(config), data)
        except ConfigError as exc:
            if repr(key) in str(exc):
                raise
            raise ConfigError(f"override {key}={value!r}: {exc}") from None  # a section's own check
    return config


def _same_kind(value: Any, current: Any) -> bool:
    if isinstance(current, bool) or isinstance(value, bool):
        return isinstance(value, bool) and isinstance(current, bool)
    if isinstance(current, float):
        return isinstance(value, (int, float))
    if isinstance(current, (list, tuple)):
        return isinstance(value, (list, tuple))
    return isinstance(value, type(current))
