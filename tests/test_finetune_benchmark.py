"""The RL benchmark's SB3 observation scaling: bounded entries to [-1, 1], unbounded ones (Hopper's
state) passed through unchanged rather than turned into NaN."""

import importlib.util
from pathlib import Path

import gymnasium as gym
import numpy as np

SPEC = importlib.util.spec_from_file_location("finetune_benchmark",
                                              Path(__file__).resolve().parents[1] / "benchmarks" / "finetune.py")
benchmark = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(benchmark)


class MixedBounds(gym.Env):
    observation_space = gym.spaces.Dict({
        "a": gym.spaces.Box(np.array([0.0, -2.0], np.float32), np.array([10.0, 2.0], np.float32)),
        "b": gym.spaces.Box(-np.inf, np.inf, (2,), np.float32)})
    action_space = gym.spaces.Box(np.array([0.0], np.float32), np.array([4.0], np.float32))

    def reset(self, seed=None, options=None):
        return {"a": np.array([10.0, -1.0], np.float32), "b": np.array([123.5, -7.0], np.float32)}, {}

    def step(self, action):
        self.last_action = action
        obs, _ = self.reset()
        return obs, 0.0, False, False, {}


def test_bounded_entries_are_scaled_and_unbounded_ones_pass_through():
    env = benchmark.ScaledTask(MixedBounds())
    obs, _ = env.reset()
    np.testing.assert_allclose(obs, [1.0, -0.5, 123.5, -7.0])
    env.step(np.array([0.0], np.float32))
    np.testing.assert_allclose(env.unwrapped.last_action, [2.0])  # [-1, 1] -> the task's [0, 4]
