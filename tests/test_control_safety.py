"""Safety between the queue and the robot: limits under fuzzed targets (hypothesis), the
interpolator, robot profiles and their bad inputs."""

import numpy as np
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from diffpolicy.control.errors import ControlError, ProfileError, ProfileMissingError
from diffpolicy.control.profile import RobotProfile, load_profile
from diffpolicy.control.safety import Interpolator, SafetyFilter, check_chunk, max_safe_step, within_limits

PROFILE = {"name": "arm", "action_dim": 2, "control_hz": 10.0, "robot_hz": 40.0,
           "limits": {"position": {"low": [-1.0, 0.0], "high": [1.0, 5.0]}, "velocity": [4.0, 20.0],
                      "acceleration": [20.0, 300.0]},
           "seam_jump": 0.5, "binary_dims": [], "delta_dims": [], "watchdog": {"max_observation_age_s": 0.2, "max_inference_s": 1.0}}

targets = st.lists(st.tuples(*[st.one_of(st.floats(allow_nan=True, allow_infinity=True),
                                        st.floats(-10, 10), st.sampled_from([-1.0, 1.0, 0.0, 5.0]))] * 2),
                   min_size=1, max_size=60)


@settings(max_examples=300, deadline=None)
@given(targets, st.floats(-3, 8), st.floats(-3, 8))
def test_the_filter_never_emits_an_out_of_limit_command(sequence, x, y):
    profile = RobotProfile.from_dict(PROFILE)
    safety = SafetyFilter(profile)
    safety.reset(np.array([x, y]))
    commands = [safety.position.copy()] + [safety(np.array(t)) for t in sequence]
    assert within_limits(profile, np.array(commands), tolerance=1e-9).all()


def test_braking_step_is_the_largest_that_can_still_stop():
    for distance in (0.0, 0.4, 1.0, 3.0, 10.0, 55.5):
        v = max_safe_step(distance, 1.0)
        braking = sum(max(v - k, 0.0) for k in range(1, 100))
        assert v + braking == pytest.approx(distance)


def test_filter_follows_a_feasible_target_and_holds_on_nan():
    profile = RobotProfile.from_dict(PROFILE)
    safety = SafetyFilter(profile)
    safety.reset(np.array([0.0, 1.0]))
    assert np.allclose(safety(np.array([0.01, 1.1])), [0.01, 1.1])  # within every limit: exact
    held = safety(np.array([np.nan, 3.0]))
    assert safety.flags["nonfinite_target"] == 1 and np.all(np.isfinite(held))
    with pytest.raises(ControlError, match=r"shape \(2,\)"):
        safety(np.zeros(3))
    with pytest.raises(ControlError, match="finite position"):
        safety.reset(np.array([np.inf, 0.0]))


def test_a_hold_stops_delta_dimensions_instead_of_repeating_them():
    profile = RobotProfile.from_dict({**PROFILE, "delta_dims": [0]})  # dim 0 a velocity-like delta
    assert np.array_equal(profile.hold_target(np.array([0.3, 2.0])), [0.0, 2.0])
    safety = SafetyFilter(profile)
    safety.reset(np.array([0.0, 1.0]))
    moving = [safety(np.array([0.35, 1.0])) for _ in range(3)]
    assert moving[-1][0] == pytest.approx(0.35)
    held = [safety(np.array([np.nan, np.nan])) for _ in range(4)] + [safety.hold() for _ in range(4)]
    assert np.array_equal(held[-1], [0.0, 1.0])  # the delta comes back to 0, the absolute dimension stays
    assert within_limits(profile, np.array(moving + held)).all()


def test_interpolator_commands_at_the_robot_rate():
    interpolate = Interpolator(4)
    assert np.allclose(interpolate(np.array([0.0])), [[0.0]] * 4)
    assert np.allclose(interpolate(np.array([1.0]))[:, 0], [0.25, 0.5, 0.75, 1.0])
    with pytest.raises(ControlError):
        Interpolator(0)


def test_check_chunk_names_the_bad_value():
    check_chunk(np.zeros((4, 2)), 2)
    with pytest.raises(ControlError, match=r"non-finite action value nan at index \(2, 1\)"):
        check_chunk(np.array([[0, 0], [0, 0], [0, np.nan]]), 2)
    with pytest.raises(ControlError, match=r"shape \(N, 2\)"):
        check_chunk(np.zeros((4, 3)), 2)


def test_shipped_profiles_load():
    for name in ("pusht", "lift"):
        profile = load_profile(name)
        assert profile.substeps >= 1 and (profile.position_low < profile.position_high).all()
    assert load_profile("lift").binary_dims == (6,) and load_profile("lift").delta_dims == (0, 1, 2, 3, 4, 5)
    assert load_profile("pusht").delta_dims == ()


@pytest.mark.parametrize("edit, message", [
    (lambda p: p["limits"].pop("velocity"), "missing config key 'limits.velocity'"),
    (lambda p: p.pop("watchdog"), "missing config key 'watchdog'"),
    (lambda p: p["limits"]["position"].update(low=[2.0, 0.0]), r"low\[0\] = 2.0 >= high\[0\] = 1.0"),
    (lambda p: p["limits"].update(acceleration=[1.0]), "'limits.acceleration': expected a list of 2 numbers"),
    (lambda p: p["limits"].update(velocity=[1.0, -1.0]), "'limits.velocity': expected a number > 0, got -1.0"),
    (lambda p: p.update(extra=1), "unknown config key 'extra'"),
    (lambda p: p.update(robot_hz=25.0), "integer multiple"),
    (lambda p: p.update(binary_dims=[2]), "binary_dims"),
    (lambda p: p.update(delta_dims=[2]), "'delta_dims': expected a list of distinct action dimensions in"),
    (lambda p: p.update(delta_dims=[0, 0]), "'delta_dims': expected a list of distinct action dimensions in"),
    (lambda p: (p["limits"]["position"].update(low=[-1.0, 1.0]), p.update(delta_dims=[1])),
     r"whose position limits contain 0 .*dimension 1 has \[1.0, 5.0\]"),
    (lambda p: p.update(binary_dims=[0], delta_dims=[0]), "not binary_dims"),
    (lambda p: p.pop("delta_dims"), "missing config key 'delta_dims'"),
])
def test_bad_profiles(tmp_path, edit, message):
    data = yaml.safe_load(yaml.safe_dump(PROFILE))
    edit(data)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ProfileError, match=message) as info:
        load_profile(path)
    assert str(path) in str(info.value)


def test_missing_profile():
    with pytest.raises(ProfileMissingError, match="no file .*nope.yaml.*pusht"):
        load_profile("nope")
