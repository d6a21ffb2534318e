"""ROS 2: the PushT bridge (and, with sim:=true, the simulated robot).

    ros2 launch deploy/launch/pusht_ros2.launch.py checkpoint:=runs/pusht_diffusion sim:=true [transport:=rclpy]

transport:=ros2 (the default): the nodes speak DDS directly through Cyclone DDS (no rclpy); the ROS 2
side runs rmw_cyclonedds_cpp, or Fast DDS with CYCLONEDDS_URI=file://$PWD/deploy/cyclonedds_loopback.xml
(edit its addresses beyond loopback). transport:=rclpy: the bridge is a node of this ROS 2
installation on its own RMW (diffpolicy installed in the interpreter that has rclpy). Same
ROS_DOMAIN_ID either way. Stop: Ctrl-C (SIGINT: the bridge holds, then stops). Without a ROS 2
install, run the two commands in the `cmd` lists directly.
"""

import os

from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, ExecuteProcess
from launch.conditions import IfCondition
from launch.substitutions import LaunchConfiguration

DIFFPOLICY = os.environ.get("DIFFPOLICY", "diffpolicy")


def generate_launch_description():
    domain = os.environ.get("ROS_DOMAIN_ID", "0")
    checkpoint, mode, sim = LaunchConfiguration("checkpoint"), LaunchConfiguration("mode"), LaunchConfiguration("sim")
    transport = LaunchConfiguration("transport")
    return LaunchDescription([
        DeclareLaunchArgument("checkpoint"),
        DeclareLaunchArgument("mode", default_value="sync"),
        DeclareLaunchArgument("sim", default_value="false"),
        DeclareLaunchArgument("transport", default_value="ros2"),
        ExecuteProcess(cmd=[DIFFPOLICY, "bridge", "--config", "pusht", "--transport", transport, "--domain-id", domain,
                            "--checkpoint", checkpoint, "--mode", mode], output="screen", sigterm_timeout="5"),
        ExecuteProcess(cmd=[DIFFPOLICY, "sim-robot", "--config", "pusht", "--transport", transport, "--domain-id", domain],
                       output="screen", condition=IfCondition(sim)),
    ])
