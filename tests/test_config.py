"""The one config reader (`diffpolicy.config`): strict typed reading, round trips and dotted overrides
for any frozen dataclass tree (the policy and training configs use it; so do the newer ones)."""

from dataclasses import dataclass, field
from typing import Any, Literal

import pytest

from diffpolicy.config import (
    ConfigError,
    apply_overrides,
    check_int,
    from_dict,
    to_dict,
)
from diffpolicy.errors import DiffpolicyError


@dataclass(frozen=True)
class Inner:
    rate: float = 0.5
    mode: Literal["fast", "safe"] = "safe"
    limit: int | None = None

    def __post_init__(self) -> None:
        if self.limit is not None:
            check_int("inner.limit", self.limit, 1)


@dataclass(frozen=True)
class Outer:
    name: str
    inner: Inner = field(default_factory=Inner)
    sizes: tuple[int, ...] = (1, 2)
    spec: dict[str, Any] = field(default_factory=lambda: {"type": "mlp", "width": 8, "gain": 1.0})
    flag: bool = False


def test_round_trip_and_types_from_annotations():
    config = Outer(name="a", inner=Inner(rate=2.0, mode="fast", limit=3), sizes=(4, 5))
    data = to_dict(config)
    assert data["sizes"] == [4, 5] and data["inner"] == {"rate": 2.0, "mode": "fast", "limit": 3}
    assert from_dict(Outer, data) == config
    assert from_dict(Outer, {"name": "b", "inner": {"rate": 1}}).inner.rate == 1.0  # int accepted as float


@pytest.mark.parametrize("data, message", [
    ({"name": "a", "extra": 1}, r"unknown config key 'extra'; expected keys of Outer"),
    ({"name": "a", "inner": {"rat": 1.0}}, r"unknown config key 'inner.rat'.*did you mean inner.rate"),
    ({}, r"missing config key 'name' \(Outer\)"),
    ({"name": 3}, r"config key 'name': expected a string, got 3 \(int\)"),
    ({"name": "a", "inner": {"mode": "slow"}}, r"'inner.mode': expected one of \['fast', 'safe'\], got 'slow'"),
    ({"name": "a", "inner": {"rate": float("inf")}}, r"'inner.rate': expected a finite number"),
    ({"name": "a", "inner": {"limit": 0}}, r"'inner.limit': expected an integer >= 1, got 0"),
    ({"name": "a", "sizes": [1, "x"]}, r"'sizes': expected a list of an integer, got \[1, 'x'\]"),
    ({"name": "a", "flag": 1}, r"'flag': expected a bool, got 1 \(int\)"),
    ({"name": "a", "inner": [1]}, r"'inner': expected a dict with keys of Inner"),
])
def test_bad_dicts_name_the_key(data, message):
    with pytest.raises(ConfigError, match=message) as info:
        from_dict(Outer, data)
    assert isinstance(info.value, DiffpolicyError) and isinstance(info.value, ValueError)


def test_overrides_parse_text_by_annotation():
    config = apply_overrides(Outer(name="a"), ["inner.rate=3e-4", "inner.limit=1e2", "name=123", "sizes=[7]",
                                               "spec.width=16", "flag=true", "inner.mode=fast"])
    assert config == Outer(name="123", inner=Inner(rate=3e-4, mode="fast", limit=100), sizes=(7,),
                           spec={"type": "mlp", "width": 16, "gain": 1.0}, flag=True)
    assert apply_overrides(config, ["inner.limit=null"]).inner.limit is None
    assert apply_overrides(config, {"spec.gain": 2, "inner.rate": 1}).spec["gain"] == 2  # parsed values
    assert apply_overrides(config, {"inner.rate": "3e-4"}).inner.rate == 3e-4  # YAML 1.1 reads 3e-4 as a string


@pytest.mark.parametrize("override, message", [
    ("inner.rat=1", r"unknown config key 'inner.rat'; did you mean inner.rate"),
    ("rate=1", r"did you mean inner.rate"),
    ("inner=1", r"config key 'inner' is a section; set one of its keys: inner.rate, inner.mode, inner.limit"),
    ("inner.limit=2.5", r"config key 'inner.limit': expected an integer or null, got 2.5"),
    ("spec.width=wide", r"config key 'spec.width': expected an integer \(the type of its current value 8\), got 'wide'"),
    ("inner.limit=0", r"config key 'inner.limit': expected an integer >= 1, got 0"),
    ("noequals", r"not of the form key=value"),
])
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        apply_overrides(Outer(name="a"), [override])
