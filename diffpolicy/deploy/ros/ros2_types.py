"""ROS 2 wire types as Cyclone DDS IDL structs, so a ROS 2 node using rmw_cyclonedds talks to us
without rclpy: the type names are ROS 2's DDS names (`<pkg>::msg::dds_::<Type>_`) and topics carry
ROS 2's `rt/` prefix (`ros2_topic("/joint_states") == "rt/joint_states"`). Field order and types
follow the .msg definitions (sensor_msgs/JointState, std_msgs/Header, builtin_interfaces/Time,
std_msgs/String).
"""
# No `from __future__ import annotations`: cyclonedds resolves these annotations at runtime.

from dataclasses import dataclass

from cyclonedds.idl import IdlStruct
from cyclonedds.idl.types import float64, int32, sequence, uint8, uint32


@dataclass
class Time_(IdlStruct, typename="builtin_interfaces::msg::dds_::Time_"):
    sec: int32
    nanosec: uint32


@dataclass
class Header_(IdlStruct, typename="std_msgs::msg::dds_::Header_"):
    stamp: Time_
    frame_id: str


@dataclass
class JointState_(IdlStruct, typename="sensor_msgs::msg::dds_::JointState_"):
    header: Header_
    name: sequence[str]
    position: sequence[float64]
    velocity: sequence[float64]
    effort: sequence[float64]


@dataclass
class String_(IdlStruct, typename="std_msgs::msg::dds_::String_"):
    data: str


def ros2_topic(name: str) -> str:
    """A ROS 2 topic name -> its DDS topic name ("/a/b" and "a/b" -> "rt/a/b")."""
    return "rt/" + name.lstrip("/")


@dataclass
class Image_(IdlStruct, typename="sensor_msgs::msg::dds_::Image_"):
    header: Header_
    height: uint32
    width: uint32
    encoding: str
    is_bigendian: uint8
    step: uint32
    data: sequence[uint8]
