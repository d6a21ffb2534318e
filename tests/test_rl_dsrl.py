"""DSRL: the noise-action wrapper passes stable-baselines3's env checker and runs the
deterministic sampler once per step from the given noise; SAC's replay buffer keeps truncated
apart from terminated; environment steps are counted as executed actions; the result saves and
loads as a `DSRLPolicy`; bad input fails before any environment step."""

import json

import numpy as np
import pytest
import torch
from rl_tasks import WideActionReach, make_bc_policy, make_env
from stable_baselines3.common.env_checker import check_env

from diffpolicy.rl import dsrl
from diffpolicy.rl.errors import ActionSpaceMismatchError, UnsupportedProcessError


def noise_env(kind="diffusion"):
    return dsrl.NoiseActionEnv(make_env(), dsrl.deterministic(make_bc_policy(kind), None), 1.5)


@pytest.mark.parametrize("kind", ["diffusion", "flow"])
def test_wrapper_passes_the_sb3_env_checker(kind):
    env = noise_env(kind)
    check_env(env, warn=True)
    assert env.action_space.shape == (4 * 2,) and float(env.action_space.high.max()) == 1.5


def test_one_deterministic_sampling_per_step_from_the_given_noise(monkeypatch):
    env = noise_env()
    policy = env.policy
    calls = []
    original = type(policy).sample

    def counting(self, obs, **kwargs):
        calls.append(kwargs["x_init"].clone())
        return original(self, obs, **kwargs)

    monkeypatch.setattr(type(policy), "sample", counting)
    env.reset(seed=3)
    w = np.linspace(-1.5, 1.5, 8).astype(np.float32)
    _, _, _, _, info = env.step(w)
    assert len(calls) == 1 and torch.equal(calls[0].flatten(), torch.from_numpy(w))
    assert info["env_steps"] == 2  # Ta actions executed, as in deployment
    # Deterministic: the same observation and noise give the same chunk twice.
    pos = {"pos": torch.tensor([[[0.1, -0.2]]])}
    x = torch.from_numpy(w).reshape(1, 4, 2)
    assert torch.equal(original(policy, pos, x_init=x), original(policy, pos, x_init=x))


def test_sac_keeps_truncated_apart_from_terminated_and_counts_env_steps(tmp_path):
    config = dsrl.DSRLConfig(env_steps=120, learning_starts=20, batch_size=16, hidden_dim=32, eval_every=60,
                             eval_episodes=4, buffer_size=1000)
    result = dsrl.finetune(make_bc_policy(), make_env, config, tmp_path / "run", progress=False)
    state = json.loads((tmp_path / "run" / "sb3" / "state.json").read_text())
    assert 120 <= state["counters"]["env_steps"] < 120 + 2  # counted in environment steps, not wrapper steps
    assert [row["env_steps"] >= 60 for row in result.history] == [True, True]
    # The replay buffer: a time-limit end is stored as a timeout (bootstrapped), not as terminal.
    from stable_baselines3 import SAC

    model = SAC.load(tmp_path / "run" / "sb3" / "model.zip")
    model.load_replay_buffer(tmp_path / "run" / "sb3" / "replay_buffer.pkl")
    buffer = model.replay_buffer
    n = buffer.pos
    dones, timeouts = buffer.dones[:n, 0], buffer.timeouts[:n, 0]
    assert timeouts.sum() > 0  # the 12-step limit cut episodes (6 chunks of 2)
    assert np.all(dones[timeouts == 1] == 1)  # SB3's target uses dones * (1 - timeouts): bootstrapped
    # The saved policy loads alone and samples with the actor's noise through the frozen base.
    loaded = dsrl.DSRLPolicy.load(tmp_path / "run" / "policy")
    obs = {"pos": torch.tensor([[[0.3, 0.1]], [[-0.5, 0.9]]])}
    chunk = loaded.sample(obs)
    assert chunk.shape == (2, 4, 2)
    noise = loaded.noise(obs)
    assert float(noise.abs().max()) <= 1.5
    assert torch.equal(chunk, loaded.base.sample(obs, x_init=noise))


def test_bad_input_fails_before_any_environment_step(tmp_path):
    flow = make_bc_policy("flow")
    flow.config = type(flow.config)(**{**flow.config.__dict__,
                                       "process": type(flow.config.process)(**{**flow.config.process.__dict__,
                                                                               "step_std": 0.1})})
    with pytest.raises(UnsupportedProcessError, match="dsrl needs a deterministic sampler"):
        dsrl.finetune(flow, make_env, dsrl.DSRLConfig(), tmp_path / "a")
    WideActionReach.steps_taken = 0
    with pytest.raises(ActionSpaceMismatchError, match="the policy acts in Box of shape"):
        dsrl.finetune(make_bc_policy(), lambda: WideActionReach(), dsrl.DSRLConfig(), tmp_path / "b")
    assert WideActionReach.steps_taken == 0
    with pytest.raises(dsrl.FinetuneError, match="config key 'algorithm': expected one of"):
        dsrl.DSRLConfig(algorithm="td3")


def test_sb3_ppo_ratio_is_exactly_one_before_the_first_update():
    from stable_baselines3 import PPO
    from stable_baselines3.common.callbacks import CallbackList
    from stable_baselines3.common.vec_env import DummyVecEnv

    env = DummyVecEnv([noise_env])
    model = PPO("MlpPolicy", env, n_steps=16, batch_size=8, seed=0, device="cpu", policy_kwargs={"net_arch": [32]})
    model._setup_learn(total_timesteps=16, callback=None)
    callback = CallbackList([])
    callback.init_callback(model)
    assert model.collect_rollouts(env, callback, model.rollout_buffer, n_rollout_steps=16)
    buffer = model.rollout_buffer
    for batch in buffer.get(batch_size=8):
        with torch.no_grad():
            _, log_prob, _ = model.policy.evaluate_actions(batch.observations, batch.actions)
        assert torch.equal(torch.exp(log_prob - batch.old_log_prob), torch.ones_like(log_prob))
