"""Robot profiles: the command limits of a robot, read from YAML (top-level `deploy/profiles/`).

    name: pusht
    action_dim: 2
    control_hz: 10.0            # the policy's rate
    robot_hz: 50.0              # the interpolator's rate (an integer multiple of control_hz)
    limits:
      position: {low: [0, 0], high: [512, 512]}
      velocity: [3000, 3000]            # per second
      acceleration: [30000, 30000]      # per second^2
    seam_jump: 250.0            # largest step from the last command to a new chunk's first action
    binary_dims: []             # gripper dimensions (binarised in warm-start guesses)
    watchdog: {max_observation_age_s: 0.3, max_inference_s: 2.0}

Every key is required; a missing key, a list of the wrong length, low >= high, a non-positive rate
or limit raise `ProfileError` naming the file and the key.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from diffpolicy.control.errors import ProfileError, ProfileMissingError

PROFILE_DIR = Path(__file__).resolve().parents[2] / "deploy" / "profiles"


@dataclass(frozen=True)
class RobotProfile:
    """Command limits of one robot, per action dimension (arrays `(Da,)`), rates in Hz."""

    name: str
    action_dim: int
    control_hz: float
    robot_hz: float
    position_low: np.ndarray
    position_high: np.ndarray
    velocity: np.ndarray
    acceleration: np.ndarray
    seam_jump: float
    binary_dims: tuple[int, ...]
    max_observation_age_s: float
    max_inference_s: float

    @property
    def substeps(self) -> int:
        """Robot commands per control tick (robot_hz / control_hz)."""
        return int(round(self.robot_hz / self.control_hz))

    @classmethod
    def from_dict(cls, data: Any, where: str = "<profile>") -> RobotProfile:
        reader = _Reader(data, where)
        dim = reader.integer("action_dim")
        control_hz, robot_hz = reader.positive("control_hz"), reader.positive("robot_hz")
        ratio = robot_hz / control_hz
        if abs(ratio - round(ratio)) > 1e-9 or round(ratio) < 1:
            raise ProfileError(f"{where}: key 'robot_hz' must be an integer multiple (>= 1) of control_hz = "
                               f"{control_hz}, got {robot_hz}")
        limits = reader.section("limits")
        position = _Reader(limits.get("position"), where, "limits.position") if "position" in limits else None
        if position is None:
            raise ProfileError(f"{where}: missing key 'limits.position'")
        low, high = position.vector("low", dim), position.vector("high", dim)
        bad = np.nonzero(low >= high)[0]
        if bad.size:
            i = int(bad[0])
            raise ProfileError(f"{where}: key 'limits.position': low must be < high in every dimension, got "
                               f"low[{i}] = {low[i]} >= high[{i}] = {high[i]}")
        limit_reader = _Reader(limits, where, "limits")
        velocity = limit_reader.vector("velocity", dim, positive=True)
        acceleration = limit_reader.vector("acceleration", dim, positive=True)
        binary = reader.value("binary_dims")
        if not isinstance(binary, list) or not all(isinstance(b, int) and 0 <= b < dim for b in binary):
            raise ProfileError(f"{where}: key 'binary_dims' must be a list of action dimensions in [0, {dim}), "
                               f"got {binary!r}")
        watchdog = _Reader(reader.section("watchdog"), where, "watchdog")
        return cls(name=str(reader.value("name")), action_dim=dim, control_hz=control_hz, robot_hz=robot_hz,
                   position_low=low, position_high=high, velocity=velocity, acceleration=acceleration,
                   seam_jump=reader.positive("seam_jump"), binary_dims=tuple(binary),
                   max_observation_age_s=watchdog.positive("max_observation_age_s"),
                   max_inference_s=watchdog.positive("max_inference_s"))


def load_profile(name_or_path: str | os.PathLike) -> RobotProfile:
    """A profile by name (`deploy/profiles/<name>.yaml`) or by path."""
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        path = PROFILE_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in PROFILE_DIR.glob("*.yaml"))
        raise ProfileMissingError(f"robot profile {str(name_or_path)!r}: no file {path} (profiles in {PROFILE_DIR}: "
                                  f"{known})")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ProfileError(f"{path}: not valid YAML: {err}") from None
    return RobotProfile.from_dict(data, str(path))


class _Reader:
    """Strict access to one mapping of a profile, with messages naming file and dotted key."""

    def __init__(self, data: Any, where: str, prefix: str = ""):
        if not isinstance(data, dict):
            raise ProfileError(f"{where}: key {prefix or '<root>'!r} must be a mapping, got {type(data).__name__}")
        self.data, self.where, self.prefix = data, where, prefix

    def key(self, name: str) -> str:
        return f"{self.prefix}.{name}" if self.prefix else name

    def value(self, name: str) -> Any:
        if name not in self.data:
            raise ProfileError(f"{self.where}: missing key {self.key(name)!r}")
        return self.data[name]

    def section(self, name: str) -> dict:
        value = self.value(name)
        if not isinstance(value, dict):
            raise ProfileError(f"{self.where}: key {self.key(name)!r} must be a mapping, got {value!r}")
        return value

    def integer(self, name: str) -> int:
        value = self.value(name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ProfileError(f"{self.where}: key {self.key(name)!r} must be an integer >= 1, got {value!r}")
        return value

    def positive(self, name: str) -> float:
        value = self.value(name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
            raise ProfileError(f"{self.where}: key {self.key(name)!r} must be a finite number > 0, got {value!r}")
        return float(value)

    def vector(self, name: str, dim: int, positive: bool = False) -> np.ndarray:
        value = self.value(name)
        ok = isinstance(value, list) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
        if not ok or len(value) != dim:
            raise ProfileError(f"{self.where}: key {self.key(name)!r} must be a list of {dim} numbers (action_dim), "
                               f"got {value!r}")
        array = np.asarray(value, dtype=np.float64)
        if not np.isfinite(array).all() or (positive and (array <= 0).any()):
            raise ProfileError(f"{self.where}: key {self.key(name)!r} must hold finite numbers"
                               f"{' > 0' if positive else ''}, got {value!r}")
        return array
