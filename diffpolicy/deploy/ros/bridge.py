"""The ROS bridge: observation topics -> the real-time controller -> command topic, with a heartbeat.

    bridge = Bridge(transport, config, make_controller, obs_shapes)
    bridge.run(stop_event)          # until stop_event is set (the command sets it on SIGTERM)

Every 1 / control_hz seconds the bridge takes the newest message of each observation topic. When
all are fresher than `max_observation_age_s` it feeds them to the controller if every topic has
delivered since the last feed (so the controller's history never holds one frame twice nor a frame
torn between two publications; a new controller, reset at the measured position, after a start or
a dropout), ticks it and publishes the command (the controller's safety-filtered action).

It holds when any observation is missing or stale (a publisher died) and while the transport
reports its middleware lost (`Transport.connected()`: ROS 1's master is gone; flag
"middleware_lost"): it publishes the hold command (with a robot profile: the profile's hold target,
0 on delta dimensions, through a safety filter that follows every published command, so holds and
restarts stay within the limits too; without one: the last command again), drops the controller (its queued chunks
were planned from old observations) and waits for fresh messages and the middleware; then it
starts a new controller. Each tick it publishes a heartbeat (std_msgs/String, JSON): state
("waiting", "running", "holding", "stopping", "stopped"), queue depth, delay estimate, watchdog
and flags, the latency from the newest observation's arrival to the command's publication
(`latency_ms`; it includes the wait for the tick, up to one period), the tick's own time from its
start to the publication (`tick_ms`) and the middleware's reconnections. On stop it holds for
`stop_hold_s`, publishes "stopped" and stops the controller's worker.

Messages that cannot be used (wrong length, missing joint names, non-finite values, images of the
wrong size or encoding) are counted in the heartbeat's `bad_messages` and dropped; they never reach the controller.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from diffpolicy.control.profile import RobotProfile
from diffpolicy.control.safety import SafetyFilter
from diffpolicy.deploy.errors import BridgeError
from diffpolicy.deploy.ros.config import BridgeConfig, ObservationTopic
from diffpolicy.deploy.ros.transport import Image, JointState, Transport

WATCHDOG_FLAGS = ("stale_observation", "stalled_inference", "middleware_lost")


@dataclass
class Received:
    value: np.ndarray
    arrival: float  # the bridge's clock (time.monotonic)
    stamp: float  # the message header (seconds since the epoch)


def observation_value(message: JointState, topic: ObservationTopic, shape: tuple[int, ...]) -> np.ndarray:
    """The observation `shape` carried by `message.position` (picked and ordered by `topic.names`)."""
    position = np.asarray(message.position, dtype=np.float64)
    if topic.names:
        index = {name: i for i, name in enumerate(message.names)}
        missing = [name for name in topic.names if name not in index]
        if missing or len(message.names) != len(position):
            raise BridgeError(f"{topic.topic}: joint names {missing or list(message.names)} missing or without "
                              f"positions; expected {list(topic.names)}")
        position = position[[index[name] for name in topic.names]]
    if position.shape != tuple(shape):
        raise BridgeError(f"{topic.topic}: observation {topic.key!r} needs {shape[0]} positions, got {position.shape[0]}")
    if not np.isfinite(position).all():
        raise BridgeError(f"{topic.topic}: non-finite position in {position.tolist()}")
    return position.astype(np.float32)


def image_value(message: Image, topic: ObservationTopic, shape: tuple[int, ...]) -> np.ndarray:
    """The uint8 observation `(H, W, 3)` carried by an rgb8 image message."""
    if message.encoding != "rgb8":
        raise BridgeError(f"{topic.topic}: image encoding must be 'rgb8', got {message.encoding!r}")
    if (message.height, message.width, 3) != tuple(shape):
        raise BridgeError(f"{topic.topic}: observation {topic.key!r} needs a {shape[0]} x {shape[1]} image, got "
                          f"{message.height} x {message.width}")
    step = message.step or 3 * message.width
    if step < 3 * message.width or len(message.data) != step * message.height:
        raise BridgeError(f"{topic.topic}: {len(message.data)} bytes do not hold {message.height} rows of step {step}")
    rows = np.frombuffer(message.data, dtype=np.uint8).reshape(message.height, step)
    return rows[:, : 3 * message.width].reshape(tuple(shape)).copy()


class ObservationBuffer:
    """The newest valid message of every observation topic (filled on the middleware's threads)."""

    def __init__(self, config: BridgeConfig, obs_shapes: dict[str, tuple[int, ...]],
                 clock: Callable[[], float] = time.monotonic):
        self.config, self.shapes, self.clock = config, obs_shapes, clock
        self.latest: dict[str, Received] = {}
        self.updated: set[str] = set()  # keys with a message since the last `take_new`
        self.bad_messages = 0
        self.last_error = ""
        self.lock = threading.Lock()

    def callback(self, topic: ObservationTopic) -> Callable[[JointState | Image], None]:
        decode = image_value if topic.type == "image" else observation_value

        def on_message(message: JointState | Image) -> None:
            try:
                value = decode(message, topic, self.shapes[topic.key])
            except BridgeError as err:
                with self.lock:
                    self.bad_messages += 1
                    self.last_error = str(err)
                return
            with self.lock:
                self.latest[topic.key] = Received(value, self.clock(), message.stamp)
                self.updated.add(topic.key)
        return on_message

    def take_new(self) -> bool:
        """Whether every key got a message since the last call that returned True (a whole new
        frame: no observation fed twice, none torn between two publications); resets if so."""
        with self.lock:
            if len(self.updated) < len(self.shapes):
                return False
            self.updated.clear()
            return True

    def snapshot(self, now: float) -> tuple[dict[str, np.ndarray] | None, Received | None, float]:
        """(observation, its newest message, age of its oldest message) when every key has a message
        younger than `max_observation_age_s`; else (None, None, age or inf)."""
        with self.lock:
            received = dict(self.latest)
        if len(received) < len(self.shapes):
            return None, None, float("inf")
        age = now - min(r.arrival for r in received.values())
        if age > self.config.max_observation_age_s:
            return None, None, age
        newest = max(received.values(), key=lambda r: r.arrival)
        return {key: r.value for key, r in received.items()}, newest, age


@dataclass
class BridgeStats:
    ticks: int = 0
    commands: int = 0
    holds: int = 0
    restarts: int = 0
    latencies_ms: list[float] = field(default_factory=list)


class Bridge:
    """The bridge loop (module docstring).

    Args:
        transport: the middleware (`make_transport`).
        config: the `BridgeConfig` (topics, dropout age, stop hold).
        make_controller: builds a fresh `RealTimeController` (after a start or a dropout).
        obs_shapes: the policy's `config.obs_shapes` (checked against the topics).
        control_hz: ticks per second (the robot profile's control_hz).
        profile: the robot profile (holds command its hold target; every command passes its safety
            filter); None: holds repeat the last command.
    """

    def __init__(self, transport: Transport, config: BridgeConfig, make_controller: Callable[[], Any],
                 obs_shapes: dict[str, tuple[int, ...]], control_hz: float, clock: Callable[[], float] = time.monotonic,
                 profile: RobotProfile | None = None):
        config.check_policy(obs_shapes)
        self.transport, self.config, self.make_controller = transport, config, make_controller
        self.period, self.clock = 1.0 / control_hz, clock
        self.buffer = ObservationBuffer(config, obs_shapes, clock)
        for topic in config.observations:
            subscribe = transport.subscribe_image if topic.type == "image" else transport.subscribe_joint_state
            subscribe(topic.topic, self.buffer.callback(topic))
        self.publish_command = transport.joint_state_publisher(config.command_topic)
        self.publish_heartbeat = transport.text_publisher(config.heartbeat_topic)
        self.controller: Any = None
        self.last_command: np.ndarray | None = None
        self.profile = profile
        self.safety = None if profile is None else SafetyFilter(profile)
        self.state = "waiting"
        self.stats = BridgeStats()

    # ------------------------------------------------------------------ the loop
    def run(self, stop: threading.Event, max_ticks: int | None = None) -> BridgeStats:
        """Tick until `stop` is set (or `max_ticks`), then hold for `stop_hold_s` and stop."""
        next_tick = self.clock()
        try:
            while not stop.is_set() and (max_ticks is None or self.stats.ticks < max_ticks):
                self.tick()
                next_tick = self._sleep_until(next_tick + self.period)
            self.state = "stopping"
            hold_until = self.clock() + self.config.stop_hold_s
            while self.clock() < hold_until:
                self._hold(float("nan"), [])
                next_tick = self._sleep_until(next_tick + self.period)
        finally:
            self._drop_controller()
            self.state = "stopped"
            self._heartbeat(float("nan"), [], None)
        return self.stats

    def tick(self) -> None:
        """One control tick: run the controller on fresh observations, or hold."""
        now = self.clock()
        obs, newest, age = self.buffer.snapshot(now)
        self.stats.ticks += 1
        lost = [] if self.transport.connected() else ["middleware_lost"]
        if obs is None or lost:
            if self.controller is not None:
                self._drop_controller()
            self.state = "holding" if self.last_command is not None else "waiting"
            self._hold(age, lost)
            return
        if self.controller is None:
            self.buffer.take_new()
            self.controller = self.make_controller()
            self.controller.reset(obs, obs[self.config.position_key].astype(np.float64), newest.arrival)
            self.controller.start()
            self.stats.restarts += 1
        elif self.buffer.take_new():  # a whole new frame; else the history keeps the last one
            self.controller.observe(obs, newest.arrival)
        out = self.controller.tick(now)
        self.state = "running"
        self._publish(out.command)
        published = self.clock()
        latency = (published - newest.arrival) * 1e3
        self.stats.latencies_ms.append(latency)
        self._heartbeat(age, list(out.flags), latency, newest, tick_ms=(published - now) * 1e3)

    # ------------------------------------------------------------------ helpers
    def _publish(self, command: np.ndarray) -> None:
        command = np.asarray(command, dtype=np.float64)
        if self.safety is not None:
            command = self.safety.follow(command)
        self.last_command = command.copy()
        self.publish_command(JointState(stamp=time.time(), position=self.last_command))
        self.stats.commands += 1

    def _hold(self, age: float, flags: list[str]) -> None:
        if self.last_command is not None:
            held = self.last_command if self.profile is None else self.profile.hold_target(self.last_command)
            self._publish(held)
            self.stats.holds += 1
        self._heartbeat(age, flags, None)

    def _drop_controller(self) -> None:
        if self.controller is not None:
            self.controller.stop()
            self.controller = None

    def _heartbeat(self, age: float, flags: list[str], latency_ms: float | None,
                   newest: Any = None, tick_ms: float | None = None) -> None:
        controller = self.controller
        scheduler = getattr(controller, "scheduler", None)
        beat = {
            "state": self.state, "tick": self.stats.ticks, "commands": self.stats.commands,
            "holds": self.stats.holds, "restarts": self.stats.restarts,
            "queue_depth": None if scheduler is None else scheduler.queue.remaining(),
            "delay_estimate": None if scheduler is None else scheduler.estimator.estimate,
            "watchdog": any(flag in WATCHDOG_FLAGS for flag in flags) or self.state == "holding",
            "flags": flags, "latency_ms": latency_ms, "tick_ms": tick_ms,
            "stamp_to_command_ms": None if newest is None else (time.time() - newest.stamp) * 1e3,
            "observation_age_s": age if np.isfinite(age) else None,
            "bad_messages": self.buffer.bad_messages, "last_error": self.buffer.last_error,
            "middleware_reconnections": self.transport.reconnections,
        }
        self.publish_heartbeat(json.dumps(beat))

    def _sleep_until(self, deadline: float) -> float:
        now = self.clock()
        if deadline < now:  # late: skip the missed ticks rather than bursting
            return now
        time.sleep(deadline - now)
        return deadline
