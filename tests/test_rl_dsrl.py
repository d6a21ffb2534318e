"""DSRL: the noise-action wrapper passes stable-baselines3's env checker and runs the
deterministic sampler once per step from the given noise; SAC's targets bootstrap truncated
transitions and not terminated ones; environment steps are counted as executed actions; the
result saves and loads as a `DSRLPolicy`; an interrupted run resumes bit-exactly; bad input
fails before any environment step."""

import json

import numpy as np
import pytest
import torch
from rl_tasks import WideActionReach, make_bc_policy, make_env, make_failing_env
from stable_baselines3.common.env_checker import check_env

from diffpolicy.rl import dsrl
from diffpolicy.rl.errors import ActionSpaceMismatchError, UnsupportedProcessError
from diffpolicy.rl.sb3_state import SB3State


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


def saved_sac(run_dir):
    """The committed SB3 checkpoint of a DSRL run: the SAC model with its replay buffer."""
    from stable_baselines3 import SAC

    number = json.loads((run_dir / "sb3" / "state.json").read_text())["number"]
    model = SAC.load(run_dir / "sb3" / f"model_{number}.zip", device="cpu")
    model.load_replay_buffer(run_dir / "sb3" / f"replay_buffer_{number}.pkl")
    return model


def test_sac_counts_env_steps_and_saves_a_policy(tmp_path):
    config = dsrl.DSRLConfig(env_steps=120, learning_starts=20, batch_size=16, hidden_dim=32, eval_every=60,
                             eval_episodes=4, buffer_size=1000)
    result = dsrl.finetune(make_bc_policy(), make_env, config, tmp_path / "run", progress=False)
    state = json.loads((tmp_path / "run" / "sb3" / "state.json").read_text())
    assert 120 <= state["counters"]["env_steps"] < 120 + 2  # counted in environment steps, not wrapper steps
    assert [row["env_steps"] >= 60 for row in result.history] == [True, True]
    assert sorted(p.name for p in (tmp_path / "run" / "sb3").iterdir()) == [  # only the committed checkpoint
        "model_2.zip", "replay_buffer_2.pkl", "rng_2.safetensors", "state.json"]
    # The saved policy loads alone and samples with the actor's noise through the frozen base.
    loaded = dsrl.DSRLPolicy.load(tmp_path / "run" / "policy")
    obs = {"pos": torch.tensor([[[0.3, 0.1]], [[-0.5, 0.9]]])}
    chunk = loaded.sample(obs)
    assert chunk.shape == (2, 4, 2)
    noise = loaded.noise(obs)
    assert float(noise.abs().max()) <= 1.5
    assert torch.equal(chunk, loaded.base.sample(obs, x_init=noise))


def test_sac_targets_bootstrap_truncated_transitions_and_not_terminated_ones(tmp_path):
    # FailingReach ends episodes both ways: terminated (a failure after 6 steps) and truncated (12 steps).
    config = dsrl.DSRLConfig(env_steps=160, learning_starts=20, batch_size=16, hidden_dim=32, eval_every=0,
                             eval_episodes=2, buffer_size=1000)
    dsrl.finetune(make_bc_policy(), make_failing_env, config, tmp_path / "run", progress=False)
    buffer = saved_sac(tmp_path / "run").replay_buffer
    n = buffer.pos
    dones, timeouts = buffer.dones[:n, 0], buffer.timeouts[:n, 0]
    terminated, truncated = (dones == 1) & (timeouts == 0), timeouts == 1
    assert terminated.sum() > 0 and truncated.sum() > 0
    assert np.all(dones[truncated] == 1)
    # What SAC's target r + gamma (1 - done) Q(s', a') reads: done = 0 for a truncation, 1 for a termination.
    target_done = buffer._get_samples(np.arange(n)).dones.numpy()[:, 0]
    assert np.all(target_done[truncated] == 0) and np.all(target_done[terminated] == 1)
    assert np.all(target_done[dones == 0] == 0)
    # s' of a finished episode is its true final observation, not the next episode's reset one.
    obs, next_obs = buffer.observations[:n, 0], buffer.next_observations[:n, 0]
    ended = np.flatnonzero(dones[:-1] == 1)
    going_on = np.flatnonzero(dones[:-1] == 0)
    assert np.array_equal(next_obs[going_on], obs[going_on + 1])
    assert not np.any(np.all(next_obs[ended] == obs[ended + 1], axis=1))


def test_resume_continues_bit_exactly(tmp_path, monkeypatch):
    # Five segments of 40 environment steps; random actions until wrapper step 25 (inside segment 2),
    # SAC updates after. The resumed run is killed twice: after checkpoints 1 and 3.
    config = dsrl.DSRLConfig(env_steps=200, learning_starts=25, batch_size=16, hidden_dim=32, eval_every=40,
                             eval_episodes=2, buffer_size=1000)
    straight = dsrl.finetune(make_bc_policy(), make_env, config, tmp_path / "straight", progress=False)
    assert len(straight.history) == 5
    original = SB3State.save

    def save_then_die(self, model, number, *args):
        original(self, model, number, *args)
        if number in (1, 3):
            raise KeyboardInterrupt

    monkeypatch.setattr(SB3State, "save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        dsrl.finetune(make_bc_policy(), make_env, config, tmp_path / "resumed", progress=False)
    with pytest.raises(KeyboardInterrupt):
        dsrl.finetune(make_bc_policy(), make_env, config, tmp_path / "resumed", resume=True, progress=False)
    monkeypatch.setattr(SB3State, "save", original)
    resumed = dsrl.finetune(make_bc_policy(), make_env, config, tmp_path / "resumed", resume=True, progress=False)

    def without_cpu(rows):
        return [{k: v for k, v in row.items() if k != "cpu_s"} for row in rows]

    assert without_cpu(resumed.history) == without_cpu(straight.history[3:])
    a, b = saved_sac(tmp_path / "straight"), saved_sac(tmp_path / "resumed")
    assert a.num_timesteps == b.num_timesteps and a._n_updates == b._n_updates > 0
    for name, tensor in a.policy.state_dict().items():
        assert torch.equal(tensor, b.policy.state_dict()[name]), name
    assert torch.equal(a.log_ent_coef, b.log_ent_coef)
    for optimizer in ("actor", "critic"):
        state_a = getattr(a, optimizer).optimizer.state_dict()["state"]
        state_b = getattr(b, optimizer).optimizer.state_dict()["state"]
        assert all(torch.equal(state_a[i]["exp_avg"], state_b[i]["exp_avg"]) for i in state_a)
    assert a.replay_buffer.pos == b.replay_buffer.pos
    for field in ("observations", "actions", "rewards", "next_observations", "dones", "timeouts"):
        assert np.array_equal(getattr(a.replay_buffer, field), getattr(b.replay_buffer, field)), field
    for name, tensor in straight.policy.actor.state_dict().items():
        assert torch.equal(tensor, resumed.policy.actor.state_dict()[name]), name

    def rows(run):
        lines = (tmp_path / run / "curves.csv").read_text().splitlines()
        return [",".join(v for i, v in enumerate(line.split(",")) if i != 2) for line in lines]  # without cpu_s

    assert rows("straight") == rows("resumed")


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


def test_ppo_resume_continues_bit_exactly(tmp_path, monkeypatch):
    # SB3 PPO: segments end at its rollout boundaries (16 chunks x 2 environments, about 64 steps).
    config = dsrl.DSRLConfig(algorithm="ppo", env_steps=160, batch_size=16, hidden_dim=32, eval_every=40,
                             eval_episodes=2, n_envs=2)
    straight = dsrl.finetune(make_bc_policy(), make_env, config, tmp_path / "straight", progress=False)
    original = SB3State.save

    def save_then_die(self, model, number, *args):
        original(self, model, number, *args)
        if number == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(SB3State, "save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        dsrl.finetune(make_bc_policy(), make_env, config, tmp_path / "resumed", progress=False)
    monkeypatch.setattr(SB3State, "save", original)
    resumed = dsrl.finetune(make_bc_policy(), make_env, config, tmp_path / "resumed", resume=True, progress=False)
    assert len(straight.history) == 3 and len(resumed.history) == 2
    assert straight.history[-1]["env_steps"] >= 160  # a rollout started before the budget is finished
    for a, b in zip(straight.history[1:], resumed.history):
        assert {k: v for k, v in a.items() if k != "cpu_s"} == {k: v for k, v in b.items() if k != "cpu_s"}
    for name, tensor in straight.policy.actor.state_dict().items():
        assert torch.equal(tensor, resumed.policy.actor.state_dict()[name]), name
