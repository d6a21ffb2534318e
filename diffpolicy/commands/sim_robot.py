"""`diffpolicy sim-robot`: a simulated robot (a package task) behind the bridge's ROS topics.

    diffpolicy sim-robot --config pusht --transport ros1 --seeds 0 1 2 --max-steps 300

Publishes the task's observations on the config's topics, executes the commands it receives, and
publishes each episode's result (JSON) on `<heartbeat_topic>/episode`; prints them at the end.
"""

from __future__ import annotations

import argparse
import json
import signal
import threading

from diffpolicy.deploy.ros.config import load_bridge_config
from diffpolicy.deploy.ros.simrobot import SimulatedRobot
from diffpolicy.deploy.ros.transport import TRANSPORTS, make_transport
from diffpolicy.envs.tasks import load_task


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="bridge config: a name in deploy/bridge/ or a YAML path")
    parser.add_argument("--transport", required=True, choices=TRANSPORTS,
                        help="ros1 (rospy), ros2 (Cyclone DDS) or rclpy (a ROS 2 installation's rclpy)")
    parser.add_argument("--domain-id", type=int, default=0, help="ROS 2 / DDS domain id")
    parser.add_argument("--task", default="pusht", help="the simulated task (its observation keys must match)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="one episode per seed")
    parser.add_argument("--max-steps", type=int, default=None, help="steps per episode (default: the task's)")


def run(args: argparse.Namespace) -> int:
    config = load_bridge_config(args.config)
    transport = make_transport(args.transport, node="diffpolicy_sim_robot", domain_id=args.domain_id)
    robot = SimulatedRobot(transport, config, load_task(args.task), args.seeds, args.max_steps)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    print(f"simulated {args.task} robot on {args.transport}", flush=True)
    results = robot.run(stop)
    transport.close()
    print(json.dumps({"episodes": results, "commands_received": robot.commands_received}), flush=True)
    return 0
