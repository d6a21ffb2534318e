"""ROS 1 transport through rospy (Debian's python3-rospy, python3-sensor-msgs, python3-std-msgs).

The venv sees Debian's packages through a .pth file that appends /usr/lib/python3/dist-packages
after the venv's own site-packages. One rospy node per process (rospy's rule); the master comes
from ROS_MASTER_URI. rospy's own signal handlers are disabled: the bridge handles SIGTERM itself.
"""

from __future__ import annotations

from collections.abc import Callable

from diffpolicy.deploy.errors import BridgeError
from diffpolicy.deploy.ros.transport import Image, JointState, Transport

try:
    import rosgraph
    import rospy
    from sensor_msgs.msg import Image as RosImage
    from sensor_msgs.msg import JointState as RosJointState
    from std_msgs.msg import String as RosString
except ImportError as err:  # the optional extra is missing
    raise BridgeError(f"the ros1 transport needs rospy ({err}); on Debian: apt-get install -y python3-rospy ros-core "
                      "python3-std-msgs python3-sensor-msgs, and a .pth that appends /usr/lib/python3/dist-packages "
                      "to the venv") from None

import numpy as np

from diffpolicy.deploy.ros.ros1_master import MasterWatch

QUEUE = 1  # the newest message only: a controller never wants a stale backlog


def to_ros(message: JointState) -> RosJointState:
    ros = RosJointState()
    ros.header.stamp = rospy.Time(*message.stamp_parts())
    ros.name = list(message.names)
    ros.position, ros.velocity, ros.effort = (list(map(float, a)) for a in
                                              (message.position, message.velocity, message.effort))
    return ros


def from_ros(ros: RosJointState) -> JointState:
    return JointState(stamp=ros.header.stamp.to_sec(), names=tuple(ros.name),
                      position=np.asarray(ros.position, dtype=np.float64),
                      velocity=np.asarray(ros.velocity, dtype=np.float64),
                      effort=np.asarray(ros.effort, dtype=np.float64))


def image_to_ros(image: Image) -> RosImage:
    ros = RosImage(height=image.height, width=image.width, encoding=image.encoding, is_bigendian=0, step=image.step,
                   data=image.data)
    ros.header.stamp = rospy.Time(*image.stamp_parts())
    return ros


def image_from_ros(ros: RosImage) -> Image:
    return Image(ros.header.stamp.to_sec(), ros.height, ros.width, ros.encoding, bytes(ros.data), ros.step)


class Ros1Transport(Transport):
    name = "ros1"

    def __init__(self, node: str):
        rospy.init_node(node, anonymous=True, disable_signals=True)
        self._handles: list = []
        self.watch = MasterWatch(rosgraph.get_master_uri())

    def connected(self) -> bool:
        return self.watch.connected

    @property
    def reconnections(self) -> int:
        return self.watch.reconnections

    def joint_state_publisher(self, topic: str) -> Callable[[JointState], None]:
        publisher = rospy.Publisher(topic, RosJointState, queue_size=QUEUE, tcp_nodelay=True)
        self._handles.append(publisher)
        return lambda message: publisher.publish(to_ros(message))

    def subscribe_joint_state(self, topic: str, callback: Callable[[JointState], None]) -> None:
        self._handles.append(rospy.Subscriber(topic, RosJointState, lambda ros: callback(from_ros(ros)),
                                              queue_size=QUEUE, tcp_nodelay=True))

    def image_publisher(self, topic: str) -> Callable[[Image], None]:
        publisher = rospy.Publisher(topic, RosImage, queue_size=QUEUE, tcp_nodelay=True)
        self._handles.append(publisher)
        return lambda image: publisher.publish(image_to_ros(image))

    def subscribe_image(self, topic: str, callback: Callable[[Image], None]) -> None:
        self._handles.append(rospy.Subscriber(topic, RosImage, lambda ros: callback(image_from_ros(ros)),
                                              queue_size=QUEUE, tcp_nodelay=True, buff_size=2 ** 24))

    def text_publisher(self, topic: str) -> Callable[[str], None]:
        publisher = rospy.Publisher(topic, RosString, queue_size=10)
        self._handles.append(publisher)
        return lambda text: publisher.publish(RosString(data=text))

    def subscribe_text(self, topic: str, callback: Callable[[str], None]) -> None:
        self._handles.append(rospy.Subscriber(topic, RosString, lambda ros: callback(ros.data), queue_size=10))

    def close(self) -> None:
        self.watch.close()
        for handle in self._handles:
            handle.unregister()
        rospy.signal_shutdown("diffpolicy transport closed")
