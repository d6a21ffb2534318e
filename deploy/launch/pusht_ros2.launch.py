"""ROS 2: the PushT bridge over Cyclone DDS (and, with sim:=true, the simulated robot).

    ros2 launch deploy/launch/pusht_ros2.launch.py checkpoint:=runs/pusht_diffusion sim:=true

The nodes speak DDS directly (no rclpy); run the ROS 2 side with RMW_IMPLEMENTATION=rmw_cyclonedds_cpp
on the same ROS_DOMAIN_ID. Stop: Ctrl-C (SIGINT: the bridge holds, then stops). Without a ROS 2
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
    return LaunchDescription([
        DeclareLaunchArgument("checkpoint"),
        DeclareLaunchArgument("mode", default_value="sync"),
        DeclareLaunchArgument("sim", default_value="false"),
        ExecuteProcess(cmd=[DIFFPOLICY, "bridge", "--config", "pusht", "--transport", "ros2", "--domain-id", domain,
                            "--checkpoint", checkpoint, "--mode", mode], output="screen", sigterm_timeout="5"),
        ExecuteProcess(cmd=[DIFFPOLICY, "sim-robot", "--config", "pusht", "--transport", "ros2", "--domain-id", domain],
                       output="screen", condition=IfCondition(sim)),
    ])
