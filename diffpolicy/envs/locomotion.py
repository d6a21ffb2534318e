"""Gymnasium MuJoCo locomotion tasks (Hopper, Walker2d, HalfCheetah, ...) behind the project's env contract.

`LocomotionEnv(env_id="Hopper-v5")` builds the registered gymnasium MuJoCo environment directly (no
gymnasium TimeLimit: the task card's `make_env` adds it) and changes only its interface:

- observations are a `Dict` with one key, `"state"`: the env's own float observation `(obs_dim,)`
  cast to float32;
- `info["is_success"]` is False on every step: locomotion has no success event, so tasks are judged
  by their return; `info["episode_return"]` carries the running sum of rewards since `reset`;
- `get_state() -> (nq + nv,)` float64 and `set_state(state)` expose the physics state (qpos, qvel)
  for replaying recorded episodes;
- `failure_from_observation(obs)` tells from observations alone where the env would end an episode
  (Hopper and Walker2d fall; HalfCheetah never ends): what a world model's imagination ends on.
"""

from __future__ import annotations

from typing import Any

import gymnasium
import numpy as np
from gymnasium import spaces
from gymnasium.envs.mujoco import MujocoEnv
from gymnasium.envs.registration import load_env_creator

from diffpolicy.errors import InvalidValueError

FALLS = ("HopperEnv", "Walker2dEnv")  # terminate when unhealthy: z and angle (Hopper: and the state) out of range
NEVER_END = ("HalfCheetahEnv", "SwimmerEnv", "ReacherEnv", "PusherEnv")


class LocomotionEnv(gymnasium.Env):
    """A registered gymnasium MuJoCo env with a `{"state": (obs_dim,)}` Dict observation.

    Args:
        env_id: a registered gymnasium id of a MuJoCo env, e.g. "Hopper-v5".
        render_mode: passed to the env (None, "rgb_array", "depth_array", "human").
        **env_kwargs: the env's own keyword arguments (e.g. `reset_noise_scale`), on top of the
            registration's defaults.
    """

    def __init__(self, env_id: str, render_mode: str | None = None, **env_kwargs: Any):
        try:
            spec = gymnasium.spec(env_id)
        except gymnasium.error.Error as exc:
            raise InvalidValueError(f"LocomotionEnv: env_id {env_id!r} is not a registered gymnasium env: {exc}") from exc
        env = load_env_creator(spec.entry_point)(**{**spec.kwargs, **env_kwargs}, render_mode=render_mode)
        if not isinstance(env, MujocoEnv):
            raise InvalidValueError(
                f"LocomotionEnv: env_id {env_id!r} builds {type(env).__name__}, expected a gymnasium MujocoEnv"
            )
        self.env_id = env_id
        self._env = env
        self.render_mode = render_mode
        self.metadata = dict(env.metadata)
        inner = env.observation_space
        self.observation_space = spaces.Dict(
            {"state": spaces.Box(low=-np.inf, high=np.inf, shape=inner.shape, dtype=np.float32)}
        )
        self.action_space = env.action_space
        self._episode_return = 0.0

    @property
    def dt(self) -> float:
        """Seconds of simulated time per `step` (the control period)."""
        return float(self._env.dt)

    @property
    def state_dim(self) -> int:
        """Length of `get_state()`: nq + nv."""
        return int(self._env.model.nq + self._env.model.nv)

    def _obs(self, raw: np.ndarray) -> dict[str, np.ndarray]:
        return {"state": np.asarray(raw, dtype=np.float32)}

    def _info(self, info: dict[str, Any]) -> dict[str, Any]:
        return {**info, "is_success": False, "episode_return": self._episode_return}

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        raw, info = self._env.reset(seed=seed, options=options)
        self._episode_return = 0.0
        return self._obs(raw), self._info(info)

    def step(self, action: np.ndarray):
        raw, reward, terminated, truncated, info = self._env.step(np.asarray(action, dtype=np.float64))
        self._episode_return += float(reward)
        return self._obs(raw), float(reward), bool(terminated), bool(truncated), self._info(info)

    def get_state(self) -> np.ndarray:
        """The physics state `(nq + nv,)` float64: qpos followed by qvel."""
        data = self._env.data
        return np.concatenate([data.qpos, data.qvel]).astype(np.float64)

    def set_state(self, state: np.ndarray) -> dict[str, np.ndarray]:
        """Set the physics to `state` (from `get_state`) and return the observation it gives.

        The running `episode_return` is not part of the physics state and is left unchanged.
        """
        state = np.asarray(state, dtype=np.float64)
        if state.shape != (self.state_dim,):
            raise InvalidValueError(
                f"{self.env_id} set_state: expected a state of shape ({self.state_dim},) "
                f"(nq={self._env.model.nq} qpos then nv={self._env.model.nv} qvel), got {state.shape}"
            )
        nq = self._env.model.nq
        self._env.set_state(state[:nq], state[nq:])
        return self._obs(self._env._get_obs())

    def failure_from_observation(self, obs: dict[str, np.ndarray]) -> np.ndarray:
        """`{"state": (N, obs_dim)}` -> `(N,)` bool: where the env ends an episode in that observation.

        Hopper and Walker2d: not healthy (`is_healthy` of gymnasium's v5 envs on the observed z =
        qpos[1], angle = qpos[2] and, for Hopper, qpos[2:] and the velocities; those are observed
        clipped to +-10, inside Hopper's +-100 range, so the test is exact unless a speed passes 100).
        HalfCheetah, Swimmer, Reacher, Pusher: never. A world model's dream ends imagined episodes
        here (`worldmodel.imagine.DreamVecEnv`). Other envs raise InvalidValueError.
        """
        env, name = self._env, type(self._env).__name__
        state = np.asarray(obs["state"], dtype=np.float64).reshape(-1, self.observation_space["state"].shape[0])
        if name in NEVER_END or (name in FALLS and not env._terminate_when_unhealthy):
            return np.zeros(len(state), dtype=bool)
        if name not in FALLS or not env._exclude_current_positions_from_observation:
            raise InvalidValueError(f"{self.env_id}: no rule for its terminations from observations (known: "
                                    f"{', '.join(FALLS + NEVER_END)}, with x excluded from the observation)")
        healthy = _inside(state[:, 0], env._healthy_z_range) & _inside(state[:, 1], env._healthy_angle_range)
        if name == "HopperEnv":
            healthy &= _inside(state[:, 1:], env._healthy_state_range).all(1)
        return ~healthy

    def render(self):
        return self._env.render()

    def close(self):
        self._env.close()


def _inside(values: np.ndarray, bounds: tuple[float, float]) -> np.ndarray:
    """Strictly inside (low, high), as gymnasium's health tests."""
    low, high = bounds
    return (low < values) & (values < high)
