"""ROS 2 transport through Cyclone DDS directly (the `cyclonedds` package; no rclpy needed).

Topics are ROS 2's (`rt/<topic>`) with ROS 2's wire types (`ros2_types`), reliable, keep-last
10 (ROS 2's default QoS profile), so `ros2 topic echo /pusht/command` on a ROS 2 machine with
rmw_cyclonedds sees the bridge's commands. Readers deliver through a listener on Cyclone's thread.
Where a ROS 2 installation provides rclpy the same topics are reachable through it; this machine
has none, so this transport is the one that is tested.
"""

from __future__ import annotations

from collections.abc import Callable

from diffpolicy.deploy.errors import BridgeError
from diffpolicy.deploy.ros.transport import Image, JointState, Transport

try:
    from cyclonedds.core import Listener, Policy, Qos
    from cyclonedds.domain import DomainParticipant
    from cyclonedds.pub import DataWriter
    from cyclonedds.sub import DataReader
    from cyclonedds.topic import Topic

    from diffpolicy.deploy.ros.ros2_types import Header_, Image_, JointState_, String_, Time_, ros2_topic
except ImportError as err:  # the optional extra is missing
    raise BridgeError(f"the ros2 transport needs the cyclonedds package ({err}); pip install 'diffpolicy[ros2]'") from None

QOS = Qos(Policy.Reliability.Reliable(max_blocking_time=100_000_000), Policy.History.KeepLast(10),
          Policy.Durability.Volatile)


def to_dds(message: JointState) -> JointState_:
    sec, nanosec = message.stamp_parts()
    return JointState_(header=Header_(stamp=Time_(sec=sec, nanosec=nanosec), frame_id=""), name=list(message.names),
                       position=[float(v) for v in message.position], velocity=[float(v) for v in message.velocity],
                       effort=[float(v) for v in message.effort])


def image_to_dds(image: Image) -> Image_:
    sec, nanosec = image.stamp_parts()
    return Image_(header=Header_(stamp=Time_(sec=sec, nanosec=nanosec), frame_id=""), height=image.height,
                  width=image.width, encoding=image.encoding, is_bigendian=0, step=image.step, data=image.data)


class DdsTransport(Transport):
    name = "ros2"

    def __init__(self, domain_id: int = 0):
        self.participant = DomainParticipant(domain_id)
        self._topics: dict[tuple[str, type], Topic] = {}
        self._entities: list = []

    def _topic(self, name: str, kind: type) -> Topic:
        key = (name, kind)
        if key not in self._topics:
            self._topics[key] = Topic(self.participant, ros2_topic(name), kind, qos=QOS)
        return self._topics[key]

    def _writer(self, name: str, kind: type) -> DataWriter:
        writer = DataWriter(self.participant, self._topic(name, kind), qos=QOS)
        self._entities.append(writer)
        return writer

    def _reader(self, name: str, kind: type, deliver: Callable) -> None:
        def on_data_available(reader: DataReader) -> None:
            for sample in reader.take(N=32):
                if isinstance(sample, kind):  # skip the invalid samples that announce a disposed writer
                    deliver(sample)

        reader = DataReader(self.participant, self._topic(name, kind), qos=QOS,
                            listener=Listener(on_data_available=on_data_available))
        self._entities.append(reader)

    def joint_state_publisher(self, topic: str) -> Callable[[JointState], None]:
        writer = self._writer(topic, JointState_)
        return lambda message: writer.write(to_dds(message))

    def subscribe_joint_state(self, topic: str, callback: Callable[[JointState], None]) -> None:
        self._reader(topic, JointState_, lambda sample: callback(JointState.from_ros2(sample)))

    def image_publisher(self, topic: str) -> Callable[[Image], None]:
        writer = self._writer(topic, Image_)
        return lambda image: writer.write(image_to_dds(image))

    def subscribe_image(self, topic: str, callback: Callable[[Image], None]) -> None:
        self._reader(topic, Image_, lambda sample: callback(Image.from_ros2(sample)))

    def text_publisher(self, topic: str) -> Callable[[str], None]:
        writer = self._writer(topic, String_)
        return lambda text: writer.write(String_(data=text))

    def subscribe_text(self, topic: str, callback: Callable[[str], None]) -> None:
        self._reader(topic, String_, lambda sample: callback(sample.data))

    def close(self) -> None:
        self._entities.clear()
        self._topics.clear()
        self.participant = None
