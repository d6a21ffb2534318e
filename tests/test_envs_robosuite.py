"""robosuite Lift / Can / Square: env contract, seeding, state replay, env_args, scripted experts.

robosuite envs take a second or more to build, so each is built once per module (fixtures).
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

from diffpolicy.envs.experts.robosuite_can import CanExpert
from diffpolicy.envs.experts.robosuite_lift import LiftExpert
from diffpolicy.envs.experts.robosuite_square import SquareExpert
from diffpolicy.envs.robosuite_env_args import (
    EnvArgsError,
    composite_controller_config,
    env_args_for,
    make_env_from_env_args,
)
from diffpolicy.envs.robosuite_tasks import LOW_DIM_KEYS, RobosuiteEnv
from diffpolicy.envs.tasks import load_task, make_env, make_expert
from diffpolicy.errors import InvalidValueError

OBJECT_DIMS = {"lift": 10, "can": 14, "square": 14}

# A robomimic (robosuite 1.2 - 1.4 era) Lift low-dim dataset's env_args, as stored in its HDF5.
OLD_LIFT_ENV_ARGS = {
    "env_name": "Lift",
    "type": 1,
    "env_version": "1.4.1",
    "env_kwargs": {
        "has_renderer": False,
        "has_offscreen_renderer": False,
        "ignore_done": True,
        "use_object_obs": True,
        "use_camera_obs": False,
        "control_freq": 20,
        "controller_configs": {
            "type": "OSC_POSE",
            "input_max": 1,
            "input_min": -1,
            "output_max": [0.05, 0.05, 0.05, 0.5, 0.5, 0.5],
            "output_min": [-0.05, -0.05, -0.05, -0.5, -0.5, -0.5],
            "kp": 150,
            "damping": 1,
            "impedance_mode": "fixed",
            "kp_limits": [0, 300],
            "damping_limits": [0, 10],
            "position_limits": None,
            "orientation_limits": None,
            "uncouple_pos_ori": True,
            "control_delta": True,
            "interpolation": None,
            "ramp_ratio": 0.2,
        },
        "robots": ["Panda"],
        "camera_depths": False,
        "camera_heights": 84,
        "camera_widths": 84,
        "reward_shaping": False,
    },
}


@pytest.fixture(scope="module")
def cards():
    return {name: load_task(name) for name in OBJECT_DIMS}


@pytest.fixture(scope="module")
def envs(cards):
    built = {name: make_env(card) for name, card in cards.items()}
    yield built
    for env in built.values():
        env.close()


@pytest.fixture(scope="module")
def lift_image_env():
    env = RobosuiteEnv("Lift", obs_type="image", image_size=(48, 64), render_mode="rgb_array", render_size=(40, 56))
    yield env
    env.close()


def rollout(env, expert, seed: int, max_steps: int = 400):
    """Expert episode on `env`: observations, flat states (one per observation), final info, rewards."""
    obs, info = env.reset(seed=seed)
    expert.reset(seed)
    observations, states, rewards = [obs], [env.unwrapped.get_state()], []
    for _ in range(max_steps):
        obs, reward, terminated, truncated, info = env.step(expert.act(obs))
        observations.append(obs)
        states.append(env.unwrapped.get_state())
        rewards.append(reward)
        if terminated or truncated:
            break
    return observations, states, info, rewards


def without_content_type(xml: str) -> str:
    return re.sub(r' content_type="[^"]*"', "", xml)


# ---------------------------------------------------------------- env contract
@pytest.mark.parametrize("name", list(OBJECT_DIMS))
def test_cards_match_env_spaces(cards, envs, name):
    card, env = cards[name], envs[name]
    spaces = env.observation_space.spaces
    assert set(spaces) == set(LOW_DIM_KEYS) == set(card.observation)
    for key, spec in card.observation.items():
        assert spaces[key].shape == tuple(spec["shape"]) and spaces[key].dtype == np.dtype(spec["dtype"])
    assert spaces["object"].shape == (OBJECT_DIMS[name],)
    assert env.action_space.shape == (card.action_dim,) == (7,)
    assert np.all(env.action_space.low == -1) and np.all(env.action_space.high == 1)
    assert env.unwrapped.dt == pytest.approx(1 / card.control_hz)
    assert env._max_episode_steps == card.max_episode_steps == 400


def test_check_env_low_dim(envs):
    check_env(envs["lift"].unwrapped, skip_render_check=True)


def test_check_env_image(lift_image_env):
    check_env(lift_image_env, skip_render_check=True)


def test_image_observations_and_render(lift_image_env):
    obs, _ = lift_image_env.reset(seed=0)
    for key in ("agentview_image", "robot0_eye_in_hand_image"):
        image = obs[key]
        assert image.shape == (48, 64, 3) and image.dtype == np.uint8
        assert image.std() > 5, f"{key} looks blank"
    assert set(LOW_DIM_KEYS) <= set(obs)
    # robosuite renders bottom-up (OpenGL); the wrapper stores images top-down, as robomimic does.
    raw = lift_image_env.robosuite_env.sim.render(width=64, height=48, camera_name="agentview")
    np.testing.assert_array_equal(obs["agentview_image"], raw[::-1])
    frame = lift_image_env.render()
    assert frame.shape == (40, 56, 3) and frame.dtype == np.uint8
    moved, *_ = lift_image_env.step(np.array([0, 0, 0, 0, 0, 0, 1.0]))
    assert not np.array_equal(moved["robot0_eye_in_hand_image"], obs["robot0_eye_in_hand_image"])


def test_step_rejects_bad_actions(envs):
    env = envs["lift"].unwrapped
    env.reset(seed=0)
    with pytest.raises(ValueError, match=r"shape \(7,\).*\(6,\)"):
        env.step(np.zeros(6))
    with pytest.raises(ValueError, match="non-finite"):
        env.step(np.array([np.nan, 0, 0, 0, 0, 0, 0]))


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="env_name must be one of"):
        RobosuiteEnv("Stack")
    with pytest.raises(ValueError, match="obs_type must be one of"):
        RobosuiteEnv("Lift", obs_type="depth")
    with pytest.raises(ValueError, match="set by the wrapper"):
        RobosuiteEnv("Lift", use_camera_obs=True)


# ---------------------------------------------------------------- seeding
@pytest.mark.parametrize("name", ["lift", "square"])
def test_seeded_reset_is_reproducible(envs, name):
    env = envs[name]
    first, _ = env.reset(seed=7)
    state = env.unwrapped.get_state()
    unseeded_next, _ = env.reset()
    other, _ = env.reset(seed=8)
    assert not np.allclose(other["object"], first["object"])
    again, _ = env.reset(seed=7)
    for key in first:
        np.testing.assert_array_equal(again[key], first[key])
    np.testing.assert_array_equal(env.unwrapped.get_state(), state)
    # an unseeded reset continues the seeded stream: the same after the same seed
    np.testing.assert_array_equal(env.reset()[0]["object"], unseeded_next["object"])
    assert not np.allclose(unseeded_next["object"], first["object"])


# ---------------------------------------------------------------- state replay
def test_replaying_states_reproduces_observations(envs):
    env = envs["can"]
    observations, states, *_ = rollout(env, CanExpert(env), seed=3, max_steps=60)
    xml = env.unwrapped.model_xml()
    rebuilt = make_env_from_env_args(env_args_for(env))
    try:
        # MuJoCo saves only the last loaded model: the env must keep its own XML.
        assert env.unwrapped.model_xml() == xml and 'name="Can_can_mesh"' in xml
        # The build is seeded, so it is the same model; MuJoCo writes mesh `content_type` attributes
        # only for the first load of a mesh file in a process, so compare without them.
        assert without_content_type(rebuilt.model_xml()) == without_content_type(xml)
        rebuilt.reset(seed=99)  # somewhere else entirely
        for t, (state, recorded) in enumerate(zip(states, observations)):
            replayed = rebuilt.set_state(state)
            for key in recorded:
                np.testing.assert_allclose(replayed[key], recorded[key], rtol=0, atol=1e-6,
                                           err_msg=f"step {t} key {key}")
    finally:
        rebuilt.close()
    assert np.ptp(np.stack([o["object"][:3] for o in observations]), axis=0).max() > 0.02, "the can never moved"


def test_set_state_rejects_wrong_shape(envs):
    env = envs["lift"].unwrapped
    with pytest.raises(ValueError, match=rf"\({env.state_dim},\).*\(5,\)"):
        env.set_state(np.zeros(5))


# ---------------------------------------------------------------- env_args
def test_env_args_of_card_and_env_agree_and_are_json(cards, envs):
    for name in OBJECT_DIMS:
        from_card, from_env = env_args_for(cards[name]), env_args_for(envs[name])
        assert from_card == from_env
        assert json.loads(json.dumps(from_env)) == from_env
        assert from_env["type"] == 1 and from_env["env_name"] == envs[name].unwrapped.env_name
        assert from_env["env_kwargs"]["controller_configs"]["body_parts"]["right"]["type"] == "OSC_POSE"


def test_old_osc_pose_controller_config_is_converted():
    old = OLD_LIFT_ENV_ARGS["env_kwargs"]["controller_configs"]
    new = composite_controller_config(old)
    arm = new["body_parts"]["right"]
    assert new["type"] == "BASIC" and arm["type"] == "OSC_POSE" and arm["gripper"] == {"type": "GRIP"}
    assert arm["damping_ratio"] == 1 and arm["damping_ratio_limits"] == [0, 10] and arm["input_type"] == "delta"
    assert "damping" not in arm and "control_delta" not in arm
    assert old["type"] == "OSC_POSE" and "body_parts" not in old  # input untouched
    absolute = composite_controller_config({**old, "control_delta": False})
    assert absolute["body_parts"]["right"]["input_type"] == "absolute"


def test_old_env_args_rebuild_an_env_that_moves_like_ours(envs):
    ours = envs["lift"].unwrapped
    old = make_env_from_env_args(OLD_LIFT_ENV_ARGS)
    try:
        controller = old.robosuite_env.robots[0].part_controllers["right"]
        assert type(controller).__name__ == "OperationalSpaceController" and controller.input_type == "delta"
        np.testing.assert_allclose(controller.kp, 150)
        assert old.obs_type == "low_dim" and set(old.observation_space.spaces) == set(LOW_DIM_KEYS)
        actions = np.random.default_rng(0).uniform(-1, 1, size=(10, 7))
        for env in (ours, old):
            env.reset(seed=5)
        for action in actions:
            a, *_ = ours.step(action)
            b, *_ = old.step(action)
        for key in a:
            np.testing.assert_allclose(a[key], b[key], atol=1e-6, err_msg=key)
    finally:
        old.close()


@pytest.mark.parametrize(
    "change, message",
    [
        ({"type": 2}, r"env_args\['type'\]: expected 1"),
        ({"env_name": "Stack"}, r"env_args\['env_name'\]: expected one of"),
        ({"env_kwargs": "Lift"}, r"env_args\['env_kwargs'\]: expected a dict"),
        ({"robots": ["Sawyer"]}, r"\['robots'\]: expected \['Panda'\]"),
        ({"controller_configs": {"type": "MAGIC"}}, r"unknown controller type 'MAGIC'"),
        ({"controller_configs": [1, 2]}, r"controller_configs'\]: expected a dict"),
        ({"camera_depths": True}, "depth images are not supported"),
    ],
)
def test_bad_env_args_are_rejected(change, message):
    args = json.loads(json.dumps(OLD_LIFT_ENV_ARGS))
    kwargs_keys = {"robots", "controller_configs", "camera_depths"}
    for key, value in change.items():
        (args["env_kwargs"] if key in kwargs_keys else args)[key] = value
    with pytest.raises(EnvArgsError, match=message):
        make_env_from_env_args(args)


def test_env_args_missing_keys_and_wrong_type():
    with pytest.raises(EnvArgsError, match=r"missing key\(s\) \['env_kwargs'\]"):
        make_env_from_env_args({"env_name": "Lift", "type": 1})
    with pytest.raises(EnvArgsError, match="expected a dict, got str"):
        make_env_from_env_args("Lift")


# ---------------------------------------------------------------- experts
@pytest.mark.parametrize("name, seeds", [("lift", [0, 11]), ("can", [0, 11]), ("square", [0, 11])])
def test_expert_succeeds(cards, envs, name, seeds):
    env = envs[name]
    expert = make_expert(cards[name], env)
    for seed in seeds:
        observations, _, info, rewards = rollout(env, expert, seed)
        assert info["is_success"], f"{name} expert failed on seed {seed} at stage {expert.stage!r}"
        assert len(observations) - 1 < 400
        # sparse reward: 1 exactly at success (the episode ends there), 0 before
        assert rewards[-1] == 1.0 and not any(rewards[:-1])


def test_expert_actions_are_bounded_and_seeded(envs):
    env = envs["lift"]
    expert = LiftExpert(env)

    def actions(seed):
        obs, _ = env.reset(seed=1)
        expert.reset(seed)
        out = []
        for _ in range(15):
            out.append(expert.act(obs))
            obs, *_ = env.step(out[-1])
        return np.stack(out)

    first, repeat, other = actions(0), actions(0), actions(1)
    np.testing.assert_array_equal(first, repeat)
    assert not np.allclose(first, other)
    assert first.dtype == np.float32 and np.all(np.abs(first) <= 1)


@pytest.mark.parametrize("name, expert_cls, decision, modes",
                         [("lift", LiftExpert, "grasp_face", 2), ("square", SquareExpert, "final_nut_yaw", 2)])
def test_expert_demonstrations_are_multimodal(envs, name, expert_cls, decision, modes):
    """One initial state, several expert seeds: the plans pick different modes."""
    env = envs[name]
    expert = expert_cls(env)
    seen = set()
    for seed in range(12):
        obs, _ = env.reset(seed=2)
        expert.reset(seed)
        expert.act(obs)
        seen.add(round(expert.decisions[decision], 3))
    assert len(seen) >= modes


def test_expert_refuses_other_tasks(envs):
    with pytest.raises(ValueError, match="runs 'PickPlaceCan', expected 'Lift'"):
        LiftExpert(envs["can"])
    with pytest.raises(TypeError, match="expected a RobosuiteEnv"):
        SquareExpert(object())


# ---------------------------------------------------------------- success from observations
@pytest.mark.parametrize("name", ["lift", "can", "square"])
def test_success_rule_on_observations_is_robosuites_check(cards, name):
    """`reward_from_observation` (what a dream pays for predicted observations, found as the dream
    finds it) equals robosuite's reward and `_check_success` at every step of an expert episode that
    goes on after success (the gripper lets go and moves away: Can and Square change their verdict)."""
    from diffpolicy.worldmodel.dream import task_reward_rule

    env = make_env(cards[name], terminate_on_success=False)
    rule = task_reward_rule(env)
    expert = make_expert(cards[name], env)
    obs, _ = env.reset(seed=0)
    expert.reset(0)
    verdicts = []
    for _ in range(260):
        obs, reward, _, _, info = env.step(expert.act(obs))
        rule_reward, rule_success = rule({key: value[None] for key, value in obs.items()})
        assert rule_success.dtype == bool and rule_success.shape == (1,)
        assert (bool(rule_success[0]), float(rule_reward[0])) == (info["is_success"], reward)
        verdicts.append(info["is_success"])
    env.close()
    assert 10 <= sum(verdicts) <= len(verdicts) - 10  # both verdicts were checked


def test_success_rule_needs_the_gripper_away_and_low_dim_keys(envs):
    env = envs["can"].unwrapped
    rule = env._success_rule
    inside = np.array([(low + high) / 2 for low, high in zip(rule.low, rule.high)], dtype=np.float32)
    obj = np.zeros((2, 14), dtype=np.float32)
    obj[:, rule.start:rule.start + 3] = inside
    eef = np.stack([inside, inside + np.float32([0, 0, 0.1])])  # holding the can, then 10 cm above it
    reward, success = env.reward_from_observation({"object": obj, "robot0_eef_pos": eef})
    assert success.tolist() == [False, True] and reward.tolist() == [0.0, 1.0]
    with pytest.raises(InvalidValueError, match="needs the low-dim key 'robot0_eef_pos'"):
        env.reward_from_observation({"object": obj})


def test_relative_orientations_are_the_sign_ambiguous_quaternions(cards, envs):
    """The quaternions a world model reads as rotation matrices: robosuite's relative orientations,
    which are `mat2quat`'s (w >= 0), so the model's w >= 0 read-back is the observation itself."""
    import torch

    from diffpolicy.commands.worldmodel import task_quaternions
    from diffpolicy.worldmodel.rotations import matrix_to_quaternion, quaternion_to_matrix

    assert envs["lift"].unwrapped.canonical_quaternions() == {}
    assert envs["can"].unwrapped.canonical_quaternions() == {"object": [3]}
    assert envs["square"].unwrapped.canonical_quaternions() == {"object": [3]}
    observations, *_ = rollout(envs["can"], make_expert(cards["can"], envs["can"]), 0)
    q = torch.tensor(np.stack([o["object"][3:7] for o in observations]), dtype=torch.float64)
    assert (q[:, 3] >= 0).all()
    torch.testing.assert_close(matrix_to_quaternion(quaternion_to_matrix(q)), q / q.norm(dim=-1, keepdim=True),
                               rtol=0, atol=1e-6)
    keys = tuple(cards["can"].observation)
    dims = tuple(int(np.prod(cards["can"].observation[key]["shape"])) for key in keys)
    assert keys.index("object") == 3 and task_quaternions(envs["can"], keys, dims) == (sum(dims[:3]) + 3,)
    assert task_quaternions(envs["lift"], keys[:3], dims[:3]) == ()
