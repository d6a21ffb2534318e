"""The bridge's configuration: which topics carry which observation keys, where commands and the
heartbeat go, and the robot profile (limits, rates) of the controller. Read from YAML
(`deploy/bridge/<name>.yaml`) with the package's strict config reader.

    name: pusht
    robot_profile: pusht                    # deploy/profiles/pusht.yaml: limits, control_hz, watchdog
    observations:                           # one sensor_msgs/JointState topic per observation key
      - {key: agent_pos, topic: /pusht/agent_pos}
      - {key: keypoints, topic: /pusht/keypoints, names: []}   # names: pick joints by name (optional)
    position_key: agent_pos                 # the observation that is the robot's commanded position
    command_topic: /pusht/command
    heartbeat_topic: /diffpolicy/heartbeat
    max_observation_age_s: 0.5              # older: hold (publisher dropout)
    stop_hold_s: 0.5                        # on SIGTERM: hold this long, then stop
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import yaml

from diffpolicy.config import check_float, fail, from_dict
from diffpolicy.deploy.errors import BridgeError
from diffpolicy.errors import MissingFileError

BRIDGE_DIR = Path(__file__).resolve().parents[3] / "deploy" / "bridge"


@dataclass(frozen=True)
class ObservationTopic:
    """One observation key fed by the `position` array of a JointState topic (picked by `names` if given)."""

    key: str
    topic: str
    names: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name, value in (("key", self.key), ("topic", self.topic)):
            if not value:
                raise fail(f"observations.{name}", "a non-empty string", value)


@dataclass(frozen=True)
class BridgeConfig:
    name: str
    robot_profile: str
    observations: tuple[ObservationTopic, ...]
    position_key: str
    command_topic: str
    heartbeat_topic: str = "/diffpolicy/heartbeat"
    max_observation_age_s: float = 0.5
    stop_hold_s: float = 0.5

    def __post_init__(self) -> None:
        keys = [o.key for o in self.observations]
        if not keys or len(set(keys)) != len(keys):
            raise fail("observations", "a non-empty list with each key once", keys)
        if self.position_key not in keys:
            raise fail("position_key", f"one of the observation keys {keys}", self.position_key)
        topics = [o.topic for o in self.observations] + [self.command_topic, self.heartbeat_topic]
        if len(set(topics)) != len(topics):
            raise fail("topics", "distinct topics for observations, commands and heartbeat", topics)
        check_float("max_observation_age_s", self.max_observation_age_s, 0, strictly=True)
        check_float("stop_hold_s", self.stop_hold_s, 0)

    def check_policy(self, obs_shapes: dict[str, tuple[int, ...]]) -> None:
        """The topics must feed exactly the policy's observation keys, all low-dimensional."""
        keys = {o.key for o in self.observations}
        if keys != set(obs_shapes):
            raise BridgeError(f"bridge {self.name!r}: observation topics feed {sorted(keys)}, the policy expects "
                              f"{sorted(obs_shapes)}")
        images = sorted(k for k, shape in obs_shapes.items() if len(shape) != 1)
        if images:
            raise BridgeError(f"bridge {self.name!r}: observation keys {images} are not 1-D; only JointState "
                              "topics (low-dimensional keys) are bridged")


def load_bridge_config(name_or_path: str | os.PathLike) -> BridgeConfig:
    """A bridge config by name (`deploy/bridge/<name>.yaml`) or by path."""
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        path = BRIDGE_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in BRIDGE_DIR.glob("*.yaml"))
        raise MissingFileError(f"bridge config {str(name_or_path)!r}: no file {path} (configs in {BRIDGE_DIR}: {known})")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise BridgeError(f"{path}: not valid YAML: {err}") from None
    return from_dict(BridgeConfig, data, "")
