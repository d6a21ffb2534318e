"""One interface for the bridge's middleware: joint-state and text topics, publish and subscribe.

`JointState` is sensor_msgs/JointState without the ROS types (stamp in seconds, names, position,
velocity, effort) and `Image` sensor_msgs/Image (rgb8 only); each transport converts them to its
own message classes. Text topics carry std_msgs/String (the heartbeat's JSON). Callbacks run on
the middleware's threads.

    transport = make_transport("ros1", node="diffpolicy_bridge")      # or "ros2" (Cyclone DDS), "rclpy"
    publish = transport.joint_state_publisher("/pusht/command")
    transport.subscribe_joint_state("/pusht/agent_pos", on_message)
    publish(JointState(stamp=time.time(), names=("x", "y"), position=np.array([1.0, 2.0])))
    transport.close()
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from diffpolicy.deploy.errors import BridgeError

TRANSPORTS = ("ros1", "ros2", "rclpy")


@dataclass
class JointState:
    """A sensor_msgs/JointState: header stamp (seconds since the epoch), joint names, arrays `(n,)`."""

    stamp: float
    names: tuple[str, ...] = ()
    position: np.ndarray = field(default_factory=lambda: np.zeros(0))
    velocity: np.ndarray = field(default_factory=lambda: np.zeros(0))
    effort: np.ndarray = field(default_factory=lambda: np.zeros(0))

    def stamp_parts(self) -> tuple[int, int]:
        """(sec, nanosec) of the stamp, as ROS headers hold it."""
        sec = math.floor(self.stamp)
        return sec, min(round((self.stamp - sec) * 1e9), 999_999_999)

    @classmethod
    def from_ros2(cls, message) -> JointState:
        """From a ROS 2 sensor_msgs/JointState: rclpy's message or the DDS type (the same fields)."""
        return cls(stamp=ros2_stamp(message), names=tuple(message.name),
                   position=np.asarray(message.position, dtype=np.float64),
                   velocity=np.asarray(message.velocity, dtype=np.float64),
                   effort=np.asarray(message.effort, dtype=np.float64))


@dataclass
class Image:
    """A sensor_msgs/Image: header stamp (seconds), `height` x `width`, `encoding`, row `step`, bytes."""

    stamp: float
    height: int
    width: int
    encoding: str
    data: bytes
    step: int = 0

    @classmethod
    def from_array(cls, stamp: float, array: np.ndarray) -> Image:
        """An rgb8 image from a uint8 array `(H, W, 3)`."""
        array = np.ascontiguousarray(array, dtype=np.uint8)
        if array.ndim != 3 or array.shape[2] != 3:
            raise BridgeError(f"an rgb8 image needs a uint8 array (H, W, 3), got shape {array.shape}")
        return cls(stamp, array.shape[0], array.shape[1], "rgb8", array.tobytes(), 3 * array.shape[1])

    def stamp_parts(self) -> tuple[int, int]:
        return JointState(self.stamp).stamp_parts()

    @classmethod
    def from_ros2(cls, message) -> Image:
        """From a ROS 2 sensor_msgs/Image: rclpy's message or the DDS type (the same fields)."""
        return cls(ros2_stamp(message), message.height, message.width, message.encoding, bytes(message.data),
                   message.step)


def ros2_stamp(message) -> float:
    """A ROS 2 message's header stamp (`sec`, `nanosec`) in seconds."""
    stamp = message.header.stamp
    return stamp.sec + stamp.nanosec * 1e-9


class Transport:
    """The middleware interface (module docstring)."""

    name = ""
    reconnections = 0  # times the middleware came back after a loss (ROS 1: a restarted master)

    def connected(self) -> bool:
        """Whether the middleware can make connections now. ROS 1: its master answers. DDS has no
        master (discovery is peer to peer, a restarted peer is found again), so by default always."""
        return True

    def joint_state_publisher(self, topic: str) -> Callable[[JointState], None]:
        raise NotImplementedError

    def subscribe_joint_state(self, topic: str, callback: Callable[[JointState], None]) -> None:
        raise NotImplementedError

    def image_publisher(self, topic: str) -> Callable[[Image], None]:
        raise NotImplementedError

    def subscribe_image(self, topic: str, callback: Callable[[Image], None]) -> None:
        raise NotImplementedError

    def text_publisher(self, topic: str) -> Callable[[str], None]:
        raise NotImplementedError

    def subscribe_text(self, topic: str, callback: Callable[[str], None]) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


def make_transport(name: str, node: str, domain_id: int = 0) -> Transport:
    """The transport called `name`: "ros1" (rospy, ROS_MASTER_URI from the environment), "ros2"
    (Cyclone DDS on `domain_id`, ROS 2 wire types) or "rclpy" (a ROS 2 node on `domain_id`).
    Raises `BridgeError` if its middleware is missing."""
    if name == "ros1":
        from diffpolicy.deploy.ros.ros1 import Ros1Transport
        return Ros1Transport(node)
    if name == "ros2":
        from diffpolicy.deploy.ros.dds import DdsTransport
        return DdsTransport(domain_id)
    if name == "rclpy":
        from diffpolicy.deploy.ros.rclpy_ros2 import RclpyTransport
        return RclpyTransport(node, domain_id)
    raise BridgeError(f"unknown transport {name!r}; expected one of {list(TRANSPORTS)}")
