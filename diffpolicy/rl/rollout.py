"""Collecting on-policy rollouts of chunk policies in vector environments.

`collect_rollout` steps N environments T times with one batched policy call per step and stacks
everything as `(T, N, ...)` tensors; `EpisodeStats` follows each environment's running episode
and reports finished ones (return, success, length in environment steps).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import gymnasium as gym
import numpy as np
import torch

from diffpolicy.rl.vec_env import final_observations, obs_to_tensors, step_info

Actor = Callable[[dict[str, torch.Tensor]], tuple[np.ndarray, dict[str, torch.Tensor]]]
"""actor(obs {key: (N, To, ...)}) -> (chunks (N, Tp, Da) in data units, records {name: (N, ...)})."""


@dataclass
class EpisodeStats:
    """Running and finished episodes of N environments."""

    n_envs: int
    returns: np.ndarray = field(init=False)
    lengths: np.ndarray = field(init=False)
    successes: np.ndarray = field(init=False)
    finished: list[dict[str, float]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.start()

    def start(self) -> None:
        """Forget the running episodes (after a reset of every environment)."""
        self.returns = np.zeros(self.n_envs)
        self.lengths = np.zeros(self.n_envs, dtype=np.int64)
        self.successes = np.zeros(self.n_envs, dtype=bool)

    def update(self, reward: np.ndarray, env_steps: np.ndarray, success: np.ndarray, done: np.ndarray) -> None:
        self.returns += reward
        self.lengths += env_steps
        self.successes |= success
        for i in np.flatnonzero(done):
            self.finished.append({"return": float(self.returns[i]), "length": int(self.lengths[i]),
                                  "success": float(self.successes[i])})
            self.returns[i], self.lengths[i], self.successes[i] = 0.0, 0, False

    def pop_finished(self) -> list[dict[str, float]]:
        finished, self.finished = self.finished, []
        return finished


@dataclass
class Rollout:
    """T steps of N environments. obs / next_obs: `{key: (T, N, To, ...)}` (next_obs: the state each
    step led to, the final observation at an episode end); rewards `(T, N)` as the learner sees them
    (the environment's, times the run's reward scale); terminated, truncated
    `(T, N)` bool; env_steps `(T, N)` environment steps each chunk took; records: `{name: (T, N, ...)}`
    as the actor returned them."""

    obs: dict[str, torch.Tensor]
    next_obs: dict[str, torch.Tensor]
    rewards: torch.Tensor
    terminated: torch.Tensor
    truncated: torch.Tensor
    env_steps: torch.Tensor
    records: dict[str, torch.Tensor]


def collect_rollout(envs: gym.vector.VectorEnv, obs: dict[str, np.ndarray], actor: Actor, n_steps: int,
                    stats: EpisodeStats, reward_scale: float = 1.0) -> tuple[Rollout, dict[str, np.ndarray]]:
    """Step `envs` `n_steps` times from `obs`; returns the rollout (its rewards times `reward_scale`;
    `stats` count the environment's own) and the observation to go on from."""
    steps: list[dict] = []
    for _ in range(n_steps):
        obs_t = obs_to_tensors(obs)
        chunks, records = actor(obs_t)
        next_obs, reward, terminated, truncated, info = envs.step(chunks)
        done = terminated | truncated
        env_steps, success = step_info(info, "env_steps", done), step_info(info, "is_success", done)
        stats.update(reward, env_steps, success, done)
        steps.append({"obs": obs_t, "next_obs": obs_to_tensors(final_observations(next_obs, info, done)),
                      "reward": torch.as_tensor(reward * reward_scale, dtype=torch.float32),
                      "terminated": torch.as_tensor(terminated),
                      "truncated": torch.as_tensor(truncated),
                      "env_steps": torch.as_tensor(env_steps.astype(np.int64)), "records": records})
        obs = next_obs

    def stack(name: str) -> torch.Tensor:
        return torch.stack([s[name] for s in steps])

    def stack_dict(name: str) -> dict[str, torch.Tensor]:
        return {k: torch.stack([s[name][k] for s in steps]) for k in steps[0][name]}

    rollout = Rollout(stack_dict("obs"), stack_dict("next_obs"), stack("reward"), stack("terminated"),
                      stack("truncated"), stack("env_steps"), stack_dict("records"))
    return rollout, obs
