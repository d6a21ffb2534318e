"""The bridge's configuration: which topics carry which observation keys, where commands and the
heartbeat go, and the robot profile (limits, rates) of the controller. Read from YAML
(`deploy/bridge/<name>.yaml`) with the package's strict config reader.

    name: pusht
    robot_profile: pusht                    # deploy/profiles/pusht.yaml: limits, control_hz, watchdog
    observations:                           # one topic per observation key
      - {key: agent_pos, topic: /pusht/agent_pos}            # sensor_msgs/JointState, values in `position`
      - {key: keypoints, topic: /pusht/keypoints, names: []}   # names: pick joints by name (optional)
      - {key: image, topic: /camera/image, type: image}      # sensor_msgs/Image, rgb8 (image keys)
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

from diffpolicy.config import check_choice, check_float, fail, from_dict
from diffpolicy.deploy.errors import BridgeError
from diffpolicy.errors import MissingFileError

BRIDGE_DIR = Path(__file__).resolve().parents[3] / "deploy" / "bridge"
TOPIC_TYPES = ("joint_state", "image")


@dataclass(frozen=True)
class ObservationTopic:
    """One observation key fed by a topic: the `position` array of a JointState (picked by `names`
    if given), or an rgb8 Image for an image key (`type: image`)."""

    key: str
    topic: str
    names: tuple[str, ...] = ()
    type: str = "joint_state"

    def __post_init__(self) -> None:
        for name, value in (("key", self.key), ("topic", self.topic)):
            if not value:
                raise fail(f"observations.{name}", "a non-empty string", value)
        check_choice("observations.type", self.type, TOPIC_TYPES)
        if self.type == "image" and self.names:
            raise fail("observations.names", "no joint names on an image topic", self.names)


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
        """The topics must feed exactly the policy's observation keys: JointState topics the 1-D
        keys, image topics the (H, W, 3) keys."""
        keys = {o.key for o in self.observations}
        if keys != set(obs_shapes):
            raise BridgeError(f"bridge {self.name!r}: observation topics feed {sorted(keys)}, the policy expects "
                              f"{sorted(obs_shapes)}")
        for topic in self.observations:
            shape = tuple(obs_shapes[topic.key])
            expected = "image" if len(shape) == 3 and shape[2] == 3 else "joint_state" if len(shape) == 1 else None
            if topic.type != expected:
                raise BridgeError(f"bridge {self.name!r}: observation {topic.key!r} of shape {shape} needs "
                                  f"{'a topic of type ' + repr(expected) if expected else 'a shape (d,) or (H, W, 3)'}"
                                  f", got type {topic.type!r} ({topic.topic})")


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
