"""ROS 2 transport through rclpy: a real ROS 2 node (whatever RMW the installation runs).

The same topics and types as the Cyclone DDS transport (`dds.py`): sensor_msgs/JointState,
sensor_msgs/Image and std_msgs/String with ROS 2's default QoS (reliable, keep-last 10,
volatile). rclpy comes from a ROS 2 installation (`source /opt/ros/<distro>/setup.bash`) or from
PyPI's ROS 2 wheels in an environment of their own (`ros-rclpy[fastrtps] ros-sensor-msgs
ros-std-msgs`; they cannot share an interpreter with ROS 1's rospy, whose `std_msgs` has the same
name). The node has its own rclpy context on `domain_id` and an executor spinning on a daemon
thread, so callbacks run there, as they run on the middleware's threads in the other transports.

A node on another RMW talks to it as it talks to any ROS 2 node; a Cyclone DDS peer (the `ros2`
transport) talking to Fast DDS needs Cyclone's `Compatibility/IgnoreTypeInformation` set to
Fast DDS's vendor id, 1.15 (`deploy/cyclonedds_loopback.xml`): Cyclone rejects the type objects
Fast DDS announces for sequence fields and would otherwise never match its writers.
"""

from __future__ import annotations

import array
import threading
from collections.abc import Callable

import numpy as np

from diffpolicy.deploy.errors import BridgeError
from diffpolicy.deploy.ros.transport import Image, JointState, Transport

try:
    import rclpy
    from rclpy.context import Context
    from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
    from rclpy.signals import SignalHandlerOptions
    from sensor_msgs.msg import Image as RosImage
    from sensor_msgs.msg import JointState as RosJointState
    from std_msgs.msg import String as RosString
except ImportError as err:  # no ROS 2 installation in this interpreter
    raise BridgeError(f"the rclpy transport needs a ROS 2 installation's rclpy ({err}): source "
                      "/opt/ros/<distro>/setup.bash, or pip install 'ros-rclpy[fastrtps]' ros-sensor-msgs ros-std-msgs "
                      "in an environment without ROS 1's rospy") from None

DEPTH = 10  # ROS 2's default QoS profile: reliable, keep last 10, volatile


def to_ros(message: JointState) -> RosJointState:
    ros = RosJointState()
    ros.header.stamp.sec, ros.header.stamp.nanosec = message.stamp_parts()
    ros.name = list(message.names)
    ros.position, ros.velocity, ros.effort = (array.array("d", np.asarray(a, dtype=np.float64))
                                              for a in (message.position, message.velocity, message.effort))
    return ros


def image_to_ros(image: Image) -> RosImage:
    ros = RosImage(height=image.height, width=image.width, encoding=image.encoding, is_bigendian=0, step=image.step,
                   data=array.array("B", image.data))
    ros.header.stamp.sec, ros.header.stamp.nanosec = image.stamp_parts()
    return ros


class RclpyTransport(Transport):
    name = "rclpy"

    def __init__(self, node: str, domain_id: int = 0):
        self._context = Context()
        # no rclpy signal handlers: the bridge handles SIGTERM itself (hold, then stop)
        rclpy.init(context=self._context, domain_id=domain_id, signal_handler_options=SignalHandlerOptions.NO)
        self.node = rclpy.create_node(node, context=self._context)
        self._executor = SingleThreadedExecutor(context=self._context)
        self._executor.add_node(self.node)
        self._spinner = threading.Thread(target=self._spin, name="diffpolicy-rclpy", daemon=True)
        self._spinner.start()

    def _spin(self) -> None:
        try:
            while self._context.ok():
                self._executor.spin_once(timeout_sec=0.1)
        except ExternalShutdownException:  # close() shut the context down mid-wait
            pass

    def _publisher(self, kind: type, topic: str, convert: Callable) -> Callable:
        publisher = self.node.create_publisher(kind, topic, DEPTH)
        return lambda message: publisher.publish(convert(message))

    def _subscribe(self, kind: type, topic: str, convert: Callable, callback: Callable) -> None:
        self.node.create_subscription(kind, topic, lambda ros: callback(convert(ros)), DEPTH)

    def joint_state_publisher(self, topic: str) -> Callable[[JointState], None]:
        return self._publisher(RosJointState, topic, to_ros)

    def subscribe_joint_state(self, topic: str, callback: Callable[[JointState], None]) -> None:
        self._subscribe(RosJointState, topic, JointState.from_ros2, callback)

    def image_publisher(self, topic: str) -> Callable[[Image], None]:
        return self._publisher(RosImage, topic, image_to_ros)

    def subscribe_image(self, topic: str, callback: Callable[[Image], None]) -> None:
        self._subscribe(RosImage, topic, Image.from_ros2, callback)

    def text_publisher(self, topic: str) -> Callable[[str], None]:
        return self._publisher(RosString, topic, lambda text: RosString(data=text))

    def subscribe_text(self, topic: str, callback: Callable[[str], None]) -> None:
        self._subscribe(RosString, topic, lambda ros: ros.data, callback)

    def close(self) -> None:
        if not self._context.ok():
            return
        self._context.shutdown()
        self._spinner.join(5)
        self._executor.shutdown()
        self.node.destroy_node()
