"""The reward shaping of fine-tuning runs on a scripted environment whose dense reward, success
step and time limit are known: absorbing success pays each remaining step, sparse success pays
the success alone, and neither touches a failure's ending or the observations."""

import functools

import gymnasium as gym
import numpy as np
import pytest

from diffpolicy.cli import main
from diffpolicy.rl.rewards import AbsorbingSuccess, SparseSuccess, absorbing_success_env, sparse_success_env

LIMIT = 10


class Scripted(gym.Env):
    """Dense reward 0.5 per step; success (terminated, is_success) at step `succeed_at`, if any;
    truncated at LIMIT."""

    observation_space = gym.spaces.Box(-1, 1, (1,))
    action_space = gym.spaces.Box(-1, 1, (1,))

    def __init__(self, succeed_at=None):
        self.succeed_at, self.t = succeed_at, 0

    def reset(self, *, seed=None, options=None):
        self.t = 0
        return np.zeros(1, dtype=np.float32), {}

    def step(self, action):
        self.t += 1
        success = self.t == self.succeed_at
        return np.full(1, self.t, dtype=np.float32), 0.5, success, self.t >= LIMIT, {"is_success": success}


def episode(env):
    env.reset(seed=0)
    rewards, flags = [], []
    while True:
        obs, reward, terminated, truncated, info = env.step(np.zeros(1))
        rewards.append(reward)
        flags.append((terminated, truncated, float(obs[0])))
        if terminated or truncated:
            return rewards, flags


@pytest.mark.parametrize("wrap", [functools.partial(AbsorbingSuccess, max_episode_steps=LIMIT), SparseSuccess])
def test_success_at_step_four(wrap):
    plain_rewards, plain_flags = episode(Scripted(succeed_at=4))
    rewards, flags = episode(wrap(Scripted(succeed_at=4)))
    assert flags == plain_flags == [(False, False, 1.0), (False, False, 2.0), (False, False, 3.0), (True, False, 4.0)]
    if wrap is SparseSuccess:
        assert rewards == [0.0, 0.0, 0.0, 1.0]
    else:  # the dense reward, plus 1 for each of the 6 steps left of the limit
        assert rewards == [0.5, 0.5, 0.5, 0.5 + 6.0]
    assert plain_rewards == [0.5] * 4


@pytest.mark.parametrize("wrap", [functools.partial(AbsorbingSuccess, max_episode_steps=LIMIT), SparseSuccess])
def test_a_failure_keeps_its_ending_and_earns_no_success(wrap):
    rewards, flags = episode(wrap(Scripted(succeed_at=None)))
    assert len(rewards) == LIMIT and flags[-1] == (False, True, float(LIMIT))
    assert rewards == ([0.0] * LIMIT if wrap is SparseSuccess else [0.5] * LIMIT)


def test_the_factories_wrap_a_fresh_environment():
    assert isinstance(sparse_success_env(lambda: Scripted(3)), SparseSuccess)
    absorbing = absorbing_success_env(lambda: Scripted(3), LIMIT, success_reward=2.0)
    assert episode(absorbing)[0] == [0.5, 0.5, 0.5 + 2.0 * 7]


def test_the_command_line_takes_one_reward(tmp_path, capsys):
    common = ["finetune", "--checkpoint", str(tmp_path / "none"), "--task", "pusht"]
    assert main([*common, "--algo", "dppo", "--absorbing-success", "--sparse-success"]) == 2
    assert "--absorbing-success and --sparse-success: choose one reward" in capsys.readouterr().err
    assert main([*common, "--algo", "dream", "--absorbing-success", "--sparse-success"]) == 2
    assert "--absorbing-success and --sparse-success: choose one reward" in capsys.readouterr().err
