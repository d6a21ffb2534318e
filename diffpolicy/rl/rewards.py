"""Reward shaping a fine-tuning run may need.

`AbsorbingSuccess`: tasks such as PushT end the episode at success and pay a dense reward in
[0, 1] per step; maximizing that return favours hovering just below the success threshold until
the time limit over succeeding early. Treating success as an absorbing state that keeps paying
`success_reward` per remaining step until the time limit removes that incentive. With a
success rate already high, hovering near the threshold still pays almost as much as succeeding
(PushT: ~0.9 per step against 1); `SparseSuccess` pays for success alone (DPPO's robomimic reward:
1 on the step that succeeds, 0 otherwise), so the discounted return is the chance of succeeding,
sooner counting more.
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np


class AbsorbingSuccess(gym.Wrapper):
    """On a terminated step with `info["is_success"]`, add `success_reward` x the steps left of
    `max_episode_steps` to its reward."""

    def __init__(self, env: gym.Env, max_episode_steps: int, success_reward: float = 1.0) -> None:
        super().__init__(env)
        self.max_episode_steps, self.success_reward = int(max_episode_steps), float(success_reward)
        self._t = 0

    def reset(self, **kwargs):
        self._t = 0
        return self.env.reset(**kwargs)

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        self._t += 1
        if terminated and info.get("is_success", False):
            reward = float(reward) + success_bonus(self._t, self.max_episode_steps, self.success_reward)
        return obs, reward, terminated, truncated, info


class SparseSuccess(gym.Wrapper):
    """Reward 1 on a terminated step with `info["is_success"]`, 0 on every other step."""

    def step(self, action):
        obs, _, terminated, truncated, info = self.env.step(action)
        return obs, float(terminated and info.get("is_success", False)), terminated, truncated, info


def success_bonus(steps_taken, max_episode_steps: int, success_reward: float = 1.0):
    """What an absorbing success adds to the reward of its step: `success_reward` for each step
    left of the time limit after `steps_taken` steps (an int, or an array of them)."""
    return success_reward * np.maximum(max_episode_steps - np.asarray(steps_taken), 0)


def absorbing_success_env(make_env, max_episode_steps: int, success_reward: float = 1.0) -> gym.Env:
    """`make_env()` wrapped in `AbsorbingSuccess` (picklable with functools.partial)."""
    return AbsorbingSuccess(make_env(), max_episode_steps, success_reward)


def sparse_success_env(make_env) -> gym.Env:
    """`make_env()` wrapped in `SparseSuccess` (picklable with functools.partial)."""
    return SparseSuccess(make_env())
