"""`diffpolicy bridge`: run a policy on a robot through ROS 1 (rospy) or ROS 2 (Cyclone DDS).

    diffpolicy bridge --config pusht --transport ros1 --checkpoint runs/pusht_diffusion
    diffpolicy bridge --config pusht --transport ros2 --server tcp://127.0.0.1:5555 --mode rtc

The bridge subscribes to the observation topics of `deploy/bridge/<config>.yaml`, runs the
real-time controller (mode, robot profile limits, safety filter) on a local checkpoint or on a
policy server (`diffpolicy serve`), publishes commands at the profile's control rate and a
heartbeat. SIGTERM or Ctrl-C: hold for `stop_hold_s`, then stop (exit 0).
"""

from __future__ import annotations

import argparse
import signal
import threading

import torch

from diffpolicy.control.modes import MODES, make_mode
from diffpolicy.control.profile import load_profile
from diffpolicy.control.realtime import RealTimeController
from diffpolicy.deploy.auth import ClientKeys
from diffpolicy.deploy.client import RemotePolicy
from diffpolicy.deploy.ros.bridge import Bridge
from diffpolicy.deploy.ros.config import load_bridge_config
from diffpolicy.deploy.ros.transport import TRANSPORTS, make_transport
from diffpolicy.errors import UsageError
from diffpolicy.policies import ChunkPolicy
from diffpolicy.policies.locate import resolve_policy_dir


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="bridge config: a name in deploy/bridge/ or a YAML path")
    parser.add_argument("--transport", required=True, choices=TRANSPORTS,
                        help="ros1 (rospy), ros2 (Cyclone DDS) or rclpy (a ROS 2 installation's rclpy)")
    parser.add_argument("--domain-id", type=int, default=0, help="ROS 2 / DDS domain id")
    parser.add_argument("--checkpoint", default=None, help="a local policy (run, checkpoint or save_pretrained dir)")
    parser.add_argument("--server", default=None, help="a policy server address, tcp://host:port")
    parser.add_argument("--client-key", default=None, help="CURVE: this client's *.key_secret file")
    parser.add_argument("--server-key", default=None, help="CURVE: the server's public server.key file")
    parser.add_argument("--mode", default="sync", choices=MODES, help="controller mode (streaming needs --checkpoint)")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default: the policy's)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the controller's noise")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")


def load_policy(args: argparse.Namespace):
    if (args.checkpoint is None) == (args.server is None):
        raise UsageError("diffpolicy bridge: give exactly one of --checkpoint DIR and --server ADDRESS")
    if args.checkpoint is not None:
        return ChunkPolicy.from_pretrained(resolve_policy_dir(args.checkpoint))
    keys = None
    if args.client_key or args.server_key:
        if not (args.client_key and args.server_key):
            raise UsageError("diffpolicy bridge: CURVE needs both --client-key and --server-key")
        keys = ClientKeys.load(args.client_key, args.server_key)
    return RemotePolicy.connect(args.server, keys=keys)


def run(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    config = load_bridge_config(args.config)
    profile = load_profile(config.robot_profile)
    policy = load_policy(args)
    mode_options = {"binary_dims": profile.binary_dims} if args.mode == "warmstart" else {}

    def make_controller() -> RealTimeController:
        return RealTimeController(policy, make_mode(args.mode, **mode_options), profile, steps=args.steps,
                                  seed=args.seed)

    make_controller()  # fail now (action_dim mismatch, ...) rather than at the first observation
    transport = make_transport(args.transport, node="diffpolicy_bridge", domain_id=args.domain_id)
    bridge = Bridge(transport, config, make_controller, dict(policy.config.obs_shapes), profile.control_hz,
                    profile=profile)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    print(f"bridge {config.name!r} on {args.transport}: {[o.topic for o in config.observations]} -> "
          f"{config.command_topic} at {profile.control_hz} Hz, heartbeat {config.heartbeat_topic}", flush=True)
    stats = bridge.run(stop)
    transport.close()
    print(f"bridge stopped: {stats.ticks} ticks, {stats.commands} commands, {stats.holds} holds, "
          f"{stats.restarts} controller starts", flush=True)
    return 0
