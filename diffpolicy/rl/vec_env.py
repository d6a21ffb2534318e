"""Vectorized chunk environments: subprocesses (gymnasium `AsyncVectorEnv`) or in-process.

Every environment is a `ChunkEnv`; the vector env resets a finished one in the same step
(`AutoresetMode.SAME_STEP`), handing its last observation over in `info["final_obs"]` so that a
truncated episode can be bootstrapped from V of its true final state.
"""

from __future__ import annotations

from collections.abc import Callable

import gymnasium as gym
import numpy as np
import torch
from gymnasium.vector import AsyncVectorEnv, AutoresetMode, SyncVectorEnv

from diffpolicy.policies.config import PolicyConfig
from diffpolicy.rl.chunk_env import ChunkEnv, check_env_matches_policy


class _ChunkEnvFactory:
    """A picklable `() -> ChunkEnv` (subprocess workers build their own environment)."""

    def __init__(self, make_env: Callable[[], gym.Env], config: PolicyConfig) -> None:
        self.make_env, self.config = make_env, config

    def __call__(self) -> ChunkEnv:
        return ChunkEnv(self.make_env(), self.config)


def make_chunk_vec_env(make_env: Callable[[], gym.Env], config: PolicyConfig, n_envs: int,
                       asynchronous: bool = False) -> gym.vector.VectorEnv:
    """`n_envs` `ChunkEnv`s of `make_env()`; checks the action and observation spaces against the
    policy config first, in this process, before any environment step."""
    probe = make_env()
    try:
        check_env_matches_policy(probe, config, "finetune")
    finally:
        probe.close()
    factories = [_ChunkEnvFactory(make_env, config) for _ in range(n_envs)]
    if asynchronous:
        return AsyncVectorEnv(factories, autoreset_mode=AutoresetMode.SAME_STEP, context="spawn")
    return SyncVectorEnv(factories, autoreset_mode=AutoresetMode.SAME_STEP)


def obs_to_tensors(obs: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Batched numpy observations `{key: (N, To, ...)}` -> tensors (float32 for low-dim keys)."""
    return {k: torch.as_tensor(np.ascontiguousarray(v)) if v.dtype == np.uint8
            else torch.as_tensor(np.asarray(v, dtype=np.float32)) for k, v in obs.items()}


def final_observations(next_obs: dict[str, np.ndarray], info: dict, done: np.ndarray) -> dict[str, np.ndarray]:
    """The state each env's step led to: next_obs, or `info["final_obs"]` where the episode ended."""
    result = {k: np.array(v, copy=True) for k, v in next_obs.items()}
    for i in np.flatnonzero(done):
        for k in result:
            result[k][i] = info["final_obs"][i][k]
    return result


def step_info(info: dict, key: str, done: np.ndarray) -> np.ndarray:
    """`info[key]` of every env's step `(N,)`: from `info["final_info"]` where the episode ended
    (the same-step reset replaced its info), else from `info`."""
    values = np.array(info[key]) if key in info else np.zeros(len(done), dtype=np.asarray(info["final_info"][key]).dtype)
    if done.any():
        values[done] = np.asarray(info["final_info"][key])[done]
    return values
