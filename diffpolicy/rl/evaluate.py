"""Held-out evaluation of a fine-tuned policy in the same chunk environments it was trained in.

Episodes run in batches of `n_envs` seeds; each environment plays exactly one episode per batch
(its same-step reset after the end is ignored). `act` is the deployed sampler, e.g.
`policy.sample` of the fine-tuned policy (deterministic: DDIM eta = 0, Euler flow) or a
`DSRLPolicy`'s.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import gymnasium as gym
import numpy as np
import torch

from diffpolicy.policies.config import PolicyConfig
from diffpolicy.rl.vec_env import make_chunk_vec_env, obs_to_tensors, step_info


def evaluate(act: Callable[..., torch.Tensor], config: PolicyConfig,
             make_env: Callable[[], gym.Env], seeds: Sequence[int], n_envs: int = 8) -> dict[str, float]:
    """Success rate and mean return over one episode per seed.

    Args:
        act: `act(obs {key: (N, To, ...)}, generator=...)` -> chunks `(N, Tp, Da)` in data units; the
            generator (seeded with the batch's first seed) makes every evaluation reproducible.
        config: the policy's config (horizons, observation keys).
    Returns:
        {"eval_success": fraction of episodes with success, "eval_return": mean return,
         "eval_steps": environment steps of all the episodes}.
    """
    seeds = list(seeds)
    return summarize(play_episodes(act, config, make_env, seeds, min(n_envs, len(seeds))))


def summarize(episodes: np.ndarray) -> dict[str, float]:
    """`evaluate`'s result from `play_episodes`' rows `(E, 3)` (success, return, steps), in seed order."""
    return {"eval_success": float(np.mean(episodes[:, 0])), "eval_return": float(np.mean(episodes[:, 1])),
            "eval_steps": int(episodes[:, 2].sum())}


def play_episodes(act: Callable[..., torch.Tensor], config: PolicyConfig, make_env: Callable[[], gym.Env],
                  seeds: Sequence[int], n_envs: int) -> np.ndarray:
    """One episode per seed, in batches of exactly `n_envs` environments (the last batch padded).

    A batch's episodes depend only on its seeds and `n_envs`, so the batches of one seed list may be
    played by different processes (`Session.evaluate` under torchrun) with the same result.
    Returns:
        `(len(seeds), 3)` float64 rows: success (0 / 1), return, environment steps.
    """
    seeds = list(seeds)
    rows = np.zeros((len(seeds), 3))
    if not seeds:
        return rows
    envs = make_chunk_vec_env(make_env, config, n_envs)
    try:
        for start in range(0, len(seeds), n_envs):
            batch = seeds[start:start + n_envs]
            kept = len(batch)
            batch = batch + [batch[-1]] * (n_envs - kept)  # pad the last batch; extra ones dropped
            obs, _ = envs.reset(seed=batch)
            generator = torch.Generator().manual_seed(batch[0])
            running = np.ones(n_envs, dtype=bool)
            total = np.zeros(n_envs)
            success = np.zeros(n_envs, dtype=bool)
            taken = np.zeros(n_envs, dtype=np.int64)
            while running.any():
                with torch.no_grad():
                    chunks = act(obs_to_tensors(obs), generator=generator).numpy()
                obs, reward, terminated, truncated, info = envs.step(chunks)
                done = terminated | truncated
                total += np.where(running, reward, 0.0)
                taken += np.where(running, step_info(info, "env_steps", done), 0)
                success |= running & step_info(info, "is_success", done).astype(bool)
                running &= ~done
            rows[start:start + kept] = np.stack([success, total, taken], axis=1)[:kept]
    finally:
        envs.close()
    return rows
