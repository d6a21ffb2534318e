"""World model and dream fine-tuning: training windows respect episodes, the model predicts a
deterministic toy system it never saw to tolerance, training resumes exactly, imagined rollouts
are reproducible under a seed, the uncertainty cut triggers on out-of-distribution actions and not
on the data's, and DPPO / flow PPO in the dream raise the real reward where imitation is poor."""

import dataclasses

import numpy as np
import pytest
import torch
from rl_tasks import GOAL, TASK, make_bc_policy, make_env, write_card
from wm_tasks import mass_episodes, reach_play_episodes, train_reach_world_model

from diffpolicy.cli import main
from diffpolicy.data.replay_buffer import ReplayBuffer
from diffpolicy.evaluation.rollout import rollout
from diffpolicy.policies import ChunkPolicy, PolicyConfig, flow_process
from diffpolicy.rl import dppo, flow_ppo
from diffpolicy.rl.dsrl import DSRLConfig
from diffpolicy.rl.runs import read_run
from diffpolicy.worldmodel import dream
from diffpolicy.worldmodel.data import Transitions
from diffpolicy.worldmodel.errors import WorldModelError
from diffpolicy.worldmodel.heldout import heldout_errors
from diffpolicy.worldmodel.imagine import DreamVecEnv
from diffpolicy.worldmodel.model import LatentWorldModel, ModelConfig
from diffpolicy.worldmodel.play import StepRecorder, record_episodes, save_episodes
from diffpolicy.worldmodel.training import (
    TrainConfig,
    WorldModelConfig,
    checkpoint_score,
    resolve_world_model_dir,
    sample_batch,
    success_logit_offset,
    success_rates,
    success_starts,
    train_world_model,
)

BOUNDS = (np.full(2, -1.0), np.full(2, 1.0))
MASS_CONFIG = WorldModelConfig(ModelConfig(members=3, latent_dim=16, hidden_dim=64, history=2),
                               TrainConfig(steps=500, batch_size=64, horizon=8, lr=3e-3, eval_every=500,
                                           eval_horizon=16))
# A policy's view of the point mass: position history To = 2, chunks of Tp = 4 executing Ta = 2.
MASS_POLICY = PolicyConfig(obs_shapes={"pos": (2,)}, action_dim=2, obs_horizon=2, pred_horizon=4, action_horizon=2,
                           process=flow_process(), backbone={"type": "mlp", "hidden_dim": 32})
DATA_ACTIONS = 0.2  # the point-mass data's actions are uniform in [-0.2, 0.2]^2 of the [-1, 1]^2 action space


# ----------------------------------------------------------------------------- data
def test_windows_pad_the_episode_start_and_mask_past_its_end():
    episodes = [{"pos": np.arange(3)[:, None] * [1.0, 10.0], "action": np.arange(3)[:, None] * [1.0, 1.0],
                 "reward": np.array([0.0, 1.0, 2.0]), "success": True},
                {"pos": 100 + np.arange(2)[:, None] * [1.0, 10.0], "action": np.ones((2, 2)),
                 "reward": np.array([5.0, 6.0]), "success": False}]
    data = Transitions.from_episodes(episodes, ["pos"])
    assert data.n_episodes == 2 and data.n_steps == 5 and data.success.tolist() == [False, False, True, False, False]
    assert data.time_index.tolist() == [0, 1, 2, 0, 1]
    w = data.windows(np.array([0, 1, 3]), history=2, horizon=3)
    np.testing.assert_array_equal(w["obs_history"][0], [[0, 0], [0, 0]])      # the first observation repeated
    np.testing.assert_array_equal(w["obs_history"][1], [[0, 0], [1, 10]])
    np.testing.assert_array_equal(w["obs_history"][2], [[100, 100], [100, 100]])
    assert w["step_mask"].tolist() == [[True, True, True], [True, True, False], [True, True, False]]
    assert w["obs_mask"].tolist() == [[True, True, False], [True, False, False], [True, False, False]]
    np.testing.assert_array_equal(w["next_obs"][0, :2], [[1, 10], [2, 20]])
    assert w["reward"][1, :2].tolist() == [1.0, 2.0] and w["success"].tolist()[1] == [False, True, False]
    train, val = data.split(0.5, seed=0)
    assert {train.n_steps, val.n_steps} == {3, 2}


def test_the_final_observation_is_the_last_actions_target_where_an_episode_has_it(tmp_path):
    """The first episode carries the observation after its last action: the window ending there
    predicts it (obs_mask true); the second has none and stays masked. Stores and the in-memory
    episodes of a mixed run give the same Transitions, and `select` / `concat` / tensors keep it."""
    episodes = [{"pos": np.arange(3)[:, None] * [1.0, 10.0], "action": np.ones((3, 2)), "reward": np.zeros(3),
                 "success": True, "final_obs": {"pos": np.array([3.0, 30.0])}},
                {"pos": 100 + np.arange(2)[:, None] * [1.0, 10.0], "action": np.ones((2, 2)),
                 "reward": np.zeros(2), "success": False}]
    data = Transitions.from_episodes(episodes, ["pos"])
    w = data.windows(np.array([1, 3]), history=1, horizon=3)
    assert w["obs_mask"].tolist() == [[True, True, False], [True, False, False]]
    np.testing.assert_array_equal(w["next_obs"][0, :2], [[2, 20], [3, 30]])
    assert w["success"][0].tolist() == [False, True, False]  # the transition that succeeds now has its target

    buffer = ReplayBuffer.create(tmp_path / "final.zarr")
    for i, episode in enumerate(episodes[:1]):
        buffer.add_episode({"pos": episode["pos"], "action": episode["action"], "reward": episode["reward"]},
                           {"seed": i, "success": True, "final_obs.pos": episode["final_obs"]["pos"]})
    stored = Transitions.load([tmp_path / "final.zarr"], ["pos"])
    assert stored.final_stored.tolist() == [True]
    np.testing.assert_array_equal(stored.final_obs, [[3.0, 30.0]])
    both = Transitions.concat([data.select(np.array([1])), stored])
    assert both.final_stored.tolist() == [False, True]
    back = Transitions.from_tensors(both.tensors(), both.keys, both.dims)
    np.testing.assert_array_equal(back.windows(np.arange(5), 1, 2)["next_obs"], both.windows(np.arange(5), 1, 2)["next_obs"])
    legacy = {k: v for k, v in both.tensors().items() if not k.startswith("final")}  # a checkpoint from before
    assert Transitions.from_tensors(legacy, both.keys, both.dims).final_stored.tolist() == [False, False]


def test_recorded_episodes_keep_the_observation_after_the_last_action(tmp_path):
    recorder = StepRecorder(make_env())
    obs, _ = recorder.reset(seed=3)
    done = False
    while not done:
        obs, _, terminated, truncated, _ = recorder.step(recorder.action_space.sample() * 0)
        done = terminated or truncated
    episode = {**recorder.episode(), "seed": 3}
    assert set(episode["final_obs"]) == set(obs)
    for key in obs:
        np.testing.assert_array_equal(episode["final_obs"][key], obs[key])
    buffer = save_episodes([episode], tmp_path / "rec.zarr", {})
    key = next(iter(obs))
    np.testing.assert_array_equal(buffer.episode_meta(f"final_obs.{key}")[0], obs[key])



def go_to_goal(obs, generator=None):
    """Chunks `(B, 4, 2)` of PointReach steps straight at the goal (then staying on it)."""
    step = np.clip((GOAL - obs["pos"][:, -1].numpy()) / 0.25, -1, 1)
    return torch.as_tensor(np.repeat(step[:, None], 4, 1), dtype=torch.float32)


def test_episodes_go_on_past_success_with_every_steps_label(mass_model, tmp_path):
    """What follows a success (Can's can dropping into the bin after the episode would have ended)
    is recorded with each step's success, and no imagined episode starts from it."""
    seeds = [1, 2, 3, 4]
    ended = record_episodes(go_to_goal, MASS_POLICY, make_env, seeds, n_envs=2)
    on = record_episodes(go_to_goal, MASS_POLICY, make_env, seeds, n_envs=2, after_success=3)
    for short, long in zip(ended, on):
        first = int(np.argmax(long["step_success"]))
        assert short["success"] and len(short["action"]) == first + 1 and short["step_success"].tolist() == [False] * first + [True]
        assert len(long["action"]) == min(first + 1 + 3, 12)
        after = np.concatenate([long["pos"][1:], long["final_obs"]["pos"][None]])  # each step's result
        assert long["step_success"].tolist() == (np.linalg.norm(after - GOAL, axis=1) < 0.15).tolist()
        np.testing.assert_array_equal(long["pos"][:first + 1], short["pos"])  # the same episode up to the success
    attrs = {"collection": {"kind": "policy_rollouts", "after_success": 3}}
    data = Transitions.load([save_episodes(on, tmp_path / "past.zarr", attrs).path], ["pos"])
    np.testing.assert_array_equal(data.success, np.concatenate([e["step_success"] for e in on]))
    assert data.before_success.tolist() == np.concatenate(
        [np.arange(len(e["action"])) <= np.argmax(e["step_success"]) for e in on]).tolist()
    envs = DreamVecEnv(mass_model[0].model, data, MASS_POLICY, 2, 12, mass_model[0].model.cut_thresholds(2.0))
    np.testing.assert_array_equal(envs.candidates, np.flatnonzero(data.before_success))
    assert "step_success" not in save_episodes(ended, tmp_path / "ended.zarr", {}).keys()

def _store(path, data: dict, noise=0.0, meta=True):
    buffer = ReplayBuffer.create(path, attrs={"collection": {"action_noise": noise}})
    buffer.add_episode(data, {"seed": 0, "success": True} if meta else None)
    return path


def test_stores_give_executed_actions_and_bad_stores_are_named(tmp_path):
    steps = {"pos": np.zeros((4, 2), np.float32), "action": np.zeros((4, 2), np.float32),
             "reward": np.arange(4, dtype=np.float32)}
    noisy = _store(tmp_path / "noisy.zarr", {**steps, "executed_action": np.ones((4, 2), np.float32)}, noise=0.1)
    data = Transitions.load([noisy], ["pos"])
    np.testing.assert_array_equal(data.action, np.ones((4, 2)))  # what the env executed, not the expert's label
    assert data.success.tolist() == [False, False, False, True]
    with pytest.raises(WorldModelError, match="collected with action noise 0.1 but holds only the expert's clean"):
        Transitions.load([_store(tmp_path / "old.zarr", steps, noise=0.1)], ["pos"])
    with pytest.raises(WorldModelError, match=r"data key\(s\) \['reward'\] missing"):
        Transitions.load([_store(tmp_path / "no_reward.zarr", {k: v for k, v in steps.items() if k != "reward"})], ["pos"])
    images = _store(tmp_path / "images.zarr", {**steps, "image": np.zeros((4, 8, 8, 3), np.uint8)})
    with pytest.raises(WorldModelError, match="takes low-dim"):
        Transitions.load([images], ["image"])
    with pytest.raises(WorldModelError, match="at least 2 are needed"):
        train_world_model(Transitions.load([noisy], ["pos"]), MASS_CONFIG, tmp_path / "wm", *BOUNDS)


# ----------------------------------------------------------------------------- the model
@pytest.fixture(scope="module")
def mass_model(tmp_path_factory):
    data = Transitions.from_episodes(mass_episodes(60, 40, seed=0, action_scale=DATA_ACTIONS), ["pos"])
    run = train_world_model(data, MASS_CONFIG, tmp_path_factory.mktemp("mass") / "wm", *BOUNDS, progress=False)
    return run, data


def test_world_model_predicts_a_deterministic_toy_system(mass_model):
    run, _ = mass_model
    model = run.model
    fresh = Transitions.from_episodes(mass_episodes(20, 40, seed=99, action_scale=DATA_ACTIONS), ["pos"])
    index = np.arange(0, fresh.n_steps, 3)
    w = fresh.windows(index, history=2, horizon=8)
    ok = w["obs_mask"]
    with torch.no_grad():
        latent = model.encode(torch.as_tensor(w["obs_history"]))
        for k in range(8):
            pred = model.step(latent, torch.as_tensor(w["action"][:, k]))
            latent = pred.latent
            predicted = model.unnormalize_obs(pred.obs.mean(0)).numpy()
            error = np.sqrt(np.mean((predicted - w["next_obs"][:, k])[ok[:, k]] ** 2))
            standing_still = np.sqrt(np.mean((w["obs_history"][:, -1] - w["next_obs"][:, k])[ok[:, k]] ** 2))
            # The hidden velocity is tracked: far better than assuming the mass stands still.
            assert error < 0.05 * standing_still and error < 1e-3, (k, error, standing_still)
    # The run's held-out report grows with the horizon and is what the checkpoint recorded.
    assert run.report["horizon"] == list(range(1, 17)) and run.report["obs_rmse"][0] < run.report["obs_rmse"][-1]
    loaded = LatentWorldModel.load(resolve_world_model_dir(run.checkpoint.parents[1]))
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name]), name
    assert loaded.metadata["train"]["steps"] == 500 and np.isfinite(loaded.reference_uncertainty.numpy()).all()



def test_rule_recall_counts_the_windows_where_data_and_prediction_meet_the_task_rule(mass_model):
    """The task's success rule on held-out windows (Can's: the can in the bin, the gripper away):
    how often the model predicts the data's successes, counted window by window."""
    model = mass_model[0].model
    fresh = Transitions.from_episodes(mass_episodes(20, 40, seed=98, action_scale=DATA_ACTIONS), ["pos"])

    def right_half(obs):
        success = obs["pos"][:, 0] > 0.3
        return success.astype(np.float64), success

    report = heldout_errors(model, fresh, 8, task_rule=right_half)
    index = np.unique(np.linspace(0, fresh.n_steps - 1, min(2048, fresh.n_steps)).round().astype(np.int64))
    w = fresh.windows(index, history=2, horizon=8)
    in_data = ((w["next_obs"][..., 0] > 0.3) & w["obs_mask"]).any(1)
    assert report["rule_positives"] == int(in_data.sum()) > 50
    # the model tracks the mass to < 1e-3, so it misses only windows that graze the line
    assert report["rule_recall"] > 0.95 and report["rule_precision"] > 0.95
    never = heldout_errors(model, fresh, 8, task_rule=lambda obs: (np.zeros(len(obs["pos"])), obs["pos"][:, 0] > 9))
    assert never["rule_positives"] == 0 and np.isnan(never["rule_recall"])
    assert "rule_recall" not in heldout_errors(model, fresh, 2)


def test_the_best_checkpoint_is_the_one_that_predicts_the_tasks_successes():
    rmse = {"obs_rmse": [0.1, 0.4, 0.9]}
    assert checkpoint_score(rmse, 1) == -0.4 and checkpoint_score({"obs_rmse": [float("nan")]}, 0) is None
    ruled = {**rmse, "rule_positives": 20, "rule_recall": 0.5, "rule_precision": 1.0}
    assert checkpoint_score(ruled, 1) == pytest.approx(2 / 3)
    assert checkpoint_score({**ruled, "rule_recall": 0.0, "rule_precision": float("nan")}, 1) == 0.0
    # no success in the held-out windows: the rule cannot judge, the error does
    assert checkpoint_score({**ruled, "rule_positives": 0, "rule_recall": float("nan")}, 1) == -0.4

def test_training_resumes_bit_exactly(tmp_path):
    data = Transitions.from_episodes(mass_episodes(10, 20, seed=1), ["pos"])
    config = WorldModelConfig(ModelConfig(members=2, latent_dim=4, hidden_dim=16),
                              TrainConfig(steps=20, batch_size=8, horizon=3, eval_every=10, eval_horizon=4))
    straight = train_world_model(data, config, tmp_path / "straight", *BOUNDS, progress=False)
    half = dataclasses.replace(config, train=dataclasses.replace(config.train, steps=10))
    train_world_model(data, half, tmp_path / "resumed", *BOUNDS, progress=False)
    with pytest.raises(WorldModelError, match="already holds a world-model run"):
        train_world_model(data, config, tmp_path / "resumed", *BOUNDS, progress=False)
    other = dataclasses.replace(config, model=dataclasses.replace(config.model, hidden_dim=8))
    with pytest.raises(WorldModelError, match=r"other settings \(\['model.hidden_dim'\]\)"):
        train_world_model(data, other, tmp_path / "resumed", *BOUNDS, resume=True, progress=False)
    resumed = train_world_model(data, config, tmp_path / "resumed", *BOUNDS, resume=True, progress=False)
    for name, tensor in straight.model.state_dict().items():
        assert torch.equal(tensor, resumed.model.state_dict()[name]), name
    assert (tmp_path / "straight" / "curves.csv").read_text() == (tmp_path / "resumed" / "curves.csv").read_text()
    assert (tmp_path / "resumed" / "error_vs_horizon.png").stat().st_size > 0


# ----------------------------------------------------------------------------- rare successes
def rare_success_data(n_episodes=60, steps=40, every=4) -> Transitions:
    """Point-mass episodes, every `every`-th one labelled a success (on its last step)."""
    episodes = mass_episodes(n_episodes, steps, seed=3, action_scale=DATA_ACTIONS)
    return Transitions.from_episodes([{**e, "success": i % every == 0} for i, e in enumerate(episodes)], ["pos"])


def test_success_rates_are_those_of_the_loss_window_steps():
    data = Transitions.from_episodes([{**e, "success": i in (0, 2)} for i, e in enumerate(mass_episodes(4, 5, 0))],
                                     ["pos"])
    horizon, fraction = 3, 0.25
    steps, successes, positive = success_starts(data, horizon)
    every = data.windows(np.arange(data.n_steps), history=2, horizon=horizon)  # brute force: every window
    np.testing.assert_array_equal(steps, every["step_mask"].sum(1))
    np.testing.assert_array_equal(successes, every["success"].sum(1))
    assert positive.tolist() == [2, 3, 4, 12, 13, 14]  # the windows that reach episode 0's and 2's last step
    rate, sampled = success_rates(data, horizon, fraction)
    assert rate == pytest.approx(every["success"].sum() / every["step_mask"].sum(), rel=1e-12)
    mixed = [(1 - fraction) * every[k].mean(0).sum() + fraction * every[k][positive].mean(0).sum()
             for k in ("success", "step_mask")]
    assert sampled == pytest.approx(mixed[0] / mixed[1], rel=1e-12)
    logit = lambda p: np.log(p / (1 - p))  # noqa: E731
    assert success_logit_offset(data, horizon, fraction) == pytest.approx(logit(rate) - logit(sampled), rel=1e-12)
    assert success_logit_offset(data, horizon, 0.0) == 0.0 and success_rates(data, horizon, 0.0) == (rate, rate)


def test_sample_batch_oversamples_success_windows_and_is_unchanged_without():
    data = rare_success_data()
    config = TrainConfig(batch_size=8, horizon=4, success_fraction=0.25)
    positive = success_starts(data, config.horizon)[2]
    batch = sample_batch(data, 3, config, 2, torch.Generator().manual_seed(0), positive)
    assert batch["success"].shape == (3, 8, 4)
    assert batch["success"][:, :2].any(-1).all()  # round(0.25 x 8) = 2 windows of each member hold a success
    uniform = dataclasses.replace(config, success_fraction=0.0)
    plain = sample_batch(data, 3, uniform, 2, torch.Generator().manual_seed(0), positive)
    index = torch.randint(0, data.n_steps, (3 * 8,), generator=torch.Generator().manual_seed(0)).numpy()
    expected = data.windows(index, 2, 4)  # the draw of a run without oversampling stays what it was
    for key, value in expected.items():
        np.testing.assert_array_equal(plain[key].reshape(value.shape).numpy(), value)


def test_oversampled_success_is_calibrated_back_to_the_data_rate(tmp_path):
    data = rare_success_data()
    config = WorldModelConfig(ModelConfig(members=2, latent_dim=4, hidden_dim=32),
                              TrainConfig(steps=300, batch_size=64, horizon=8, lr=3e-3, eval_every=300,
                                          eval_horizon=8, success_fraction=0.5))
    run = train_world_model(data, config, tmp_path / "wm", *BOUNDS, progress=False)
    train, _ = data.split(config.train.val_fraction, config.train.seed)
    rate, sampled = success_rates(train, 8, 0.5)
    assert sampled > 5 * rate  # the batches hold far more successes than the data
    w = data.windows(np.arange(data.n_steps), history=2, horizon=8)
    with torch.no_grad():
        latent = run.model.encode(torch.as_tensor(w["obs_history"]))
        probability = torch.sigmoid(run.model.step(latent, torch.as_tensor(w["action"][:, 0])).success_logit).mean()
    # Which step ends an episode is not in the state: a calibrated classifier says the data's rate.
    assert 0.5 * rate < float(probability) < 2 * rate, (float(probability), rate, sampled)
    loaded = LatentWorldModel.load(resolve_world_model_dir(tmp_path / "wm"))
    assert loaded.success_logit_offset == run.model.success_logit_offset < 0


def test_success_fraction_is_checked(tmp_path):
    with pytest.raises(ValueError, match=r"train.success_fraction.*\[0, 1\)"):
        TrainConfig(success_fraction=1.0)
    no_success = Transitions.from_episodes(mass_episodes(4, 10, 0), ["pos"])
    config = WorldModelConfig(ModelConfig(members=2), TrainConfig(steps=1, success_fraction=0.25))
    with pytest.raises(WorldModelError, match="hold no success to oversample"):
        train_world_model(no_success, config, tmp_path / "wm", *BOUNDS, progress=False)



def test_change_std_is_floored_where_a_feature_is_constant_within_episodes():
    """Can's yaw while the can stands on the table: one value per episode, so its one-step changes
    are ~0 and would weigh its errors by thousands; `min_change_std` floors that weight."""
    rng = np.random.default_rng(0)
    n, ends = 80, np.array([20, 40, 60, 80])
    pos = np.cumsum(rng.normal(size=n)).astype(np.float32)
    yaw = np.repeat(rng.uniform(-1, 1, 4), 20).astype(np.float32) + rng.normal(scale=1e-6, size=n).astype(np.float32)
    data = Transitions(("pos", "yaw"), (1, 1), np.stack([pos, yaw], 1), np.zeros((n, 2), np.float32),
                       np.zeros(n, np.float32), np.zeros(n, bool), ends, np.zeros((4, 2), np.float32), np.zeros(4, bool))
    stds = {}
    for floor in (0.0, 0.01):
        model = LatentWorldModel(ModelConfig(members=2, min_change_std=floor), data.keys, data.dims, 2, *BOUNDS)
        model.fit_normalization(data)
        stds[floor] = model.delta_std.numpy()
    within = np.setdiff1d(np.arange(n - 1), ends - 1)
    normalized = (pos.astype(np.float64) - pos.mean()) / pos.std()
    np.testing.assert_allclose(stds[0.0][0], (normalized[within + 1] - normalized[within]).std(), rtol=1e-5)
    assert stds[0.01][0] == stds[0.0][0] and stds[0.0][1] < 1e-3 and stds[0.01][1] == np.float32(0.01)
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="model.min_change_std"):
            ModelConfig(min_change_std=bad)


# ----------------------------------------------------------------------------- imagination
def imagine(model, data, seeds, chunks, cut_scale=2.0):
    envs = DreamVecEnv(model, data, MASS_POLICY, len(seeds), 40, model.cut_thresholds(cut_scale))
    obs, _ = envs.reset(seed=seeds)
    trace = [obs["pos"]]
    for chunk in chunks:
        obs, reward, terminated, truncated, info = envs.step(chunk)
        trace += [obs["pos"], reward, truncated, info["cut"], info["env_steps"]]
    return trace, envs


def test_imagined_rollouts_are_reproducible_under_a_seed(mass_model):
    run, data = mass_model
    rng = np.random.default_rng(0)
    chunks = [rng.uniform(-DATA_ACTIONS, DATA_ACTIONS, (6, 4, 2)).astype(np.float32) for _ in range(10)]
    first, _ = imagine(run.model, data, list(range(6)), chunks)
    again, _ = imagine(run.model, data, list(range(6)), chunks)
    other, _ = imagine(run.model, data, list(range(6, 12)), chunks)
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert not np.array_equal(first[0], other[0])  # another seed, other start states


def test_uncertainty_cut_triggers_on_out_of_distribution_actions(mass_model):
    run, data = mass_model
    rng = np.random.default_rng(1)
    seen = [rng.uniform(-DATA_ACTIONS, DATA_ACTIONS, (16, 4, 2)).astype(np.float32) for _ in range(8)]
    _, envs = imagine(run.model, data, list(range(16)), seen)
    assert envs.pop_stats()["cut_fraction"] < 0.05  # actions like the data's: trusted
    unseen = [np.ones((16, 4, 2), np.float32)] * 2  # full thrust, 5x the data's largest action
    trace, envs = imagine(run.model, data, list(range(16)), unseen)
    truncated, cut, steps = trace[3], trace[4], trace[5]
    assert envs.pop_stats()["cut_fraction"] > 0.9
    assert cut.all() and truncated.all() and (steps < 2).all()  # the chunk stopped before the untrusted action


def test_task_reward_rule_replaces_the_learned_heads(mass_model):
    run, data = mass_model
    seen = []

    def distance_paid(obs):  # the task's rule: reward -|pos|, never a success
        seen.append(obs["pos"].copy())
        return -np.linalg.norm(obs["pos"], axis=1), np.zeros(len(obs["pos"]), bool)

    rng = np.random.default_rng(2)
    chunk = rng.uniform(-DATA_ACTIONS, DATA_ACTIONS, (6, 4, 2)).astype(np.float32)
    envs = DreamVecEnv(run.model, data, MASS_POLICY, 6, 40, run.model.cut_thresholds(50.0), task_reward=distance_paid)
    envs.reset(seed=list(range(6)))
    obs, reward, terminated, truncated, info = envs.step(chunk)
    members = run.model.config.members
    assert len(seen) == MASS_POLICY.action_horizon and not terminated.any() and not info["cut"].any()
    # the rule saw every member's predicted observation (their mean is the observation returned), and
    # the reward is the lowest member's, summed over the chunk
    assert seen[-1].shape == (members * 6, 2)
    np.testing.assert_allclose(seen[-1].reshape(members, 6, 2).mean(0), obs["pos"][:, -1], atol=1e-5)
    np.testing.assert_array_equal(reward, sum(-np.linalg.norm(pos, axis=1).astype(np.float64).reshape(members, 6)
                                              .max(0) for pos in seen))

    def always_success(obs):
        return np.full(len(obs["pos"]), 0.5), np.ones(len(obs["pos"]), bool)

    envs = DreamVecEnv(run.model, data, MASS_POLICY, 6, 40, run.model.cut_thresholds(50.0), success_reward=1.0,
                       task_reward=always_success)
    envs.reset(seed=list(range(6)))
    _, reward, terminated, truncated, info = envs.step(chunk)
    assert terminated.all() and not truncated.any() and (info["env_steps"] == 1).all()
    assert (reward > 0.5).all()  # the step's 0.5 plus the absorbing-success bonus for the steps left

    def first_member_succeeds(obs):  # members disagree: no success
        success = np.zeros(len(obs["pos"]), bool)
        success[:6] = True
        return np.zeros(len(obs["pos"])), success

    envs = DreamVecEnv(run.model, data, MASS_POLICY, 6, 40, run.model.cut_thresholds(50.0),
                       task_reward=first_member_succeeds)
    envs.reset(seed=list(range(6)))
    assert not envs.step(chunk)[2].any()

    for rule, paid in ((always_success, 1.0), (distance_paid, 0.0)):  # sparse: success alone pays
        envs = DreamVecEnv(run.model, data, MASS_POLICY, 6, 40, run.model.cut_thresholds(50.0), task_reward=rule,
                           sparse_success=True)
        envs.reset(seed=list(range(6)))
        assert (envs.step(chunk)[1] == paid).all()
    with pytest.raises(WorldModelError, match="sparse_success pays success alone"):
        DreamVecEnv(run.model, data, MASS_POLICY, 6, 40, run.model.cut_thresholds(50.0), success_reward=1.0,
                    sparse_success=True)


def test_task_failure_ends_imagined_episodes_where_any_member_predicts_it(mass_model):
    """A failure rule terminates an episode without success at the first action whose predicted
    observation fails for any member; that step is paid, the chunk stops there, and the next
    episode starts in the same step. Without a rule the same chunk runs on."""
    run, data = mass_model
    members, chunk = run.model.config.members, np.zeros((6, 4, 2), np.float32)

    def fails_on(member: int, envs: list[int]):
        def rule(obs):
            failed = np.zeros((members, 6), bool)
            failed[member, envs] = True
            return failed.reshape(-1)
        return rule

    plain = DreamVecEnv(run.model, data, MASS_POLICY, 6, 40, run.model.cut_thresholds(50.0))
    plain.reset(seed=list(range(6)))
    _, plain_reward, terminated, truncated, info = plain.step(chunk)
    assert not terminated.any() and (info["env_steps"] == MASS_POLICY.action_horizon).all()
    envs = DreamVecEnv(run.model, data, MASS_POLICY, 6, 40, run.model.cut_thresholds(50.0),
                       task_failure=fails_on(members - 1, [1, 4]))  # the last member alone sees it
    envs.reset(seed=list(range(6)))
    _, reward, terminated, truncated, info = envs.step(chunk)
    assert terminated.tolist() == [False, True, False, False, True, False] and not truncated.any()
    assert not info["is_success"].any() and info["env_steps"].tolist() == [2, 1, 2, 2, 1, 2]
    assert info["final_obs"][1] is not None and info["final_obs"][0] is None
    np.testing.assert_array_equal(reward[[0, 2, 3, 5]], plain_reward[[0, 2, 3, 5]])  # the others: unchanged


def test_rollout_steps_truncate_imagined_episodes_mid_chunk(mass_model):
    """`rollout_steps` = 3 with chunks of 2 actions: the first chunk runs whole, the second stops after
    its first action with every episode truncated (not terminated), and the next ones start afresh."""
    run, data = mass_model
    chunk = np.zeros((6, 4, 2), np.float32)
    envs = DreamVecEnv(run.model, data, MASS_POLICY, 6, 40, run.model.cut_thresholds(50.0), rollout_steps=3)
    envs.reset(seed=list(range(6)))
    _, _, terminated, truncated, info = envs.step(chunk)
    assert not (terminated | truncated).any() and (info["env_steps"] == 2).all()
    _, _, terminated, truncated, info = envs.step(chunk)
    assert truncated.all() and not terminated.any() and not info["cut"].any() and (info["env_steps"] == 1).all()
    assert (envs.imagined == 0).all()
    with pytest.raises(ValueError, match="dream.rollout_steps"):
        dream.DreamConfig(rollout_steps=-1)


def test_uncertainty_penalty_takes_the_disagreement_of_every_imagined_step_off_the_reward(mass_model, monkeypatch):
    """MOPO's pessimism: with penalty 2 a chunk pays 2 x the summed ensemble disagreement of its steps
    less than without; the run's mean disagreement is reported; a negative penalty is refused."""
    run, data = mass_model
    chunk = np.random.default_rng(3).uniform(-DATA_ACTIONS, DATA_ACTIONS, (6, 4, 2)).astype(np.float32)
    plain = DreamVecEnv(run.model, data, MASS_POLICY, 6, 40, run.model.cut_thresholds(50.0))
    plain.reset(seed=list(range(6)))
    plain_reward = plain.step(chunk)[1]
    seen = []
    measure = LatentWorldModel.disagreement
    monkeypatch.setattr(LatentWorldModel, "disagreement", staticmethod(lambda obs: seen.append(measure(obs)) or seen[-1]))
    envs = DreamVecEnv(run.model, data, MASS_POLICY, 6, 40, run.model.cut_thresholds(50.0), uncertainty_penalty=2.0)
    envs.reset(seed=list(range(6)))
    _, reward, _, _, info = envs.step(chunk)
    assert len(seen) == MASS_POLICY.action_horizon and (info["env_steps"] == MASS_POLICY.action_horizon).all()
    spent = torch.stack(seen).double().sum(0).numpy()
    assert (spent > 0).all()
    np.testing.assert_allclose(reward, plain_reward - 2.0 * spent, rtol=0, atol=1e-6)
    assert envs.pop_stats()["disagreement"] == pytest.approx(float(torch.stack(seen).mean()), rel=1e-6)
    with pytest.raises(ValueError, match="dream.uncertainty_penalty"):
        dream.DreamConfig(uncertainty_penalty=-1.0)


def test_locomotion_failure_rule_is_the_environments_termination():
    """`LocomotionEnv.failure_from_observation` on the observations of random-action episodes says
    terminated exactly where the env did (Hopper, Walker2d), never for HalfCheetah."""
    from diffpolicy.envs.locomotion import LocomotionEnv
    for env_id, ended in (("Hopper-v5", True), ("Walker2d-v5", True), ("HalfCheetah-v5", False)):
        env, rng, terminations = LocomotionEnv(env_id), np.random.default_rng(0), 0
        for seed in range(8):
            obs, _ = env.reset(seed=seed)
            for _ in range(150):
                obs, _, terminated, _, _ = env.step(rng.uniform(-1, 1, env.action_space.shape))
                assert env.failure_from_observation({"state": obs["state"][None]}).tolist() == [terminated], env_id
                terminations += terminated
                if terminated:
                    break
        assert (terminations > 0) == ended, env_id
        env.close()
    with pytest.raises(WorldModelError, match="no rule for its terminations"):
        dream.task_failure_rule(LocomotionEnv("Ant-v5"))


def test_task_reward_needs_a_rule_of_the_environment():
    env = make_env()
    with pytest.raises(WorldModelError, match="defines no reward_from_observation"):
        dream.task_reward_rule(env)
    with pytest.raises(ValueError, match="dream.task_reward"):
        dream.DreamConfig(task_reward=1)


# ----------------------------------------------------------------------------- dreams
@pytest.fixture(scope="module")
def reach_model(tmp_path_factory):
    run, data = train_reach_world_model(tmp_path_factory.mktemp("reach") / "wm")
    return run, data


FLOW = flow_ppo.FlowPPOConfig(lr=1e-3, clip=0.2, std_min=0.05, std_max=0.3,
                              log_prob_per_dim=False, n_envs=8, n_steps=6, batch_size=16,
                              epochs=4, eval_episodes=16, eval_every=0)


def held_out(policy, seeds=range(100000, 100016)):
    episodes, _ = rollout(policy, make_env, list(seeds), n_envs=8)
    return float(np.mean([e.episode_return for e in episodes])), float(np.mean([e.success for e in episodes]))


def dream_run(reach_model, run_dir, config=FLOW, dream_config=dream.DreamConfig(), make=make_env, resume=False):
    run, data = reach_model
    return dream.finetune(make_bc_policy("flow", inference_steps=4), make, config, dream_config,
                          LatentWorldModel.load(run.checkpoint / "model"), data, run_dir, max_episode_steps=12,
                          resume=resume, progress=False)


def test_dream_finetuning_improves_the_real_reward(reach_model, tmp_path):
    bc_return, bc_success = held_out(make_bc_policy("flow", inference_steps=4))
    assert bc_success == 0.0  # the demonstrations are biased: imitation never reaches the goal
    # 3000 imagined steps: the return rose by 3.7-5.6 under training seeds 0-3; at 1500 the rise
    # started in two seeds of four (which two moved with the CPU's rounding).
    result = dream_run(reach_model, tmp_path / "dream", dataclasses.replace(FLOW, env_steps=3000))
    tuned = ChunkPolicy.from_pretrained(result.checkpoint / "policy")
    tuned_return, tuned_success = held_out(tuned)
    assert tuned_return > bc_return + 1.0 and tuned_success > 0.0, (bc_return, tuned_return, tuned_success)
    run = read_run(tmp_path / "dream")
    assert run.algo == "dream_flowppo" and run.rows[-1]["env_steps"] == 0  # not one real step was learned from
    assert run.rows[-1]["dream_steps"] >= 3000 and tuned.metadata["finetune_env_steps"] == 0


def test_real_evaluation_never_feeds_gradients(reach_model, tmp_path):
    short = dataclasses.replace(FLOW, env_steps=150, eval_episodes=4)
    silent = dream_run(reach_model, tmp_path / "silent", short)
    evaluated = dream_run(reach_model, tmp_path / "evaluated", dataclasses.replace(short, eval_every=1))
    assert "eval_success" in evaluated.history[0] and "eval_success" not in silent.history[0]
    for name, tensor in silent.policy.state_dict().items():
        assert torch.equal(tensor, evaluated.policy.state_dict()[name]), name


def test_patience_stops_a_dream_on_its_real_evaluations(reach_model, tmp_path, monkeypatch):
    """The dream's budget counts imagined steps, but the early stop still reads the real evaluations:
    returns 2, 1, 1 with patience 2 end the run after the third iteration of many."""
    scripted = {1: 2.0, 2: 1.0, 3: 1.0}
    monkeypatch.setattr(dream.DreamSession, "evaluate", lambda self, policy: {
        "eval_success": 0.0, "eval_return": scripted[self.iteration], "eval_steps": 12})
    result = dream_run(reach_model, tmp_path / "dream", dataclasses.replace(FLOW, env_steps=100_000, eval_every=1,
                                                                          patience=2))
    assert [row["eval_return"] for row in result.history] == [2.0, 1.0, 1.0]
    assert result.best.name == "step_00000001" and result.history[-1]["eval_env_steps"] == 36


def test_dppo_runs_unchanged_in_the_dream(reach_model, tmp_path):
    run, data = reach_model
    config = dppo.DPPOConfig(lr=3e-4, finetune_steps=3, clip_start=0.05, clip_end=0.2, n_envs=8, n_steps=6,
                             batch_size=16, epochs=2, eval_episodes=4, eval_every=0, env_steps=150)
    result = dream.finetune(make_bc_policy("diffusion"), make_env, config, dream.DreamConfig(), run.model, data,
                            tmp_path / "dppo", max_episode_steps=12, success_reward=1.0, progress=False)
    assert len(result.history) >= 2 and all(row["first_ratio_error"] == 0.0 for row in result.history)
    assert read_run(tmp_path / "dppo").algo == "dream_dppo"
    with pytest.raises(WorldModelError, match="runs DPPO or flow PPO; got a DSRLConfig"):
        dream.finetune(make_bc_policy("diffusion"), make_env, DSRLConfig(), dream.DreamConfig(), run.model, data,
                       tmp_path / "dsrl", max_episode_steps=12)


class CountedReach:
    """make_env counting every real step taken (class-level, across environments)."""

    steps = 0

    def __call__(self):
        env = make_env()
        step = env.step

        def counted(action):
            CountedReach.steps += 1
            return step(action)

        env.step = counted
        return env


def test_mixed_mode_counts_every_real_step_and_resumes_exactly(reach_model, tmp_path, monkeypatch):
    config = dataclasses.replace(FLOW, env_steps=280, eval_episodes=2)  # a few iterations, evaluated at the end
    # A refresh after every dream iteration while under 10 real steps: only the first one happens.
    mixed = dream.DreamConfig(real_steps=10, refresh_every=1, refresh_episodes=3, refresh_envs=2, refresh_updates=6)
    evaluation_steps = []
    evaluate = dream.DreamSession.evaluate

    def counting_evaluate(self, policy):
        before = CountedReach.steps
        row = evaluate(self, policy)
        evaluation_steps.append(CountedReach.steps - before)
        return row

    monkeypatch.setattr(dream.DreamSession, "evaluate", counting_evaluate)
    CountedReach.steps = 0
    straight = dream_run(reach_model, tmp_path / "straight", config, mixed, make=CountedReach())
    learned_from = CountedReach.steps - sum(evaluation_steps)
    rows = read_run(tmp_path / "straight").rows
    assert learned_from >= 10 and rows[-1]["env_steps"] == learned_from  # every real step counted, none twice
    refreshed = [r["world_model_loss"] is not None for r in rows]
    assert len(rows) >= 3 and refreshed[0] and not any(refreshed[1:])  # then the budget was spent

    save = dream.DreamSession.save

    def save_then_die(self, *args, **kwargs):
        path = save(self, *args, **kwargs)
        if self.iteration == 1:
            raise KeyboardInterrupt
        return path

    monkeypatch.setattr(dream.DreamSession, "save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        dream_run(reach_model, tmp_path / "resumed", config, mixed, make=CountedReach())
    monkeypatch.setattr(dream.DreamSession, "save", save)
    resumed = dream_run(reach_model, tmp_path / "resumed", config, mixed, make=CountedReach(), resume=True)
    assert resumed.history == straight.history[1:]
    for name, tensor in straight.policy.state_dict().items():
        assert torch.equal(tensor, resumed.policy.state_dict()[name]), name
    with pytest.raises(WorldModelError, match=r"other settings \(\['refresh_updates'\]\)"):
        dream_run(reach_model, tmp_path / "resumed", config, dataclasses.replace(mixed, refresh_updates=7),
                  resume=True)


# ----------------------------------------------------------------------------- command line
def test_command_line_collects_trains_and_dreams(tmp_path, capsys):
    card = write_card(tmp_path / "point.yaml")
    bc = make_bc_policy("flow", inference_steps=4)
    bc.save_pretrained(tmp_path / "bc", metadata={"task": TASK})
    play = tmp_path / "play.zarr"
    save_episodes([{**e, "seed": i} for i, e in enumerate(reach_play_episodes(40, seed=2))], play, {"task": TASK})
    rollouts = tmp_path / "rollouts.zarr"
    assert main(["worldmodel", "collect", "--task", card, "--checkpoint", str(tmp_path / "bc"), "--episodes", "6",
                 "--out", str(rollouts), "--no-progress"]) == 0
    with ReplayBuffer.open(rollouts) as buffer:
        assert buffer.n_episodes == 6 and sorted(buffer.episode_meta("seed").tolist()) == list(range(6))
    assert main(["worldmodel", "collect", "--task", card, "--checkpoint", str(tmp_path / "bc"), "--episodes", "8",
                 "--out", str(rollouts), "--no-progress"]) == 0  # resumes: two more seeds only
    with ReplayBuffer.open(rollouts) as buffer:
        assert sorted(buffer.episode_meta("seed").tolist()) == list(range(8))
    wm = tmp_path / "wm"
    small = ["model.hidden_dim=32", "model.members=2", "model.history=1", "train.eval_every=20", "train.eval_horizon=4"]
    assert main(["worldmodel", "train", "--task", card, "--data", str(play), str(rollouts), "--out", str(wm),
                 "--no-progress", "train.steps=20", *small]) == 0
    assert main(["worldmodel", "train", "--task", card, "--data", str(play), str(rollouts), "--out", str(wm),
                 "--no-progress", "--resume", "train.steps=40", *small]) == 0
    assert "held-out RMSE" in capsys.readouterr().out
    assert {"curves.csv", "report.json", "error_vs_horizon.png", "checkpoints"} <= {p.name for p in wm.iterdir()}
    assert LatentWorldModel.load(resolve_world_model_dir(wm)).metadata["data"]["steps"] > 0
    dream_args = ["finetune", "--algo", "dream", "--world-model", str(wm), "--checkpoint", str(tmp_path / "bc"),
                  "--task", card, "--env-steps", "60", "--no-progress", "eval_episodes=2", "dream.cut_scale=3"]
    assert main([*dream_args, "--out", str(tmp_path / "dream")]) == 0
    assert read_run(tmp_path / "dream").algo == "dream_flowppo"
    # Bad input: named, exit code 2, nothing run.
    assert main([*dream_args[:3], *dream_args[5:], "--out", str(tmp_path / "x")]) == 2
    assert "--algo dream needs --world-model" in capsys.readouterr().err
    assert main([*dream_args, "--out", str(tmp_path / "y"), "dream.nosuch=1"]) == 2
    assert "unknown config key 'nosuch'" in capsys.readouterr().err
    assert main(["finetune", "--algo", "flowppo", "--world-model", str(wm), *dream_args[5:], "--out", str(tmp_path / "z")]) == 2
    assert "only for --algo dream" in capsys.readouterr().err
    assert main(["worldmodel", "train", "--task", card, "--out", str(tmp_path / "w2")]) == 2
    assert "--data needs at least one replay buffer" in capsys.readouterr().err
    assert main(["worldmodel", "train", "--task", card, "--out", str(tmp_path / "w3"), "--data", str(play),
                 "--threads", "0"]) == 2
    assert "--threads: expected an integer >= 1, got 0" in capsys.readouterr().err
    assert main(["worldmodel", "collect", "--task", "pusht", "--checkpoint", str(tmp_path / "bc"), "--episodes", "1",
                 "--out", str(tmp_path / "r.zarr")]) == 2
    assert "trained on task 'point_reach', not 'pusht'" in capsys.readouterr().err
    collect = ["worldmodel", "collect", "--task", card, "--checkpoint", str(tmp_path / "bc"), "--episodes", "9"]
    assert main([*collect, "--out", str(rollouts), "--after-success", "4"]) == 2
    assert "recorded with --after-success 0, not 4" in capsys.readouterr().err
    assert main([*collect, "--out", str(tmp_path / "past.zarr"), "--after-success", "-1"]) == 2
    assert "--after-success expects steps >= 0, got -1" in capsys.readouterr().err
    with pytest.raises(WorldModelError, match="no world model at"):
        resolve_world_model_dir(tmp_path)
