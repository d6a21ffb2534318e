"""A task environment seen one action chunk at a time (what every fine-tuning algorithm steps).

`ChunkEnv` keeps the last To observations (the first one repeated after a reset) and executes
Ta actions of a chunk of Tp per step, starting at index To - 1 (the action aligned with the
current observation, as training windows and `evaluation.rollout` align them). Its reward is the
undiscounted sum over the executed actions; it stops early when the episode ends, and reports how
many environment steps it took in `info["env_steps"]` and whether the task succeeded at any of
them in `info["is_success"]`.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import gymnasium as gym
import numpy as np

from diffpolicy.policies.config import PolicyConfig
from diffpolicy.rl.errors import ActionSpaceMismatchError, TaskMismatchError


def check_task(metadata: dict[str, Any], task: str, where: str) -> None:
    """Raise `TaskMismatchError` unless the checkpoint's metadata names `task` (or no task)."""
    trained = metadata.get("task")
    if trained is not None and trained != task:
        raise TaskMismatchError(f"{where}: the checkpoint was trained on task {trained!r}, not {task!r}; "
                                f"fine-tune a checkpoint of {task!r} or pass --task {trained}")


def check_env_matches_policy(env: gym.Env, config: PolicyConfig, where: str) -> None:
    """Raise `ActionSpaceMismatchError` unless env's action space is a Box of shape (Da,) and its
    observation space a Dict with the policy's keys and per-step shapes."""
    space = env.action_space
    if not isinstance(space, gym.spaces.Box) or space.shape != (config.action_dim,):
        raise ActionSpaceMismatchError(f"{where}: the environment's action space is {space}, the policy acts in "
                                       f"Box of shape ({config.action_dim},)")
    obs_space = env.observation_space
    if not isinstance(obs_space, gym.spaces.Dict):
        raise ActionSpaceMismatchError(f"{where}: the environment's observation space is {obs_space}, the policy "
                                       f"needs a Dict with keys {sorted(config.obs_shapes)}")
    for key, shape in config.obs_shapes.items():
        if key not in obs_space.spaces or tuple(obs_space[key].shape) != tuple(shape):
            got = tuple(obs_space[key].shape) if key in obs_space.spaces else "missing"
            raise ActionSpaceMismatchError(f"{where}: observation {key!r}: the policy needs shape {tuple(shape)}, "
                                           f"the environment gives {got}")


class ChunkEnv(gym.Wrapper):
    """Observations `{key: (To, *shape)}`, actions `(Tp, Da)` in data units (see the module doc)."""

    def __init__(self, env: gym.Env, config: PolicyConfig) -> None:
        super().__init__(env)
        check_env_matches_policy(env, config, "ChunkEnv")
        self.obs_horizon, self.action_horizon = config.obs_horizon, config.action_horizon
        self.keys = tuple(config.obs_shapes)
        low, high = env.action_space.low, env.action_space.high
        self.action_space = gym.spaces.Box(np.tile(low, (config.pred_horizon, 1)),
                                           np.tile(high, (config.pred_horizon, 1)), dtype=np.float32)
        self.observation_space = gym.spaces.Dict({
            key: gym.spaces.Box(np.repeat(env.observation_space[key].low[None], self.obs_horizon, 0),
                                np.repeat(env.observation_space[key].high[None], self.obs_horizon, 0),
                                dtype=env.observation_space[key].dtype)
            for key in self.keys})
        self._history: deque = deque(maxlen=self.obs_horizon)

    def _observation(self) -> dict[str, np.ndarray]:
        return {key: np.stack([o[key] for o in self._history]) for key in self.keys}

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        obs, info = self.env.reset(seed=seed, options=options)
        self._history.clear()
        self._history.extend([obs] * self.obs_horizon)
        return self._observation(), info

    def step(self, chunk: np.ndarray):
        chunk = np.asarray(chunk, dtype=np.float32)
        if chunk.shape != self.action_space.shape:
            raise ActionSpaceMismatchError(f"ChunkEnv.step: expected a chunk of shape {self.action_space.shape}, "
                                           f"got {chunk.shape}")
        start = self.obs_horizon - 1
        total, success, steps = 0.0, False, 0
        terminated = truncated = False
        info: dict[str, Any] = {}
        for action in chunk[start:start + self.action_horizon]:
            action = np.clip(action, self.env.action_space.low, self.env.action_space.high)
            obs, reward, terminated, truncated, info = self.env.step(action)
            self._history.append(obs)
            total += float(reward)
            success |= bool(info.get("is_success", False))
            steps += 1
            if terminated or truncated:
                break
        return self._observation(), total, terminated, truncated, {**info, "is_success": success, "env_steps": steps}
