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
    delta_dims: []              # dimensions commanded as a change per tick (held at 0, not repeated)
    watchdog: {max_observation_age_s: 0.3, max_inference_s: 2.0}

Every key is required. The file is read by the package's one config reader (`diffpolicy.config`)
into `ProfileFile`; a missing or unknown key, a value of the wrong type, a list of the wrong length,
low >= high, a non-positive rate or limit raise `ProfileError` naming the file and the key.

Holding. Whenever the controller holds (a blocking inference, an underrun, a stalled worker, a stale
observation, a non-finite target) it commands `RobotProfile.hold_target(last command)`: the last
command for absolute dimensions (a position target, a gripper), 0 for `delta_dims` (end-effector
deltas, velocities), since repeating the last delta would keep the robot moving. A delta dimension's
position range must contain 0 and it cannot be binary.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from diffpolicy.config import ConfigError, check_float, fail, from_dict
from diffpolicy.control.errors import ProfileError, ProfileMissingError

PROFILE_DIR = Path(__file__).resolve().parents[2] / "deploy" / "profiles"


@dataclass(frozen=True)
class PositionLimits:
    low: tuple[float, ...]
    high: tuple[float, ...]


@dataclass(frozen=True)
class Limits:
    position: PositionLimits
    velocity: tuple[float, ...]  # per second
    acceleration: tuple[float, ...]  # per second^2


@dataclass(frozen=True)
class WatchdogLimits:
    max_observation_age_s: float
    max_inference_s: float

    def __post_init__(self) -> None:
        for name in ("max_observation_age_s", "max_inference_s"):
            check_float(f"watchdog.{name}", getattr(self, name), 0, strictly=True)


@dataclass(frozen=True)
class ProfileFile:
    """A profile file as written (the module docstring); `RobotProfile` is what the controller uses."""

    name: str
    action_dim: int
    control_hz: float
    robot_hz: float
    limits: Limits
    seam_jump: float
    binary_dims: tuple[int, ...]
    delta_dims: tuple[int, ...]
    watchdog: WatchdogLimits

    def __post_init__(self) -> None:
        dim = self.action_dim
        if dim < 1:
            raise fail("action_dim", "an integer >= 1", dim)
        for name in ("control_hz", "robot_hz", "seam_jump"):
            check_float(name, getattr(self, name), 0, strictly=True)
        ratio = self.robot_hz / self.control_hz
        if abs(ratio - round(ratio)) > 1e-9 or round(ratio) < 1:
            raise fail("robot_hz", f"an integer multiple (>= 1) of control_hz = {self.control_hz}", self.robot_hz)
        for key, values, positive in (("limits.position.low", self.limits.position.low, False),
                                      ("limits.position.high", self.limits.position.high, False),
                                      ("limits.velocity", self.limits.velocity, True),
                                      ("limits.acceleration", self.limits.acceleration, True)):
            if len(values) != dim:
                raise fail(key, f"a list of {dim} numbers (action_dim)", list(values))
            for value in values:
                check_float(key, value, 0 if positive else None, strictly=positive)
        low, high = np.asarray(self.limits.position.low), np.asarray(self.limits.position.high)
        bad = np.nonzero(low >= high)[0]
        if bad.size:
            i = int(bad[0])
            raise ConfigError(f"config key 'limits.position': low must be < high in every dimension, got "
                               f"low[{i}] = {low[i]} >= high[{i}] = {high[i]}")
        if not all(0 <= b < dim for b in self.binary_dims):
            raise fail("binary_dims", f"a list of action dimensions in [0, {dim})", list(self.binary_dims))
        if not all(0 <= d < dim for d in self.delta_dims) or len(set(self.delta_dims)) != len(self.delta_dims):
            raise fail("delta_dims", f"a list of distinct action dimensions in [0, {dim})", list(self.delta_dims))
        for d in self.delta_dims:
            if d in self.binary_dims:
                raise fail("delta_dims", "dimensions that are not binary_dims (a delta is not binary)",
                           list(self.delta_dims))
            if not low[d] <= 0.0 <= high[d]:
                raise fail("delta_dims", f"dimensions whose position limits contain 0 (the held delta); "
                           f"dimension {d} has [{low[d]}, {high[d]}]", list(self.delta_dims))


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
    delta_dims: tuple[int, ...]
    max_observation_age_s: float
    max_inference_s: float

    def hold_target(self, last_command: np.ndarray) -> np.ndarray:
        """What holding commands `(Da,)`: `last_command (Da,)` with the delta dimensions at 0."""
        target = np.array(last_command, dtype=np.float64, copy=True)
        target[list(self.delta_dims)] = 0.0
        return target

    @property
    def substeps(self) -> int:
        """Robot commands per control tick (robot_hz / control_hz)."""
        return int(round(self.robot_hz / self.control_hz))

    @classmethod
    def from_dict(cls, data: Any, where: str = "<profile>") -> RobotProfile:
        """A profile from its parsed YAML; errors name `where` (the file) and the key."""
        try:
            raw = from_dict(ProfileFile, data)
        except ConfigError as err:
            raise ProfileError(f"{where}: {err}") from None
        limits = raw.limits
        return cls(name=raw.name, action_dim=raw.action_dim, control_hz=raw.control_hz, robot_hz=raw.robot_hz,
                   position_low=np.asarray(limits.position.low, dtype=np.float64),
                   position_high=np.asarray(limits.position.high, dtype=np.float64),
                   velocity=np.asarray(limits.velocity, dtype=np.float64),
                   acceleration=np.asarray(limits.acceleration, dtype=np.float64),
                   seam_jump=raw.seam_jump, binary_dims=raw.binary_dims, delta_dims=raw.delta_dims,
                   max_observation_age_s=raw.watchdog.max_observation_age_s,
                   max_inference_s=raw.watchdog.max_inference_s)


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
