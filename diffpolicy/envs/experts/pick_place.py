"""A closed-loop waypoint state machine for scripted robosuite pick-and-place experts.

An expert is a list of `Waypoint`s made at the first `act` after `reset(seed)` by the task's
`plan(rng)`. Each waypoint's target (a gripper-site position and a gripper yaw) is a function of
the current simulator state, re-evaluated every step, so the expert tracks objects that move
(closed loop). The action drives the OSC pose controller toward the target:

- position: `gain` times the error to the target, capped at the episode's speed (the largest
  goal offset commanded per step, metres; the arm covers about a quarter of it per step), divided
  by the controller's output scale (0.05 m per unit action);
- orientation: the world-frame axis-angle from the current gripper orientation to "pointing down
  at yaw", capped at `max_turn` radians per step, divided by the controller's 0.5 rad scale;
- gripper: the waypoint's command, -1 open, +1 closed.

A waypoint with `xy_first` moves only horizontally while its horizontal error exceeds that
tolerance (inserting, descending onto small objects). A waypoint is done when the gripper is within `tol` of its target and within `yaw_tol` of its yaw
for `hold` consecutive steps, or after `timeout` steps. If a waypoint's `abort_if` becomes true
(e.g. the object slipped out of the hand) the expert plans again from the current state, at most
`max_replans` times; after the last waypoint it keeps holding it.

Randomness (speeds, via points, grasp choices) comes only from the Generator seeded in `reset`,
so one seed gives one demonstration and different seeds give different (multimodal) ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import robosuite.utils.transform_utils as T

from diffpolicy.envs.robosuite_tasks import RobosuiteEnv
from diffpolicy.errors import InvalidTypeError, InvalidValueError

OSC_POS_SCALE = 0.05  # metres per unit action (robosuite's default OSC_POSE output_max)
OSC_ROT_SCALE = 0.5  # radians per unit action


@dataclass
class Waypoint:
    """One stage of a scripted motion: where the gripper goes, how it is turned and whether closed.

    `target() -> (3,)` world position of the gripper site; `yaw() -> float` the angle of the
    finger axis in the world xy plane (radians); both are called every step.
    """

    name: str
    target: Callable[[], np.ndarray]
    yaw: Callable[[], float]
    gripper: float
    tol: float = 0.01
    yaw_tol: float = 0.05
    hold: int = 1
    timeout: int = 120
    speed: float | None = None
    abort_if: Callable[[], bool] | None = None
    xy_first: float | None = None  # if set: hold the height until the horizontal error is below it


def down_rotation(yaw: float) -> np.ndarray:
    """`(3, 3)` gripper-site orientation pointing down (site z = -world z) with finger axis at `yaw`."""
    c, s = np.cos(yaw), np.sin(yaw)
    return np.array([[c, s, 0.0], [s, -c, 0.0], [0.0, 0.0, -1.0]])


def body_yaw(rotation: np.ndarray) -> float:
    """Angle of a frame's x axis in the world xy plane, from its `(3, 3)` rotation matrix."""
    return float(np.arctan2(rotation[1, 0], rotation[0, 0]))


def nearest_equivalent(angle: float, reference: float, period: float) -> float:
    """The angle `angle + k * period` (integer k) closest to `reference`."""
    return float(reference + (angle - reference + period / 2) % period - period / 2)


def rotation_error(target: np.ndarray, current: np.ndarray) -> np.ndarray:
    """World-frame axis-angle `(3,)` of the rotation taking `current` to `target` (both `(3, 3)`)."""
    quat = T.mat2quat(target @ current.T)  # (x, y, z, w)
    if quat[3] < 0:
        quat = -quat
    return np.asarray(T.quat2axisangle(quat), dtype=np.float64)


def cap_norm(vector: np.ndarray, limit: float) -> np.ndarray:
    norm = float(np.linalg.norm(vector))
    return vector if norm <= limit else vector * (limit / norm)


class RobosuiteScene:
    """Privileged read access to a robosuite env's simulator, in the terms experts need."""

    def __init__(self, env: Any, env_name: str):
        inner = getattr(env, "unwrapped", env)
        if not isinstance(inner, RobosuiteEnv):
            raise InvalidTypeError(f"{env_name} expert: expected a RobosuiteEnv (or a wrapper of one), got {type(inner).__name__}")
        if inner.env_name != env_name:
            raise InvalidValueError(f"{env_name} expert: the env runs {inner.env_name!r}, expected {env_name!r}")
        self.env = inner
        self.rs = inner.robosuite_env
        self.sim = self.rs.sim
        robot = self.rs.robots[0]
        self.eef_site = robot.eef_site_id["right"]

    def eef_pos(self) -> np.ndarray:
        return np.array(self.sim.data.site_xpos[self.eef_site])

    def eef_rot(self) -> np.ndarray:
        return np.array(self.sim.data.site_xmat[self.eef_site]).reshape(3, 3)

    def wrist_angle(self) -> float:
        """The last arm joint (Panda joint 7, range +-2.9 rad). With the gripper pointing down,
        turning the gripper's yaw by `d` moves it by about `-d`."""
        robot = self.rs.robots[0]
        return float(self.sim.data.qpos[robot._ref_joint_pos_indexes[-1]])

    def eef_yaw(self) -> float:
        """Yaw of the finger axis (the gripper site's x axis)."""
        return body_yaw(self.eef_rot())

    def body_pos(self, body_id: int) -> np.ndarray:
        return np.array(self.sim.data.body_xpos[body_id])

    def body_rot(self, body_id: int) -> np.ndarray:
        return np.array(self.sim.data.body_xmat[body_id]).reshape(3, 3)

    def site_pos(self, name: str) -> np.ndarray:
        return np.array(self.sim.data.site_xpos[self.sim.model.site_name2id(name)])


class WaypointExpert:
    """Base class of the robosuite experts: `reset(seed)`, `act(obs) -> (7,)` action in [-1, 1].

    Subclasses set `env_name` and implement `plan(rng) -> list[Waypoint]`; a plan records its random
    choices (the demonstration's mode: grasp yaw, final orientation, ...) in `self.decisions`.

    Args:
        env: the task's env (a `RobosuiteEnv`, possibly wrapped).
        speed: range of the per-episode cap on the commanded goal offset (metres per step), drawn
            uniformly; a waypoint's own `speed` overrides it (slow, careful phases).
        gain: proportional gain on the position error (the OSC goal is `gain * error` ahead).
        max_turn: top commanded rotation per step (radians).
        max_replans: how many times a failed grasp may be retried in one episode.
    """

    env_name = ""

    def __init__(self, env: Any, speed: tuple[float, float] = (0.025, 0.045), gain: float = 2.0,
                 max_turn: float = 0.2, max_replans: int = 3):
        if not 0 < speed[0] <= speed[1] <= OSC_POS_SCALE:
            raise InvalidValueError(f"{type(self).__name__}: speed must be a range within (0, {OSC_POS_SCALE}], got {speed}")
        self.scene = RobosuiteScene(env, self.env_name)
        self.speed_range = (float(speed[0]), float(speed[1]))
        self.gain = float(gain)
        self.max_turn = float(max_turn)
        self.max_replans = int(max_replans)
        self.reset(None)

    def reset(self, seed: int | None) -> None:
        """Start a new episode; the plan is made at the first `act` from the state it sees."""
        self.rng = np.random.default_rng(seed)
        self.speed = float(self.rng.uniform(*self.speed_range))
        self.waypoints: list[Waypoint] | None = None
        self.decisions: dict[str, float] = {}
        self.index = 0
        self.steps_in_waypoint = 0
        self.steps_at_target = 0
        self.replans = 0

    @property
    def stage(self) -> str:
        """Name of the current waypoint ("" before the first `act`)."""
        if not self.waypoints:
            return ""
        return self.waypoints[min(self.index, len(self.waypoints) - 1)].name

    def plan(self, rng: np.random.Generator) -> list[Waypoint]:
        raise NotImplementedError

    def act(self, obs: dict[str, np.ndarray] | None = None) -> np.ndarray:
        """The next action `(7,)` float32; `obs` is unused (the expert reads the simulator)."""
        if self.waypoints is None:
            self._start_plan()
        waypoint = self.waypoints[self.index]
        if waypoint.abort_if is not None and waypoint.abort_if() and self.replans < self.max_replans:
            self.replans += 1
            self._start_plan()
            waypoint = self.waypoints[self.index]
        action = self._drive(waypoint)
        self._advance(waypoint)
        return action

    def _start_plan(self) -> None:
        self.waypoints = self.plan(self.rng)
        self.index = 0
        self.steps_in_waypoint = 0
        self.steps_at_target = 0

    def _drive(self, waypoint: Waypoint) -> np.ndarray:
        scene = self.scene
        speed = self.speed if waypoint.speed is None else waypoint.speed
        error = waypoint.target() - scene.eef_pos()
        if waypoint.xy_first is not None and np.linalg.norm(error[:2]) > waypoint.xy_first:
            error[2] = 0.0
        move = cap_norm(self.gain * error, speed)
        current = scene.eef_rot()
        yaw = nearest_equivalent(waypoint.yaw(), scene.eef_yaw(), 2 * np.pi)
        turn = cap_norm(rotation_error(down_rotation(yaw), current), self.max_turn)
        action = np.concatenate([move / OSC_POS_SCALE, turn / OSC_ROT_SCALE, [waypoint.gripper]])
        return np.clip(action, -1.0, 1.0).astype(np.float32)

    def _advance(self, waypoint: Waypoint) -> None:
        scene = self.scene
        self.steps_in_waypoint += 1
        distance = float(np.linalg.norm(waypoint.target() - scene.eef_pos()))
        yaw_error = abs(nearest_equivalent(waypoint.yaw(), scene.eef_yaw(), 2 * np.pi) - scene.eef_yaw())
        at_target = distance < waypoint.tol and yaw_error < waypoint.yaw_tol
        self.steps_at_target = self.steps_at_target + 1 if at_target else 0
        done = self.steps_at_target >= waypoint.hold or self.steps_in_waypoint >= waypoint.timeout
        if done and self.index < len(self.waypoints) - 1:
            self.index += 1
            self.steps_in_waypoint = 0
            self.steps_at_target = 0


def grasp_yaw_choices(symmetry_yaw: float, period: float, current_yaw: float) -> list[float]:
    """Gripper yaws equivalent to `symmetry_yaw` modulo `period` within +-pi/2 of `current_yaw`.

    The fingers are symmetric under a half turn, so a grasp yaw matters modulo pi: every returned
    yaw is the representative nearest to `current_yaw`; sorted by how far the gripper must turn.
    """
    choices = []
    for k in range(int(round(np.pi / period))):
        yaw = nearest_equivalent(symmetry_yaw + k * period, current_yaw, np.pi)
        choices.append(yaw)
    return sorted(choices, key=lambda y: abs(y - current_yaw))


def constant(value: Any) -> Callable[[], Any]:
    """A waypoint target/yaw that does not depend on the state."""
    return lambda: value
