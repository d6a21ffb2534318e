"""GAE over environment steps: a truncated episode is bootstrapped from V of its final state, a
terminated one is not; neither lets advantages leak across the episode boundary. Rollouts of
vector chunk environments record the two apart, with each ended episode's final observation."""

import numpy as np
import pytest
import torch
from rl_tasks import GOAL, make_bc_policy, make_failing_env

from diffpolicy.rl.gae import gae
from diffpolicy.rl.rollout import EpisodeStats, collect_rollout
from diffpolicy.rl.vec_env import make_chunk_vec_env

G, LAM = 0.9, 0.8


def test_truncated_is_bootstrapped_and_terminated_is_not():
    # One environment, three steps; the episode ends at step 1 (then a new one starts at step 2).
    rewards = torch.tensor([[1.0], [2.0], [3.0]])
    values = torch.tensor([[0.5], [0.25], [4.0]])
    next_values = torch.tensor([[0.25], [10.0], [6.0]])  # step 1's next state: the final observation
    ended = torch.tensor([[False], [True], [False]])
    none = torch.zeros_like(ended)
    adv_term, ret_term = gae(rewards, values, next_values, ended, none, G, LAM)
    adv_trunc, ret_trunc = gae(rewards, values, next_values, none, ended, G, LAM)
    # Step 2 is the last of the rollout: bootstrapped from V(next) in both cases.
    last = 3.0 + G * 6.0 - 4.0
    assert adv_term[2, 0] == pytest.approx(last) and adv_trunc[2, 0] == pytest.approx(last)
    # Step 1 ends the episode: terminated -> r - V; truncated -> r + gamma V(final) - V. No leak from step 2.
    assert adv_term[1, 0] == pytest.approx(2.0 - 0.25)
    assert adv_trunc[1, 0] == pytest.approx(2.0 + G * 10.0 - 0.25)
    # Step 0 continues into step 1.
    delta0 = 1.0 + G * 0.25 - 0.5
    assert adv_term[0, 0] == pytest.approx(delta0 + G * LAM * (2.0 - 0.25))
    assert adv_trunc[0, 0] == pytest.approx(delta0 + G * LAM * (2.0 + G * 10.0 - 0.25))
    torch.testing.assert_close(ret_term, adv_term + values)
    torch.testing.assert_close(ret_trunc, adv_trunc + values)


def test_environments_are_independent_and_shapes_are_checked():
    g = torch.Generator().manual_seed(0)
    rewards, values, next_values = (torch.randn(5, 3, generator=g) for _ in range(3))
    terminated = torch.rand(5, 3, generator=g) < 0.3
    truncated = (torch.rand(5, 3, generator=g) < 0.3) & ~terminated
    adv, _ = gae(rewards, values, next_values, terminated, truncated, G, LAM)
    for n in range(3):
        single, _ = gae(rewards[:, n:n + 1], values[:, n:n + 1], next_values[:, n:n + 1], terminated[:, n:n + 1],
                        truncated[:, n:n + 1], G, LAM)
        torch.testing.assert_close(adv[:, n:n + 1], single)
    with pytest.raises(ValueError, match=r"next_values must have the shape of rewards \(5, 3\), got \(5, 2\)"):
        gae(rewards, values, next_values[:, :2], terminated, truncated, G, LAM)


def test_rollouts_keep_terminated_apart_from_truncated_and_bootstrap_from_the_final_state():
    # Zero actions: a point never moves, so an episode's final observation is its first one. FailingReach
    # terminates episodes that start left of x = 0 after 6 steps (3 chunks of Ta = 2); the others are
    # truncated by the 12-step limit (6 chunks).
    config = make_bc_policy().config
    envs = make_chunk_vec_env(make_failing_env, config, n_envs=3)
    obs, _ = envs.reset(seed=[10, 11, 12])

    def still(obs_t):
        return np.zeros((3, config.pred_horizon, config.action_dim), np.float32), {}

    rollout, _ = collect_rollout(envs, obs, still, 14, EpisodeStats(3))
    envs.close()
    x = rollout.obs["pos"][..., -1, 0]
    distance = (rollout.obs["pos"][..., -1, :] - torch.from_numpy(GOAL)).norm(dim=-1)
    done = rollout.terminated | rollout.truncated
    assert not (rollout.terminated & rollout.truncated).any()
    assert torch.equal(rollout.terminated, done & ((x < 0) | (distance < 0.15)))
    assert rollout.terminated.sum() > 0 and rollout.truncated.sum() > 0
    # next_obs of an ended episode is its final state; the next row already holds the reset one.
    assert torch.equal(rollout.next_obs["pos"][done], rollout.obs["pos"][done])
    later = done.clone()
    later[-1] = False
    assert not torch.equal(rollout.obs["pos"][1:][later[:-1]], rollout.obs["pos"][:-1][later[:-1]])
    # The value targets: a terminated step's is its reward, a truncated one's bootstraps from V(final).
    value = lambda o: 1.0 + o["pos"][..., -1, 0]  # noqa: E731
    _, returns = gae(rollout.rewards, value(rollout.obs), value(rollout.next_obs), rollout.terminated,
                     rollout.truncated, G, LAM)
    terminated, truncated = rollout.terminated, rollout.truncated
    torch.testing.assert_close(returns[terminated], rollout.rewards[terminated])
    torch.testing.assert_close(returns[truncated], rollout.rewards[truncated] + G * (1.0 + x[truncated]))


def test_reward_scale_scales_the_learners_rewards_and_not_the_logged_returns():
    # The same seeded rollout twice, once with reward_scale = 0.01: the learner's rewards are exactly
    # the environment's times the scale, the finished episodes' logged returns are the environment's.
    config = make_bc_policy().config

    def run(scale):
        envs = make_chunk_vec_env(make_failing_env, config, n_envs=3)
        obs, _ = envs.reset(seed=[10, 11, 12])
        stats = EpisodeStats(3)
        drift = lambda obs_t: (np.full((3, config.pred_horizon, config.action_dim), 0.1, np.float32), {})  # noqa: E731
        rollout, _ = collect_rollout(envs, obs, drift, 14, stats, reward_scale=scale)
        envs.close()
        return rollout, stats.pop_finished()

    plain, plain_episodes = run(1.0)
    scaled, scaled_episodes = run(0.01)
    assert plain.rewards.abs().sum() > 0
    torch.testing.assert_close(scaled.rewards, plain.rewards * 0.01)
    assert scaled_episodes == plain_episodes and len(plain_episodes) > 0


@pytest.mark.parametrize("scale", [0.0, -1.0, float("inf"), float("nan")])
def test_reward_scale_must_be_a_finite_positive_number(scale):
    from diffpolicy.rl.errors import FinetuneError
    from diffpolicy.rl.session import OnPolicyConfig

    with pytest.raises(FinetuneError, match=r"config key 'reward_scale': expected a finite number > 0"):
        OnPolicyConfig(reward_scale=scale)
