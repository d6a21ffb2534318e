"""PushT: push a T-shaped block onto a goal pose with a disk, as Diffusion Policy defines it.

World: a 512 x 512 workspace (pixel units, y pointing down as in the images) bounded by walls at
5 and 506; pymunk physics at 100 Hz with no gravity and `space.damping = 0`. In pymunk that damping
means a body keeps no velocity from one physics step to the next, so the block moves only while it
is pushed (quasi-static pushing), exactly as in Diffusion Policy's environment.

- Agent: a kinematic disk of radius 15. An action is the commanded position `target` (x, y) in
  [0, 512]^2, held for 10 physics steps (control at 10 Hz); each physics step applies the PD law
  `acc = 100 (target - pos) + 20 (0 - vel)` to the agent's velocity.
- Block: a T of mass 1 in its body frame: a 120 x 30 bar `x in [-60, 60], y in [0, 30]` and a
  30 x 90 stem `x in [-15, 15], y in [30, 120]`, centre of gravity (0, 45) and moment of inertia
  3000 (Diffusion Policy's values, including their quirks). Its pose is the body origin (the
  middle of the bar's outer edge) and angle.
- Goal pose (256, 256, pi/4). coverage = area(goal T & block T) / area(goal T) (shapely),
  reward = clip(coverage / 0.95, 0, 1); the episode terminates with success when coverage > 0.95.
- Reset: agent at integers uniform in [50, 450)^2, block origin at integers in [100, 400)^2,
  angle = N(0, 1) * 2 pi - pi, drawn from the env's numpy Generator (`reset(seed=...)`), then one
  physics step (which separates bodies that start overlapping).

Observations (`gymnasium.spaces.Dict`):
    obs_type="state":  {"agent_pos": (2,) float32, "keypoints": (18,) float32}
    obs_type="image":  {"image": (image_size, image_size, 3) uint8, "agent_pos": (2,) float32}
The 9 keypoints are the 8 corners of the T outline and its centre of gravity, in world pixels.
`info` on every reset and step: `is_success`, `coverage`, and `state` (5,) float64 =
(agent x, agent y, block x, block y, block angle mod 2 pi), which `set_state` restores.
"""

from __future__ import annotations

import math
from typing import Any

import gymnasium as gym
import numpy as np
import pymunk
import shapely

from diffpolicy.envs.pusht_render import render_scene
from diffpolicy.errors import InvalidStateError, InvalidValueError

WORKSPACE = 512.0
WALL_LOW, WALL_HIGH, WALL_RADIUS = 5.0, 506.0, 2.0
SIM_HZ, CONTROL_HZ = 100, 10
K_P, K_V = 100.0, 20.0
AGENT_RADIUS = 15.0
BLOCK_MASS = 1.0
GOAL_POSE = (256.0, 256.0, math.pi / 4)
SUCCESS_COVERAGE = 0.95

# The T in its body frame (scale 30, length 4).
BAR_LOCAL = np.array([(-60.0, 30.0), (60.0, 30.0), (60.0, 0.0), (-60.0, 0.0)])
STEM_LOCAL = np.array([(-15.0, 30.0), (-15.0, 120.0), (15.0, 120.0), (15.0, 30.0)])
# Outline of the union of bar and stem (its 8 corners, in order around the boundary).
T_OUTLINE_LOCAL = np.array(
    [(-60.0, 0.0), (60.0, 0.0), (60.0, 30.0), (15.0, 30.0),
     (15.0, 120.0), (-15.0, 120.0), (-15.0, 30.0), (-60.0, 30.0)]
)
BLOCK_COG_LOCAL = np.array([0.0, 45.0])
KEYPOINTS_LOCAL = np.concatenate([T_OUTLINE_LOCAL, BLOCK_COG_LOCAL[None]], axis=0)  # (9, 2)
T_AREA = 120.0 * 30.0 + 30.0 * 90.0


def rotation(angle: float) -> np.ndarray:
    """The 2 x 2 rotation matrix of `angle` (radians)."""
    c, s = math.cos(angle), math.sin(angle)
    return np.array([[c, -s], [s, c]])


def local_to_world(points: np.ndarray, pose) -> np.ndarray:
    """Body-frame points `(..., 2)` to world points for a block pose (x, y, angle)."""
    return np.asarray(points) @ rotation(float(pose[2])).T + np.asarray(pose[:2], dtype=float)


def t_polygon(pose) -> shapely.Polygon:
    """The T outline at `pose` (x, y, angle) as a shapely polygon."""
    return shapely.Polygon(local_to_world(T_OUTLINE_LOCAL, pose))


GOAL_OUTLINE = local_to_world(T_OUTLINE_LOCAL, GOAL_POSE)
GOAL_POLYGON = shapely.Polygon(GOAL_OUTLINE)


def coverage_of(pose) -> float:
    """area(goal T & T at `pose`) / area(goal T)."""
    return float(GOAL_POLYGON.intersection(t_polygon(pose)).area / GOAL_POLYGON.area)


def pose_from_keypoints(keypoints: np.ndarray) -> np.ndarray:
    """The block poses `(N, 3)` (x, y, angle in (-pi, pi]) whose keypoints are closest in least squares
    to `keypoints` `(N, 18)` or `(N, 9, 2)` (a 2-D Kabsch fit against `KEYPOINTS_LOCAL`; exact for the
    keypoints of a pose, the best rigid fit for predicted ones)."""
    world = np.asarray(keypoints, dtype=np.float64).reshape(-1, len(KEYPOINTS_LOCAL), 2)
    local_mean = KEYPOINTS_LOCAL.mean(0)
    local, centred = KEYPOINTS_LOCAL - local_mean, world - world.mean(1, keepdims=True)
    cross = np.einsum("ki,nkj->nij", local, centred)  # (N, 2, 2): sum_k local_k centred_k^T
    angle = np.arctan2(cross[:, 0, 1] - cross[:, 1, 0], cross[:, 0, 0] + cross[:, 1, 1])
    c, s = np.cos(angle), np.sin(angle)
    turned = np.stack([c * local_mean[0] - s * local_mean[1], s * local_mean[0] + c * local_mean[1]], axis=1)
    return np.concatenate([world.mean(1) - turned, angle[:, None]], axis=1)


CONTACT_SIDES = ("bar edge", "stem tip", "left", "right")


def first_contact(states: np.ndarray, margin: float = 2.0) -> tuple[int, np.ndarray] | None:
    """Where the agent first reaches the T in an episode (its approach side: the demonstrations'
    main mode). states: `(T, 5)` as `get_state` returns them. Returns `(step, (2,) agent position
    in the block's body frame)` at the first step the disk is within `margin` of the T's outline,
    or None if it never is."""
    for step, (ax, ay, bx, by, angle) in enumerate(np.asarray(states, dtype=np.float64)):
        if t_polygon((bx, by, angle)).distance(shapely.Point(ax, ay)) <= AGENT_RADIUS + margin:
            return step, rotation(angle).T @ np.array([ax - bx, ay - by])
    return None


def contact_side(local: np.ndarray) -> str:
    """The side of the T a body-frame contact point lies on (one of `CONTACT_SIDES`): beyond the
    bar's outer edge (y < 0), beyond the stem's tip (y > 120), else left or right of the stem."""
    x, y = float(local[0]), float(local[1])
    if y < 0:
        return "bar edge"
    if y > 120:
        return "stem tip"
    return "left" if x < 0 else "right"


class PushTEnv(gym.Env):
    """Diffusion Policy's PushT on pymunk 7 with Dict observations (see the module docstring).

    Args:
        obs_type: "state" (agent position + 9 block keypoints) or "image" (RGB + agent position).
        render_mode: None or "rgb_array" (`render()` returns `(render_size, render_size, 3)` uint8
            with the commanded target drawn as a red cross).
        image_size: side of the observation image for obs_type="image".
        render_size: side of the frames `render()` returns.
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": CONTROL_HZ}
    OBS_TYPES = ("state", "image")

    def __init__(self, obs_type: str = "state", render_mode: str | None = None,
                 image_size: int = 96, render_size: int = 256):
        if obs_type not in self.OBS_TYPES:
            raise InvalidValueError(f"PushTEnv: obs_type must be one of {list(self.OBS_TYPES)}, got {obs_type!r}")
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise InvalidValueError(
                f"PushTEnv: render_mode must be None or one of {self.metadata['render_modes']}, got {render_mode!r}"
            )
        for name, size in (("image_size", image_size), ("render_size", render_size)):
            if not isinstance(size, (int, np.integer)) or size < 8:
                raise InvalidValueError(f"PushTEnv: {name} must be an integer >= 8, got {size!r}")
        self.obs_type = obs_type
        self.render_mode = render_mode
        self.image_size = int(image_size)
        self.render_size = int(render_size)

        # The PD law keeps the agent inside the convex hull of its start and its targets, so
        # [0, 512] bounds it; a kinematic pusher can press the block through a wall, hence the
        # wider box for keypoints.
        agent_space = gym.spaces.Box(0.0, WORKSPACE, shape=(2,), dtype=np.float32)
        if obs_type == "state":
            self.observation_space = gym.spaces.Dict({
                "agent_pos": agent_space,
                "keypoints": gym.spaces.Box(-WORKSPACE, 2 * WORKSPACE, shape=(18,), dtype=np.float32),
            })
        else:
            self.observation_space = gym.spaces.Dict({
                "image": gym.spaces.Box(0, 255, shape=(self.image_size, self.image_size, 3), dtype=np.uint8),
                "agent_pos": agent_space,
            })
        self.action_space = gym.spaces.Box(0.0, WORKSPACE, shape=(2,), dtype=np.float32)
        self.space: pymunk.Space | None = None
        self.agent: pymunk.Body | None = None
        self.block: pymunk.Body | None = None
        self.latest_action: np.ndarray | None = None

    # ---------------------------------------------------------------- simulator
    def _build_space(self) -> None:
        """A fresh pymunk space (no cached contacts, so resets are deterministic)."""
        space = pymunk.Space()
        space.gravity = (0.0, 0.0)
        space.damping = 0.0
        corners = [(WALL_LOW, WALL_HIGH), (WALL_LOW, WALL_LOW), (WALL_HIGH, WALL_LOW), (WALL_HIGH, WALL_HIGH)]
        for a, b in zip(corners, corners[1:] + corners[:1]):
            space.add(pymunk.Segment(space.static_body, a, b, WALL_RADIUS))

        agent = pymunk.Body(body_type=pymunk.Body.KINEMATIC)
        # Diffusion Policy sets `friction = 1` on the bodies, which pymunk ignores; its shapes keep
        # pymunk's default friction 0 for the agent, so contacts with the agent are frictionless.
        space.add(agent, pymunk.Circle(agent, AGENT_RADIUS))

        bar_moment = pymunk.moment_for_poly(BLOCK_MASS, BAR_LOCAL.tolist())
        block = pymunk.Body(BLOCK_MASS, 2 * bar_moment)  # DP adds the bar's moment twice
        bar = pymunk.Poly(block, BAR_LOCAL.tolist())
        stem = pymunk.Poly(block, STEM_LOCAL.tolist())
        bar.friction = stem.friction = 1.0
        block.center_of_gravity = tuple((np.asarray(bar.center_of_gravity) + np.asarray(stem.center_of_gravity)) / 2)
        space.add(block, bar, stem)
        self.space, self.agent, self.block = space, agent, block

    def set_state(self, state) -> dict[str, np.ndarray]:
        """Place agent and block at `state` = (agent x, agent y, block x, block y, block angle).

        Velocities become zero and no physics step runs, so the returned observation is exactly
        the one recorded with this state.
        """
        state = np.asarray(state, dtype=np.float64)
        if state.shape != (5,) or not np.all(np.isfinite(state)):
            raise InvalidValueError(f"PushTEnv.set_state: expected 5 finite numbers (agent xy, block xy, angle), got {state!r}")
        if self.space is None:
            self._build_space()
        self.agent.position = (float(state[0]), float(state[1]))
        self.agent.velocity = (0.0, 0.0)
        # Angle first: setting the angle rotates about the centre of gravity.
        self.block.angle = float(state[4])
        self.block.position = (float(state[2]), float(state[3]))
        self.block.velocity = (0.0, 0.0)
        self.block.angular_velocity = 0.0
        self.space.reindex_shapes_for_body(self.agent)
        self.space.reindex_shapes_for_body(self.block)
        return self._observation()

    def get_state(self) -> np.ndarray:
        """(agent x, agent y, block x, block y, block angle mod 2 pi) as float64 `(5,)`."""
        return np.array([*self.agent.position, *self.block.position, self.block.angle % (2 * math.pi)])

    @property
    def block_pose(self) -> np.ndarray:
        """(x, y, angle) of the block's body origin, angle unwrapped."""
        return np.array([*self.block.position, self.block.angle])

    # ---------------------------------------------------------------- gym API
    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        """Reset to a random state from the seeded Generator, or to `options["state"]` (5,)."""
        super().reset(seed=seed)
        self._build_space()
        self.latest_action = None
        if options and options.get("state") is not None:
            state = np.asarray(options["state"], dtype=np.float64)
        else:
            rng = self.np_random
            state = np.array([
                rng.integers(50, 450), rng.integers(50, 450),
                rng.integers(100, 400), rng.integers(100, 400),
                rng.standard_normal() * 2 * math.pi - math.pi,
            ], dtype=np.float64)
        self.set_state(state)
        self.space.step(1.0 / SIM_HZ)  # as Diffusion Policy: separates bodies that start overlapping
        coverage = coverage_of(self.block_pose)
        return self._observation(), self._info(coverage)

    def step(self, action):
        action = np.asarray(action, dtype=np.float64)
        if action.shape != (2,) or not np.all(np.isfinite(action)):
            raise InvalidValueError(f"PushTEnv.step: expected a finite target position of shape (2,), got {action!r}")
        if self.space is None:
            raise InvalidStateError("PushTEnv.step: call reset() before step()")
        target = np.clip(action, 0.0, WORKSPACE)
        self.latest_action = target
        dt = 1.0 / SIM_HZ
        tx, ty = float(target[0]), float(target[1])
        agent = self.agent
        for _ in range(SIM_HZ // CONTROL_HZ):
            (px, py), (vx, vy) = agent.position, agent.velocity
            agent.velocity = (vx + (K_P * (tx - px) - K_V * vx) * dt, vy + (K_P * (ty - py) - K_V * vy) * dt)
            self.space.step(dt)
        coverage = coverage_of(self.block_pose)
        reward = float(np.clip(coverage / SUCCESS_COVERAGE, 0.0, 1.0))
        terminated = coverage > SUCCESS_COVERAGE
        return self._observation(), reward, terminated, False, self._info(coverage)

    def render(self):
        if self.render_mode != "rgb_array":
            return None
        return self.render_frame(self.render_size, draw_action=True)

    def render_frame(self, size: int, draw_action: bool = False) -> np.ndarray:
        """The scene as `(size, size, 3)` uint8 (row = world y, column = world x)."""
        if self.space is None:
            raise InvalidStateError("PushTEnv.render_frame: call reset() first")
        target = self.latest_action if draw_action else None
        block = local_to_world(T_OUTLINE_LOCAL, self.block_pose)
        return render_scene(size, np.asarray(self.agent.position), block, GOAL_OUTLINE, target)

    def close(self):
        self.space = self.agent = self.block = None

    @staticmethod
    def reward_from_observation(obs: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """The task's reward and success `(N,)`, `(N,)` bool of state observations `{"keypoints":
        (N, 18), ...}` (the block pose fitted to the keypoints, then `step`'s rule): what a world
        model's dream pays for the observations it predicts (`worldmodel.DreamConfig.task_reward`)."""
        if "keypoints" not in obs:
            raise InvalidValueError(f"PushTEnv.reward_from_observation: needs state observations with 'keypoints' "
                                    f"(N, 18), got keys {sorted(obs)}")
        coverage = np.array([coverage_of(pose) for pose in pose_from_keypoints(obs["keypoints"])])
        return np.clip(coverage / SUCCESS_COVERAGE, 0.0, 1.0), coverage > SUCCESS_COVERAGE

    # ---------------------------------------------------------------- helpers
    def keypoints(self) -> np.ndarray:
        """The 9 block keypoints in world pixels, `(9, 2)` float64."""
        return local_to_world(KEYPOINTS_LOCAL, self.block_pose)

    def _observation(self) -> dict[str, np.ndarray]:
        agent_pos = np.asarray(self.agent.position, dtype=np.float32)
        if self.obs_type == "state":
            return {"agent_pos": agent_pos, "keypoints": self.keypoints().reshape(18).astype(np.float32)}
        return {"image": self.render_frame(self.image_size), "agent_pos": agent_pos}

    def _info(self, coverage: float) -> dict[str, Any]:
        return {"is_success": bool(coverage > SUCCESS_COVERAGE), "coverage": coverage, "state": self.get_state()}
