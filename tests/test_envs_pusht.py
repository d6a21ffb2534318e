"""PushT environment (physics facts, observations, rendering, replay) and its scripted expert."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pymunk
import pytest
from gymnasium.utils.env_checker import check_env

from diffpolicy.envs.experts.pusht import PushTExpert
from diffpolicy.envs.pusht import (
    BLOCK_COG_LOCAL,
    GOAL_POSE,
    KEYPOINTS_LOCAL,
    T_AREA,
    PushTEnv,
    coverage_of,
    local_to_world,
    pose_from_keypoints,
)
from diffpolicy.envs.tasks import load_task, make_env, make_expert

# check_env's two notes that do not apply: DP's action box is [0, 512]^2 by definition, and the env
# is built directly rather than through gymnasium.make (no spec).
EXPECTED_CHECK_ENV_NOTES = ("recommend using a symmetric and normalized space", "not having a spec")


def far_from_goal_state(agent=(60.0, 60.0)) -> np.ndarray:
    return np.array([*agent, *GOAL_POSE[:2], GOAL_POSE[2]])


@pytest.mark.parametrize("obs_type", ["state", "image"])
def test_check_env_passes_without_unexpected_warnings(obs_type):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_env(PushTEnv(obs_type=obs_type, render_mode="rgb_array"))
    unexpected = [str(w.message) for w in caught if not any(n in str(w.message) for n in EXPECTED_CHECK_ENV_NOTES)]
    assert unexpected == []


def test_observation_spaces_match_the_task_cards():
    for name in ("pusht", "pusht_image"):
        card = load_task(name)
        env = make_env(card)
        obs, info = env.reset(seed=3)
        assert set(obs) == set(card.observation)
        for key, spec in card.observation.items():
            assert obs[key].shape == tuple(spec["shape"]) and obs[key].dtype == np.dtype(spec["dtype"])
        assert env._max_episode_steps == card.max_episode_steps == 300
        assert info["state"].shape == (5,) and isinstance(info["is_success"], bool)


def test_agent_follows_the_pd_law_exactly_and_converges():
    env = PushTEnv()
    env.reset(seed=0, options={"state": far_from_goal_state(agent=(100.0, 100.0))})
    target = np.array([300.0, 180.0])
    # The PD law integrated at 100 Hz for one control step (semi-implicit Euler, as pymunk does).
    x, v = np.array([100.0, 100.0]), np.zeros(2)
    for _ in range(10):
        v = v + (100.0 * (target - x) + 20.0 * (0.0 - v)) * 0.01
        x = x + v * 0.01
    obs, *_ = env.step(target)
    np.testing.assert_allclose(obs["agent_pos"], x, rtol=0, atol=1e-4)
    for _ in range(20):
        obs, *_ = env.step(target)
    np.testing.assert_allclose(obs["agent_pos"], target, atol=0.05)
    np.testing.assert_allclose(np.asarray(env.unwrapped.agent.velocity), 0.0, atol=0.5)


def test_agent_stays_in_the_observation_box_under_extreme_targets():
    env = PushTEnv()
    env.reset(seed=1)
    rng = np.random.default_rng(0)
    positions = [env.step(rng.choice([0.0, 512.0], size=2))[0]["agent_pos"] for _ in range(200)]
    assert all(p in env.observation_space["agent_pos"] for p in positions)


def test_block_at_goal_has_full_coverage_and_succeeds():
    env = PushTEnv()
    env.reset(seed=0, options={"state": far_from_goal_state()})
    obs, reward, terminated, truncated, info = env.step(np.array([60.0, 60.0]))
    assert info["coverage"] == pytest.approx(1.0, abs=1e-9)
    assert reward == pytest.approx(1.0) and terminated and not truncated and info["is_success"]


@pytest.mark.parametrize("shift", [5.0, 10.0, 25.0])
def test_coverage_of_a_block_slid_along_its_bar_matches_the_closed_form(shift):
    # Sliding the T by d < 30 along its bar keeps (120 - d) x 30 of the bar and (30 - d) x 90 of the stem.
    x, y, angle = GOAL_POSE
    pose = (x + shift * math.cos(angle), y + shift * math.sin(angle), angle)
    expected = ((120 - shift) * 30 + (30 - shift) * 90) / T_AREA
    assert coverage_of(pose) == pytest.approx(expected, rel=1e-9)


def test_small_coverage_gives_proportional_reward_and_no_success():
    env = PushTEnv()
    x, y, angle = GOAL_POSE
    env.reset(seed=0, options={"state": [60.0, 60.0, x + 20 * math.cos(angle), y + 20 * math.sin(angle), angle]})
    _, reward, terminated, _, info = env.step(np.array([60.0, 60.0]))
    expected = (100 * 30 + 10 * 90) / T_AREA
    assert info["coverage"] == pytest.approx(expected, rel=1e-6)
    assert reward == pytest.approx(expected / 0.95, rel=1e-6)
    assert not terminated and not info["is_success"]


def test_keypoints_follow_the_block_pose():
    env = PushTEnv()
    pose = np.array([200.0, 310.0, 1.1])
    obs = env.set_state([450.0, 450.0, *pose])
    keypoints = obs["keypoints"].reshape(9, 2)
    c, s = math.cos(pose[2]), math.sin(pose[2])
    expected = KEYPOINTS_LOCAL @ np.array([[c, -s], [s, c]]).T + pose[:2]
    np.testing.assert_allclose(keypoints, expected, atol=1e-4)
    # pymunk's own body transform agrees, and the last keypoint is the centre of gravity.
    body = env.unwrapped.block
    np.testing.assert_allclose(keypoints[0], np.asarray(body.local_to_world(tuple(KEYPOINTS_LOCAL[0]))), atol=1e-4)
    np.testing.assert_allclose(keypoints[8], np.asarray(body.local_to_world(body.center_of_gravity)), atol=1e-4)
    np.testing.assert_allclose(keypoints[8], local_to_world(BLOCK_COG_LOCAL, pose), atol=1e-4)


def test_pose_from_keypoints_inverts_them_and_fits_noisy_ones():
    rng = np.random.default_rng(0)
    poses = np.column_stack([rng.uniform(0, 512, (200, 2)), rng.uniform(-math.pi, math.pi, 200)])
    keypoints = np.stack([local_to_world(KEYPOINTS_LOCAL, pose) for pose in poses])
    np.testing.assert_allclose(pose_from_keypoints(keypoints.reshape(200, 18)), poses, atol=1e-9)
    noisy = pose_from_keypoints(keypoints + rng.normal(0, 0.5, keypoints.shape))  # (N, 9, 2) too
    assert np.abs(noisy[:, :2] - poses[:, :2]).max() < 1.0 and np.abs(noisy[:, 2] - poses[:, 2]).max() < 0.02


def test_reward_from_observation_is_the_steps_reward_along_an_expert_episode():
    env = PushTEnv()
    expert = PushTExpert(env)
    obs, _ = env.reset(seed=4)
    expert.reset(4)
    observations, rewards, successes = [], [], []
    for _ in range(300):
        obs, reward, terminated, _, info = env.step(expert.act(obs))
        observations.append(obs)
        rewards.append(reward)
        successes.append(info["is_success"])
        if terminated:
            break
    assert successes[-1] and not any(successes[:-1])
    batch = {key: np.stack([o[key] for o in observations]) for key in observations[0]}
    reward, success = PushTEnv.reward_from_observation(batch)
    # float32 keypoints: the fitted pose is within ~1e-4 px, so the coverage within ~1e-5
    np.testing.assert_allclose(reward, rewards, atol=1e-4)
    np.testing.assert_array_equal(success, successes)
    with pytest.raises(ValueError, match="needs state observations with 'keypoints'"):
        PushTEnv.reward_from_observation({"agent_pos": batch["agent_pos"]})


def test_block_has_diffusion_policy_mass_properties():
    env = PushTEnv()
    env.reset(seed=0)
    block = env.unwrapped.block
    assert block.mass == pytest.approx(1.0)
    assert block.moment == pytest.approx(3000.0)
    assert tuple(block.center_of_gravity) == pytest.approx((0.0, 45.0))
    assert sum(s.area for s in block.shapes) == pytest.approx(T_AREA)
    assert env.unwrapped.space.damping == 0.0 and tuple(env.unwrapped.space.gravity) == (0.0, 0.0)
    assert env.unwrapped.agent.body_type == pymunk.Body.KINEMATIC


def test_reset_is_deterministic_under_a_seed_and_draws_the_reference_distribution():
    a, b = PushTEnv(), PushTEnv()
    obs_a, info_a = a.reset(seed=7)
    obs_b, info_b = b.reset(seed=7)
    np.testing.assert_array_equal(info_a["state"], info_b["state"])
    np.testing.assert_array_equal(obs_a["keypoints"], obs_b["keypoints"])
    _, info_c = b.reset(seed=8)
    assert not np.array_equal(info_a["state"], info_c["state"])
    agents = np.array([a.reset(seed=s)[1]["state"][:2] for s in range(100)])
    assert np.all(agents == np.round(agents)) and agents.min() >= 50 and agents.max() < 450
    for seed in range(5):  # same actions from the same seed give the same rollout
        a.reset(seed=seed)
        b.reset(seed=seed)
        for target in ([100.0, 100.0], [400.0, 300.0], [256.0, 256.0]):
            np.testing.assert_array_equal(a.step(np.array(target))[4]["state"], b.step(np.array(target))[4]["state"])


def test_state_replay_reproduces_recorded_observations():
    for obs_type in ("state", "image"):
        env = PushTEnv(obs_type=obs_type)
        expert = PushTExpert(env)
        obs, info = env.reset(seed=11)
        expert.reset(11)
        recorded = []
        for _ in range(40):
            recorded.append((info["state"], obs))
            obs, _, terminated, _, info = env.step(expert.act(obs))
            if terminated:
                break
        replay = PushTEnv(obs_type=obs_type)
        for state, expected in recorded:
            got = replay.set_state(state)
            for key in expected:
                np.testing.assert_array_equal(got[key], expected[key])


def test_rendering_places_the_scene_where_the_world_says():
    env = PushTEnv(obs_type="image", render_mode="rgb_array", render_size=128)
    obs = env.set_state([100.0, 400.0, *GOAL_POSE])
    image = obs["image"]
    assert image.shape == (96, 96, 3) and image.dtype == np.uint8
    col, row = int(100 * 96 / 512), int(400 * 96 / 512)      # the agent disk (row = y, col = x)
    np.testing.assert_allclose(image[row, col], (65, 105, 225), atol=12)
    gx, gy = (local_to_world(BLOCK_COG_LOCAL, GOAL_POSE) * 96 / 512).astype(int)  # block on the goal
    np.testing.assert_allclose(image[gy, gx], (119, 136, 153), atol=12)
    np.testing.assert_array_equal(image[48, 5], (255, 255, 255))  # empty floor
    env.step(np.array([300.0, 100.0]))
    frame = env.render()
    assert frame.shape == (128, 128, 3)
    assert tuple(frame[int(100 * 128 / 512), int(300 * 128 / 512)]) == (255, 0, 0)  # the target cross


def test_bad_arguments_are_rejected_with_clear_errors():
    with pytest.raises(ValueError, match="obs_type"):
        PushTEnv(obs_type="pixels")
    with pytest.raises(ValueError, match="render_mode"):
        PushTEnv(render_mode="human")
    env = PushTEnv()
    env.reset(seed=0)
    with pytest.raises(ValueError, match=r"shape \(2,\)"):
        env.step(np.zeros(3))
    with pytest.raises(ValueError, match="finite"):
        env.step(np.array([np.nan, 1.0]))
    with pytest.raises(ValueError, match="5 finite numbers"):
        env.set_state([1.0, 2.0, 3.0])


def run_expert(env, expert, seed: int, steps: int = 300):
    obs, info = env.reset(seed=seed)
    expert.reset(seed)
    actions = []
    for _ in range(steps):
        actions.append(expert.act(obs))
        obs, _, terminated, truncated, info = env.step(actions[-1])
        if terminated or truncated:
            break
    return np.array(actions), info


def test_expert_succeeds_on_fixed_seeds_with_smooth_targets():
    card = load_task("pusht")
    env = make_env(card)
    expert = make_expert(card, env)
    for seed in range(5):
        actions, info = run_expert(env, expert, seed)
        assert info["is_success"], f"seed {seed}: coverage {info['coverage']:.3f} after {len(actions)} steps"
        assert len(actions) < 300
        steps = np.linalg.norm(np.diff(actions, axis=0), axis=1)
        assert steps.max() <= expert.max_target_step + 1e-3
        assert actions.dtype == np.float32 and np.all((actions >= 0) & (actions <= 512))


def test_expert_is_reproducible_from_its_seed():
    env = PushTEnv()
    expert = PushTExpert(env)
    first, _ = run_expert(env, expert, seed=21, steps=60)
    second, _ = run_expert(env, expert, seed=21, steps=60)
    np.testing.assert_array_equal(first, second)


def test_expert_demonstrations_are_multimodal():
    """From one start, different expert seeds go round the block both ways before the first push."""
    env = PushTEnv()
    expert = PushTExpert(env)
    sweeps, first_edges = [], set()
    for expert_seed in range(20):
        obs, _ = env.reset(seed=0)
        expert.reset(expert_seed)
        start_pose = env.unwrapped.block_pose.copy()
        cog = local_to_world(BLOCK_COG_LOCAL, start_pose)
        angles = []
        while np.array_equal(env.unwrapped.block_pose, start_pose) and len(angles) < 60:
            target = expert.act(obs)
            angles.append(math.atan2(target[1] - cog[1], target[0] - cog[0]))
            obs, *_ = env.step(target)
        unwrapped = np.unwrap(angles)
        sweeps.append(unwrapped[-1] - unwrapped[0])
        first_edges.add(expert.log[0]["edge"])
    sweeps = np.array(sweeps)
    assert (sweeps > 1.0).sum() >= 3 and (sweeps < -1.0).sum() >= 3, sweeps
    assert len(first_edges) >= 2
