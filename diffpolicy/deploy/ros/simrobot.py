"""A simulated robot behind ROS topics: one of the package's tasks, stepped in real time.

    robot = SimulatedRobot(transport, config, load_task("pusht"), seeds=[0, 1], max_steps=100)
    results = robot.run(stop_event)         # [{"seed", "success", "coverage", "steps"}, ...]

Every 1 / control_hz seconds it publishes each observation key on its topic (JointState
`position`, or an rgb8 Image for image keys, stamped with the wall clock) and, once a command has arrived, steps the environment
with the newest command (a robot executes its latest setpoint; before the first one it stands
still). An episode ends at success, at the environment's end or after `max_steps`; its result
goes to `<heartbeat_topic>/episode` as JSON (coverage: the episode's best, as evaluation scores it). Between episodes the robot stops publishing for
`pause_s` (longer than the bridge's dropout age), so the bridge holds and starts the next
episode with a fresh controller, as it would after any publisher dropout.
"""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import numpy as np

from diffpolicy.deploy.ros.config import BridgeConfig
from diffpolicy.deploy.ros.transport import Image, JointState, Transport
from diffpolicy.envs.tasks import TaskCard, make_env


def episode_topic(config: BridgeConfig) -> str:
    return config.heartbeat_topic.rstrip("/") + "/episode"


class SimulatedRobot:
    def __init__(self, transport: Transport, config: BridgeConfig, card: TaskCard, seeds: list[int],
                 max_steps: int | None = None, pause_s: float | None = None):
        self.config, self.card, self.seeds = config, card, list(seeds)
        self.max_steps = max_steps or int(card.max_episode_steps)
        self.pause_s = 2.5 * config.max_observation_age_s if pause_s is None else pause_s
        self.period = 1.0 / float(card.control_hz)
        self.env = make_env(card)
        self.publishers = {o.key: (transport.image_publisher if o.type == "image" else transport.joint_state_publisher)(
            o.topic) for o in config.observations}
        self.image_keys = {o.key for o in config.observations if o.type == "image"}
        self.publish_episode = transport.text_publisher(episode_topic(config))
        self.command: np.ndarray | None = None
        self.commands_received = 0
        self.lock = threading.Lock()
        transport.subscribe_joint_state(config.command_topic, self._on_command)

    def _on_command(self, message: JointState) -> None:
        position = np.asarray(message.position, dtype=np.float64)
        if position.shape == (self.card.action_dim,) and np.isfinite(position).all():
            with self.lock:
                self.command = position
                self.commands_received += 1

    def _publish(self, obs: dict[str, Any]) -> None:
        stamp = time.time()
        for key, publish in self.publishers.items():
            if key in self.image_keys:
                publish(Image.from_array(stamp, obs[key]))
            else:
                publish(JointState(stamp=stamp, position=np.asarray(obs[key], dtype=np.float64).reshape(-1)))

    def run(self, stop: threading.Event) -> list[dict[str, Any]]:
        results = []
        for seed in self.seeds:
            if stop.is_set():
                break
            results.append(self.episode(seed, stop))
            self.publish_episode(json.dumps(results[-1]))
            stop.wait(self.pause_s)
        return results

    def episode(self, seed: int, stop: threading.Event) -> dict[str, Any]:
        obs, info = self.env.reset(seed=seed)
        with self.lock:
            self.command = None
        steps, success, done = 0, bool(info.get("is_success", False)), False
        coverage = float(info.get("coverage", float("nan")))
        next_tick = time.monotonic()
        while not (stop.is_set() or done or success or steps >= self.max_steps):
            self._publish(obs)
            next_tick += self.period
            time.sleep(max(0.0, next_tick - time.monotonic()))
            with self.lock:
                command = self.command
            if command is None:
                continue
            obs, _, terminated, truncated, info = self.env.step(command)
            steps += 1
            success, done = bool(info.get("is_success", False)), terminated or truncated
            coverage = max(coverage, float(info.get("coverage", float("nan"))))
        self._publish(obs)
        return {"seed": seed, "success": success, "coverage": coverage, "steps": steps}
