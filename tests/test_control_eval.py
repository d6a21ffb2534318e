"""The controller in closed loop: every mode x process end to end on a tiny PushT policy under a
simulated delay, `diffpolicy eval --controller/--delay` and its bad inputs, and the wall-clock
harness with real threads."""

import dataclasses
import json

import numpy as np
import pytest
from test_eval_rollout import _short_env, untrained_policy

from diffpolicy.cli import main
from diffpolicy.control.errors import ControlError
from diffpolicy.control.execution import ControlSpec
from diffpolicy.control.modes import MODES, make_mode
from diffpolicy.control.profile import load_profile
from diffpolicy.control.safety import within_limits
from diffpolicy.envs.tasks import load_task
from diffpolicy.evaluation.rollout import rollout
from diffpolicy.evaluation.wall_clock import run_wall_clock


def tiny(process):
    policy = untrained_policy("flow" if process == "flow" else "diffusion")
    policy.set_sampling(inference_steps=4, eta={"ddpm": 1.0, "ddim": 0.0}.get(process))
    return policy


@pytest.mark.parametrize("process", ["ddpm", "ddim", "flow"])
@pytest.mark.parametrize("name", MODES)
def test_every_mode_and_process_closes_the_loop(name, process):
    card = load_task("pusht")
    results, _ = rollout(tiny(process), lambda: _short_env(card, 24), [100000, 100001], n_envs=2,
                         control=ControlSpec(make_mode(name), delay=2))
    for result in results:
        run = result.control
        assert result.length == 24 and run.actions == 24 and run.underruns == 0
        assert run.nfe > 0 and np.isfinite(run.jerk)
    if name == "sync":  # blocking: d held ticks per later chunk, so fewer chunks than the async modes
        assert results[0].control.nfe == 4 * 3  # chunks at ticks 0, 8 (+2 held), 18 (+2 held)


def test_delay_zero_sync_is_diffusion_policys_loop():
    card = load_task("pusht")
    policy = tiny("ddim")
    plain, _ = rollout(policy, lambda: _short_env(card, 20), [100000], n_envs=1)
    spec, _ = rollout(policy, lambda: _short_env(card, 20), [100000], n_envs=1, control=ControlSpec())
    assert dataclasses.replace(spec[0], control=None) == plain[0]


class _RecordActions:
    """An env wrapper that keeps every action it is given."""

    def __init__(self, env, sink):
        self.env, self.sink = env, sink

    def __getattr__(self, name):
        return getattr(self.env, name)

    def step(self, action):
        self.sink.append(np.array(action, dtype=np.float64))
        return self.env.step(action)


@pytest.mark.parametrize("name", ["sync", "rtc", "streaming"])
def test_a_profile_puts_the_safety_filter_between_queue_and_env(tmp_path, name):
    profile = load_profile("pusht")
    slow = dataclasses.replace(profile, velocity=np.full(2, 40.0), acceleration=np.full(2, 100.0))
    card = load_task("pusht")
    sent: list[np.ndarray] = []
    results, _ = rollout(tiny("ddpm"), lambda: _RecordActions(_short_env(card, 30), sent), [100000], n_envs=1,
                         control=ControlSpec(make_mode(name), delay=2, profile=slow))
    commands = np.stack(sent)
    assert commands.shape == (30, 2) and within_limits(slow, commands).all()
    assert results[0].control.limited > 0  # an untrained policy's targets jump far beyond 4 px per tick
    free, _ = rollout(tiny("ddpm"), lambda: _short_env(card, 30), [100000], n_envs=1,
                      control=ControlSpec(make_mode(name), delay=2))
    assert free[0].control.limited == 0


def test_a_blocking_hold_repeats_positions_and_stops_deltas():
    """sync at d = 2 holds ticks 8 and 9 (chunks at 0 and 8): a position target is repeated, a delta
    dimension (as robosuite's OSC deltas) is held at 0, never repeated."""
    loose = dataclasses.replace(load_profile("pusht"), velocity=np.full(2, 1e9), acceleration=np.full(2, 1e12),
                                position_low=np.full(2, -1e4), position_high=np.full(2, 1e4))
    card = load_task("pusht")
    for profile, held in ((loose, "repeat"), (dataclasses.replace(loose, delta_dims=(1,)), "delta 1")):
        sent: list[np.ndarray] = []
        rollout(tiny("ddim"), lambda: _RecordActions(_short_env(card, 12), sent), [100000], n_envs=1,
                control=ControlSpec(make_mode("sync"), delay=2, profile=profile))
        expected = sent[7] if held == "repeat" else np.array([sent[7][0], 0.0])
        assert np.array_equal(sent[8], expected) and np.array_equal(sent[9], expected)
        assert not np.array_equal(sent[10], expected)  # the next chunk executes


def test_a_profile_for_another_robot_is_refused():
    lift = load_profile("lift")
    with pytest.raises(ControlError, match="robot profile 'lift' has action_dim 7, the policy 2"):
        rollout(tiny("ddim"), lambda: _short_env(load_task("pusht"), 5), [100000], n_envs=1,
                control=ControlSpec(make_mode("sync"), profile=lift))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "pusht_diffusion"
    policy = untrained_policy("diffusion")
    policy.set_sampling(inference_steps=3)
    policy.save_pretrained(path, metadata={"task": "pusht", "method": "diffusion"})
    return path


def test_eval_command_with_a_controller(tmp_path, checkpoint, capsys):
    code = main(["eval", "--checkpoint", str(checkpoint), "--episodes", "2", "--n-envs", "2", "--controller",
                 "prefix", "--delay", "3", "--out", str(tmp_path / "e"), "--no-progress"])
    out, err = capsys.readouterr()
    assert code == 0, err
    summary = json.loads((tmp_path / "e" / "summary.json").read_text())
    control = summary["control"]
    assert control["nfe_per_action"] == pytest.approx(3 / 8, rel=0.1) and control["underruns"] == 0
    assert "controller prefix at delay 3" in out and "queue underruns" in out
    assert control["limited_commands"] == 0 and "safety filter" not in out
    episodes = json.loads((tmp_path / "e" / "episodes.json").read_text())
    assert episodes[0]["control"]["actions"] == episodes[0]["length"]


def test_eval_command_with_a_robot_profile(tmp_path, checkpoint, capsys):
    code = main(["eval", "--checkpoint", str(checkpoint), "--episodes", "1", "--controller", "rtc", "--delay", "2",
                 "--profile", "pusht", "--out", str(tmp_path / "e"), "--no-progress"])
    out, err = capsys.readouterr()
    assert code == 0, err
    limited = json.loads((tmp_path / "e" / "summary.json").read_text())["control"]["limited_commands"]
    assert f"{limited} commands limited by the safety filter" in out


@pytest.mark.parametrize("argv, message", [
    (["--controller", "fast"], "unknown controller mode 'fast'"),
    (["--controller", "rtc", "--delay", "9"], "delay 9 is larger than the chunk allows"),
    (["--controller", "rtc", "--delay", "-1"], "expected delay >= 0"),
    (["--delay", "2"], "--delay, --exec-horizon and --profile need --controller"),
    (["--profile", "pusht"], "--delay, --exec-horizon and --profile need --controller"),
    (["--controller", "sync", "--profile", "nope"], "robot profile 'nope'"),
    (["--wall-clock"], "--wall-clock needs --controller"),
    (["--controller", "rtc", "--wall-clock", "--profile", "nope"], "robot profile 'nope'"),
    (["--cuda-graphs"], "CUDA graphs need the policy on a CUDA device"),
])
def test_eval_controller_bad_inputs(checkpoint, capsys, argv, message):
    code = main(["eval", "--checkpoint", str(checkpoint), "--episodes", "1", "--no-progress", *argv])
    _, err = capsys.readouterr()
    assert code == 2 and message in err and "Traceback" not in err


def test_wall_clock_harness_runs_threads_in_real_time():
    card = load_task("pusht")
    policy = tiny("ddim")
    results = run_wall_clock(policy, lambda: _short_env(card, 15), [100000], make_mode("rtc"),
                             load_profile("pusht"), rate_hz=40.0)
    run = results[0].control
    assert results[0].length == 15 and run.nfe > 0 and run.delays and min(run.delays) >= 0
