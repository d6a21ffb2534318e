"""A policy's own rollouts in the real environment, every executed step recorded: data for a world
model (`diffpolicy worldmodel collect`, and the real steps of a mixed dream run).

`record_episodes` plays one episode per seed in chunk environments (`rl.chunk_env.ChunkEnv`),
`n_envs` at a time with one batched policy call per chunk; an environment whose episode ended is
not stepped again, so the environment steps taken are exactly the steps recorded.

Tasks end an episode at its first success, so a model learns nothing of what follows: on Can the
gripper lets go and the episode ends before the can has dropped into the bin, and a dream whose
policy opens the gripper imagines a can that never falls (docs/RESULTS.md). `after_success` keeps
each episode going that many steps past its first success (`PastSuccess`); the episode then
records its per-step success (`STEP_SUCCESS`), which is where a world model's labels come from.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch

from diffpolicy.data.replay_buffer import ReplayBuffer, stores_final_obs
from diffpolicy.episode_meta import final_obs_meta
from diffpolicy.policies.config import PolicyConfig
from diffpolicy.rl.chunk_env import ChunkEnv
from diffpolicy.rl.vec_env import obs_to_tensors
from diffpolicy.worldmodel.data import STEP_SUCCESS

Act = Callable[..., torch.Tensor]
"""act(obs {key: (B, To, d)}, generator=...) -> chunks `(B, Tp, Da)` in data units (e.g. `policy.sample`)."""


class PastSuccess(gym.Wrapper):
    """Ends an episode `steps` environment steps after its first success instead of at it: the
    success step's `terminated` and those of the steps after it are held back until then (the
    environment must go on stepping after a success, as robosuite and PushT do). A termination
    without success (a fall) and truncation pass through."""

    def __init__(self, env: gym.Env, steps: int) -> None:
        super().__init__(env)
        self.steps, self.since = int(steps), None

    def reset(self, **kwargs):
        self.since = None
        return self.env.reset(**kwargs)

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        if self.since is None and info.get("is_success", False):
            self.since = 0
        elif self.since is not None:
            self.since += 1
        if self.since is not None:
            held = terminated and info.get("is_success", False)
            terminated = (terminated and not held) or self.since >= self.steps
        return obs, reward, terminated, truncated, info


class StepRecorder(gym.Wrapper):
    """Records the episode begun by the last `reset`: each observation, the action the env
    executed from it, the reward, and whether the task succeeded at each step's result."""

    def reset(self, **kwargs):
        obs, info = self.env.reset(**kwargs)
        self.steps: list[tuple[dict[str, np.ndarray], np.ndarray, float, bool]] = []
        self.current = obs
        return obs, info

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        self.steps.append((self.current, np.asarray(action, np.float32), float(reward), bool(info.get("is_success", False))))
        self.current = obs
        return obs, reward, terminated, truncated, info

    def episode(self) -> dict[str, Any]:
        """`{key: (T, ...), "action": (T, Da), "reward": (T,), "step_success": (T,) bool, "success": bool,
        "final_obs": {key: ...}}` (final_obs: the observation after the last action)."""
        keys = self.steps[0][0].keys()
        step_success = np.array([s[3] for s in self.steps], bool)
        return {**{k: np.stack([s[0][k] for s in self.steps]) for k in keys},
                "action": np.stack([s[1] for s in self.steps]), "reward": np.array([s[2] for s in self.steps], np.float32),
                STEP_SUCCESS: step_success, "success": bool(step_success.any()), "final_obs": dict(self.current)}


def record_episodes(act: Act, config: PolicyConfig, make_env: Callable[[], gym.Env], seeds: Sequence[int],
                    n_envs: int = 8, after_success: int = 0) -> list[dict[str, Any]]:
    """One recorded episode per seed (in seed order; each also carries its "seed").

    Batches of `n_envs` seeds; the batch's generator is seeded with its first seed (as
    `rl.evaluate` does), so the same call records the same episodes. after_success: steps each
    episode goes on past its first success (`PastSuccess`; 0: it ends there, as the task does).
    """
    seeds = [int(s) for s in seeds]

    def recorded() -> gym.Env:
        env = make_env()
        return StepRecorder(PastSuccess(env, after_success) if after_success else env)

    envs = [ChunkEnv(recorded(), config) for _ in range(min(n_envs, len(seeds)))]
    episodes: list[dict[str, Any]] = []
    try:
        for first in range(0, len(seeds), len(envs)):
            batch = seeds[first:first + len(envs)]
            generator = torch.Generator().manual_seed(batch[0])
            obs = [env.reset(seed=seed)[0] for env, seed in zip(envs, batch)]
            running = list(range(len(batch)))
            while running:
                stacked = {k: np.stack([obs[i][k] for i in running]) for k in obs[0]}
                with torch.no_grad():
                    chunks = act(obs_to_tensors(stacked), generator=generator).numpy()
                for i, chunk in zip(list(running), chunks):
                    obs[i], _, terminated, truncated, _ = envs[i].step(chunk)
                    if terminated or truncated:
                        running.remove(i)
            for env, seed in zip(envs, batch):
                episodes.append({**env.env.episode(), "seed": seed})
    finally:
        for env in envs:
            env.close()
    return episodes


def save_episodes(episodes: Sequence[dict[str, Any]], out: str | os.PathLike, attrs: dict[str, Any]) -> ReplayBuffer:
    """Append recorded episodes whole to the replay buffer at `out` (created with `attrs` if new):
    data keys = observation keys, `action` (executed), `reward`, and `step_success` where the store's
    episodes go on past success (`attrs["collection"]["after_success"]`); episode meta `seed`,
    `success` and `final_obs.<key>` (low-dim keys; not added to a store whose episodes were saved without it)."""
    out = Path(out)
    buffer = ReplayBuffer.open(out, mode="a") if out.exists() else ReplayBuffer.create(out, attrs=attrs)
    past_success = bool(dict(buffer.attrs.get("collection", {}) or {}).get("after_success", 0))
    dropped = {"success", "seed", "final_obs", *(() if past_success else (STEP_SUCCESS,))}
    for episode in episodes:
        data = {k: v for k, v in episode.items() if k not in dropped}
        final = final_obs_meta(episode["final_obs"]) if "final_obs" in episode and stores_final_obs(buffer) else {}
        buffer.add_episode(data, {"seed": int(episode["seed"]), "success": bool(episode["success"]), **final})
    return buffer
