"""A tiny, fast RL task and a deliberately biased behaviour-cloned policy for the RL tests.

`PointReach`: a point in the plane starts uniformly in [-1, 1]^2 and moves by 0.25 * action per
step (action in [-1, 1]^2) towards a fixed goal; reward -distance; success (terminated) within 0.15
of the goal; 12 steps at most (truncated). The demonstrations aim at goal + BIAS, so the cloned
policy stops about 0.57 away from the goal and never succeeds: imitation is poor, RL can fix it.
`FailingReach` also terminates episodes that start left of x = 0 (a failure) after 6 steps.
"""

from __future__ import annotations

import copy
import functools

import gymnasium as gym
import numpy as np
import torch

from diffpolicy.policies import ChunkPolicy, Normalizer, PolicyConfig, diffusion_process, flow_process

GOAL = np.array([0.5, 0.5], dtype=np.float32)
BIAS = np.array([0.4, -0.4], dtype=np.float32)
TASK = "point_reach"
MAX_STEPS = 12


class PointReach(gym.Env):
    metadata = {"render_modes": []}

    def __init__(self, render_mode=None) -> None:
        self.observation_space = gym.spaces.Dict({"pos": gym.spaces.Box(-2.0, 2.0, (2,), np.float32)})
        self.action_space = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)
        self.pos = np.zeros(2, np.float32)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.pos = self.np_random.uniform(-1, 1, 2).astype(np.float32)
        return {"pos": self.pos.copy()}, {"is_success": False}

    def step(self, action):
        self.pos = np.clip(self.pos + 0.25 * np.clip(action, -1, 1), -2, 2).astype(np.float32)
        distance = float(np.linalg.norm(self.pos - GOAL))
        success = distance < 0.15
        return {"pos": self.pos.copy()}, -distance, success, False, {"is_success": success}


def make_env() -> gym.Env:
    return gym.wrappers.TimeLimit(PointReach(), max_episode_steps=MAX_STEPS)


FAIL_STEPS = 6


class FailingReach(PointReach):
    """PointReach whose episodes starting left of x = 0 fail: terminated after FAIL_STEPS steps
    (besides success), so episodes end terminated and truncated (12 steps) in one run."""

    def reset(self, *, seed=None, options=None):
        obs, info = super().reset(seed=seed, options=options)
        self.steps, self.doomed = 0, bool(self.pos[0] < 0)
        return obs, info

    def step(self, action):
        obs, reward, terminated, truncated, info = super().step(action)
        self.steps += 1
        return obs, reward, terminated or (self.doomed and self.steps >= FAIL_STEPS), truncated, info


def make_failing_env() -> gym.Env:
    return gym.wrappers.TimeLimit(FailingReach(), max_episode_steps=MAX_STEPS)


def biased_action(pos: np.ndarray) -> np.ndarray:
    return np.clip(4.0 * (GOAL + BIAS - pos), -1, 1).astype(np.float32)


def make_bc_policy(kind: str = "diffusion", steps: int = 250, inference_steps: int = 5, seed: int = 0) -> ChunkPolicy:
    """Behaviour-clone the biased demonstrator (To = 1, Tp = 4, Ta = 2) in a few seconds (a fresh
    copy of a cached policy: `bc_policy`)."""
    return copy.deepcopy(_bc_policy(kind, steps, inference_steps, seed))


@functools.cache
def _bc_policy(kind: str, steps: int, inference_steps: int, seed: int) -> ChunkPolicy:
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    process = diffusion_process(train_steps=20) if kind == "diffusion" else flow_process()
    config = PolicyConfig(obs_shapes={"pos": (2,)}, action_dim=2, obs_horizon=1, pred_horizon=4, action_horizon=2,
                          process=process, backbone={"type": "mlp", "hidden_dim": 64},
                          inference_steps=inference_steps)
    normalizer = Normalizer.fit({"pos": np.array([[-2.0, -2.0], [2.0, 2.0]]), "action": np.array([[-1.0, -1.0], [1.0, 1.0]])},
                                image_keys=[])
    policy = ChunkPolicy(config, normalizer)
    optimizer = torch.optim.Adam(policy.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        pos = rng.uniform(-1.2, 1.2, (128, 2)).astype(np.float32)
        chunk = []
        p = pos.copy()
        for _ in range(4):
            a = np.stack([biased_action(x) for x in p])
            chunk.append(a)
            p = p + 0.25 * a
        batch = {"obs": {"pos": torch.from_numpy(pos)[:, None]}, "action": torch.from_numpy(np.stack(chunk, 1))}
        loss = policy.compute_loss(batch, generator)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    policy.metadata = {"task": TASK}
    return policy.eval()


def write_demonstrations(path, episodes: int = 16, seed: int = 0) -> str:
    """A replay-buffer store of the biased demonstrator's PointReach episodes (`pos`, `action`)."""
    from diffpolicy.data.replay_buffer import ReplayBuffer

    buffer = ReplayBuffer.create(path, attrs={"task": TASK})
    env = make_env()
    for episode in range(episodes):
        obs, _ = env.reset(seed=seed + episode)
        positions, actions = [], []
        for _ in range(MAX_STEPS):
            action = biased_action(obs["pos"])
            positions.append(obs["pos"])
            actions.append(action)
            obs, _, terminated, truncated, _ = env.step(action)
            if terminated or truncated:
                break
        buffer.add_episode({"pos": np.stack(positions), "action": np.stack(actions)})
    buffer.close()
    return str(path)


class WideActionReach(PointReach):
    """PointReach with a 3-D action space (a mismatch for the 2-D policy); counts its steps."""

    steps_taken = 0

    def __init__(self, render_mode=None) -> None:
        super().__init__(render_mode)
        self.action_space = gym.spaces.Box(-1.0, 1.0, (3,), np.float32)

    def step(self, action):
        WideActionReach.steps_taken += 1
        return super().step(action[:2])


def write_card(path, entry_point: str = "rl_tasks:PointReach", name: str = TASK) -> str:
    """A task card for `PointReach` (the CLI takes tasks as cards)."""
    path.write_text(f"""name: {name}
env: {{entry_point: "{entry_point}", kwargs: {{}}}}
observation: {{pos: {{shape: [2], dtype: float32}}}}
action: {{shape: [2], low: -1.0, high: 1.0}}
horizons: {{obs: 1, pred: 4, exec: 2}}
control_hz: 10.0
max_episode_steps: {MAX_STEPS}
success: {{metric: is_success}}
expert: {{entry_point: "rl_tasks:PointReach", kwargs: {{}}}}
dataset: {{episodes: 1, path: unused.zarr}}
eval: {{episodes: 8, seed_start: 100000}}
""")
    return str(path)
