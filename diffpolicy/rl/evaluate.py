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
    successes, returns, steps = [], [], 0
    envs = make_chunk_vec_env(make_env, config, min(n_envs, len(seeds)))
    try:
        for start in range(0, len(seeds), envs.num_envs):
            batch = seeds[start:start + envs.num_envs]
            batch = batch + [batch[-1]] * (envs.num_envs - len(batch))  # pad the last batch; extra ones dropped
            obs, _ = envs.reset(seed=batch)
            generator = torch.Generator().manual_seed(batch[0])
            running = np.ones(envs.num_envs, dtype=bool)
            total = np.zeros(envs.num_envs)
            success = np.zeros(envs.num_envs, dtype=bool)
            taken = np.zeros(envs.num_envs, dtype=np.int64)
            while running.any():
                with torch.no_grad():
                    chunks = act(obs_to_tensors(obs), generator=generator).numpy()
                obs, reward, terminated, truncated, info = envs.step(chunks)
                done = terminated | truncated
                total += np.where(running, reward, 0.0)
                taken += np.where(running, step_info(info, "env_steps", done), 0)
                success |= running & step_info(info, "is_success", done).astype(bool)
                running &= ~done
            kept = len(seeds[start:start + envs.num_envs])
            successes += success[:kept].tolist()
            returns += total[:kept].tolist()
            steps += int(taken[:kept].sum())
    finally:
        envs.close()
    return {"eval_success": float(np.mean(successes)), "eval_return": float(np.mean(returns)), "eval_steps": steps}
