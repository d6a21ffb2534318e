"""Toy systems and small world models for the world-model tests.

- `mass_episodes`: a deterministic point mass whose observation is its position only (the velocity
  is hidden, so the model must carry it in its latent): v' = 0.8 v + 0.2 a, x' = x + 0.2 v'.
- `reach_play_episodes`: play data of `rl_tasks.PointReach` from a noisy controller aiming at
  random targets around the goal (so the data covers the goal and holds successes), stepped in the
  real environment.
- `train_reach_world_model`: a world model of PointReach trained on that play data.
"""

from __future__ import annotations

import numpy as np
from rl_tasks import GOAL, make_env

from diffpolicy.worldmodel.data import Transitions
from diffpolicy.worldmodel.model import ModelConfig
from diffpolicy.worldmodel.training import TrainConfig, WorldModelConfig, train_world_model


def mass_episodes(n: int, steps: int, seed: int, action_scale: float = 1.0) -> list[dict]:
    rng = np.random.default_rng(seed)
    episodes = []
    for _ in range(n):
        x, v = rng.uniform(-1, 1, 2), np.zeros(2)
        obs, actions, rewards = [], [], []
        for _ in range(steps):
            a = rng.uniform(-action_scale, action_scale, 2)
            obs.append(x.copy())
            actions.append(a)
            v = 0.8 * v + 0.2 * a
            x = x + 0.2 * v
            rewards.append(-np.linalg.norm(x))
        episodes.append({"pos": np.array(obs), "action": np.array(actions), "reward": np.array(rewards), "success": False,
                         "final_obs": {"pos": x.copy()}})
    return episodes


def reach_play_episodes(n: int, seed: int) -> list[dict]:
    """Episodes of PointReach from a controller heading for goal + U(-0.6, 0.6)^2 with N(0, 0.3) action noise."""
    rng = np.random.default_rng(seed)
    env = make_env()
    episodes = []
    for i in range(n):
        obs, _ = env.reset(seed=seed * 10_000 + i)
        target = GOAL + rng.uniform(-0.6, 0.6, 2)
        rows, done, success = [], False, False
        while not done:
            action = np.clip(4.0 * (target - obs["pos"]) + rng.normal(0, 0.3, 2), -1, 1).astype(np.float32)
            next_obs, reward, terminated, truncated, info = env.step(action)
            rows.append((obs["pos"], action, reward))
            success |= bool(info["is_success"])
            obs, done = next_obs, terminated or truncated
        episodes.append({"pos": np.array([r[0] for r in rows]), "action": np.array([r[1] for r in rows]),
                         "reward": np.array([r[2] for r in rows]), "success": success,
                         "final_obs": {"pos": obs["pos"]}})
    env.close()
    return episodes


REACH_CONFIG = WorldModelConfig(ModelConfig(members=3, latent_dim=16, hidden_dim=64, history=1),
                                TrainConfig(steps=1200, batch_size=64, horizon=4, lr=3e-3, eval_every=1200,
                                            eval_horizon=8))


def train_reach_world_model(run_dir, config: WorldModelConfig = REACH_CONFIG):
    """(run, data): a world model of PointReach trained on 300 play episodes."""
    data = Transitions.from_episodes(reach_play_episodes(300, seed=1), ["pos"])
    run = train_world_model(data, config, run_dir, np.full(2, -1.0), np.full(2, 1.0), progress=False,
                            metadata={"task": "point_reach"})
    return run, data
