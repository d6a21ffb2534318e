"""Shared fixtures of the training / evaluation tests: tiny PushT datasets and a tiny config."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from diffpolicy.collection.collect import collect
from diffpolicy.data.replay_buffer import ReplayBuffer
from diffpolicy.envs.tasks import load_task

# A small MLP denoiser and a handful of steps: the tests check mechanics, not quality.
TINY = [
    "policy.backbone={type: mlp, hidden_dim: 32, num_blocks: 1, time_embed_dim: 8}",
    "train.batch_size=16", "train.steps=20", "train.checkpoint_every=10", "train.log_every=5",
    "optim.warmup_steps=5", "eval.episodes=0", "train.device=cpu", "data.val_fraction=0.0",
]


def make_pusht_dataset(path: Path, episodes: int = 3) -> Path:
    """`episodes` PushT expert demonstrations (seeds 0, 1, ...) in a zarr store at `path`."""
    collect(load_task("pusht"), episodes=episodes, out=path, progress=False)
    return path


def make_wrong_action_dataset(path: Path, action_dim: int = 3, steps: int = 40) -> Path:
    """A store with PushT's observation keys but `action_dim`-D actions."""
    rng = np.random.default_rng(0)
    buffer = ReplayBuffer.create(path, attrs={"task": "not_pusht"})
    buffer.add_episode({"agent_pos": rng.random((steps, 2), dtype=np.float32) * 512,
                        "keypoints": rng.random((steps, 18), dtype=np.float32) * 512,
                        "action": rng.random((steps, action_dim), dtype=np.float32)}, {"seed": 0})
    return path
