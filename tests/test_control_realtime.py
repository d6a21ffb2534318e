"""The real-time loops with a fake clock: 100k ticks of random inference durations without a lost
or duplicated action index, the delay estimate after a slow warm-up call, the watchdog (stalled
worker, stale observations), bad chunks held and flagged, the worker thread, and the
deterministic delay protocol of `control.execution`."""

import threading
import time

import numpy as np
import pytest
import torch

from diffpolicy.control.chunking import ChunkLayout
from diffpolicy.control.delay import DelayEstimator
from diffpolicy.control.errors import ControlError
from diffpolicy.control.execution import ControlSpec, EpisodeExecution
from diffpolicy.control.modes import Generated, make_mode
from diffpolicy.control.profile import RobotProfile
from diffpolicy.control.realtime import RealTimeController
from diffpolicy.policies import PolicyConfig

TP, TA, DA = 16, 8, 2
LOOSE = {"name": "sim", "action_dim": DA, "control_hz": 10.0, "robot_hz": 10.0,
         "limits": {"position": {"low": [-1e9] * DA, "high": [1e9] * DA}, "velocity": [1e12] * DA,
                    "acceleration": [1e15] * DA},
         "seam_jump": 1e9, "binary_dims": [], "delta_dims": [], "watchdog": {"max_observation_age_s": 1e9, "max_inference_s": 1e9}}


class StubPolicy:
    """Only the config: the controller's `infer` hook replaces the network."""

    config = PolicyConfig(obs_shapes={"state": (3,)}, action_dim=DA, obs_horizon=2, pred_horizon=TP,
                          action_horizon=TA, backbone={"type": "mlp"})


def labelled(request):
    """Chunk whose action k of chunk c is (c, k): every executed action names its origin."""
    k = torch.arange(TP, dtype=torch.float64)
    return Generated(torch.stack([torch.full_like(k, request.chunk_id), k], -1)[None], None, None, 1)


OBS = {"state": np.zeros(3)}


def controller(mode="rtc", profile=None, infer=labelled, **kwargs):
    c = RealTimeController(StubPolicy(), make_mode(mode), RobotProfile.from_dict(profile or LOOSE), infer=infer,
                           **kwargs)
    c.reset(OBS, np.zeros(DA), now=0.0)
    return c


@pytest.mark.parametrize("mode, ticks", [("rtc", 100_000), ("sync", 20_000)])
def test_no_lost_or_duplicated_action_over_100k_ticks(mode, ticks):
    """A fake clock: an inference requested at tick k completes before tick k + D, D random in 0..6."""
    rng = np.random.default_rng(0)
    c = controller(mode)
    commits = []  # (chunk id, obs tick, first tick it may execute)
    executed, done_at = [], None
    c.run_pending()
    commits.append((0, 0, 0))
    for tick in range(ticks):
        if done_at is not None and tick >= done_at:
            request = c.pending
            assert c.run_pending() == []
            commits.append((request.chunk_id, request.obs_tick, tick))
            done_at = None
        out = c.tick(float(tick))
        assert out.tick == tick
        executed.append(out.source)
        c.observe(OBS, float(tick))
        if c.pending is not None and done_at is None:
            done_at = tick + int(rng.integers(0, 7))
    start = 1
    latest = {}  # for every tick, the newest chunk committed before it that covers it
    for chunk, obs_tick, first in commits:
        if mode == "sync":  # a blocking chunk executes its Ta actions from the tick it arrived
            covered = range(first, first + TA)
            index = {t: start + t - first for t in covered}
        else:
            covered = range(max(first, obs_tick), obs_tick + TP - start)
            index = {t: start + t - obs_tick for t in covered}
        for t in covered:
            latest[t] = (chunk, index[t])
    popped = [(e.chunk_id, e.index) if e is not None else None for e in executed]
    assert popped == [latest.get(t) for t in range(ticks)]
    seen = [p for p in popped if p is not None]
    assert len(seen) == len(set(seen)) and len(commits) > ticks // 20  # no (chunk, index) twice
    if mode == "rtc":
        assert sum(p is None for p in popped) == c.flags["underrun"]


def test_delay_estimate_recovers_from_a_slow_warmup_within_three_chunks():
    c = controller("rtc")
    durations = iter([30] + [3] * 50)  # the first (warm-up) call is 10x slower
    estimates, done_at = [], None
    for tick in range(200):
        if done_at is not None and tick >= done_at:
            c.run_pending()
            estimates.append(c.scheduler.estimator.estimate)
            done_at = None
        c.tick(float(tick))
        c.observe(OBS, float(tick))
        if c.pending is not None and done_at is None:
            done_at = tick + next(durations)
    assert c.scheduler.stats.delays[0] == 30 and c.scheduler.stats.delays[1:6] == [3] * 5
    assert estimates[3] == 3 and all(e == 3 for e in estimates[3:])


def test_delay_estimator_is_a_windowed_quantile_not_a_running_max():
    estimator = DelayEstimator(window=4, quantile=0.75, warmup=0)
    assert estimator.estimate == 0  # nothing consumed yet
    for consumed in (20, 2, 2, 2):
        estimator.record(consumed)
    assert estimator.estimate == 2  # the 0.75-quantile of (2, 2, 2, 20)
    estimator.record(2)
    assert estimator.estimate == 2 and 20 not in estimator.samples
    estimator.record(0)
    with pytest.raises(ControlError, match="consumed must be an int >= 0"):
        estimator.record(-1)
    with pytest.raises(ControlError, match="window"):
        DelayEstimator(window=0)


def test_watchdog_holds_on_a_stalled_worker_and_on_stale_observations():
    profile = {**LOOSE, "watchdog": {"max_observation_age_s": 0.5, "max_inference_s": 0.45}}
    c = controller("rtc", profile)
    c.run_pending()
    now = 0.0
    for tick in range(40):  # the worker never finishes the second inference
        now = 0.1 * tick
        out = c.tick(now)
        c.observe(OBS, now)
        if "stalled_inference" in out.flags:
            break
    assert "stalled_inference" in out.flags and out.source is None
    assert np.array_equal(out.command, c.safety.position)
    stalled_at = out.tick
    # the worker comes back; observations stop coming: stale after 0.5 s, held and flagged
    c.run_pending()
    out = c.tick(now + 0.1)
    assert out.flags == [] and out.source is not None
    out = c.tick(now + 0.7)
    assert "stale_observation" in out.flags and out.source is None and stalled_at < out.tick


def test_a_stalled_worker_stops_delta_dimensions():
    """Dimension 1 (the action's index k in its chunk, > 0 while moving) is a delta: the hold commands
    0 there and repeats dimension 0 (the chunk id, a position)."""
    profile = {**LOOSE, "delta_dims": [1], "watchdog": {"max_observation_age_s": 1e9, "max_inference_s": 0.45}}
    c = controller("rtc", profile)
    c.run_pending()
    commands = []
    for tick in range(40):  # the worker never finishes the second inference
        out = c.tick(0.1 * tick)
        c.observe(OBS, 0.1 * tick)
        commands.append(out.command)
        if "stalled_inference" in out.flags:
            break
    assert "stalled_inference" in out.flags and out.source is None
    assert commands[-2][1] > 0 and np.array_equal(out.command, [commands[-2][0], 0.0])


def test_bad_chunks_are_held_and_flagged_never_executed():
    calls = {"n": 0}

    def nan_then_jump(request):
        calls["n"] += 1
        out = labelled(request)
        if calls["n"] == 2:
            out.actions[0, 5, 0] = float("nan")
        if calls["n"] == 3:
            out.actions += 1e6
        return out

    c = controller("rtc", {**LOOSE, "seam_jump": 100.0}, infer=nan_then_jump)
    c.run_pending()
    flags, commands = [], []
    for tick in range(30):
        out = c.tick(float(tick))
        commands.append(out.command)
        c.observe(OBS, float(tick))
        if c.pending is not None:
            flags += c.run_pending()
    assert flags[:2] == ["rejected_chunk", "seam_jump"]
    assert np.isfinite(commands).all() and np.abs(commands).max() < 100


def test_observations_of_the_wrong_shape_are_refused():
    c = controller("rtc")
    with pytest.raises(ControlError, match=r"observation 'state': expected shape \(3,\), got \(4,\)"):
        c.observe({"state": np.zeros(4)}, 0.1)
    with pytest.raises(ControlError, match="missing key 'state'"):
        c.observe({}, 0.1)
    with pytest.raises(ControlError, match="non-finite"):
        c.observe({"state": np.array([0.0, np.nan, 0.0])}, 0.1)


def test_worker_thread_and_control_tick_run_together():
    gate = threading.Event()

    def slow(request):
        if request.chunk_id == 1:
            gate.wait(5)
        return labelled(request)

    c = controller("rtc", infer=slow)
    c.start()
    try:
        assert c.wait_first_chunk(5)
        outs = []
        for tick in range(20):
            started = time.perf_counter()
            outs.append(c.tick(time.monotonic()))
            assert time.perf_counter() - started < 0.5  # never waits for the stalled worker (gate: 5 s)
            c.observe(OBS, time.monotonic())
            time.sleep(0.002)
        gate.set()
        deadline = time.monotonic() + 5
        while c.scheduler.stats.inferences < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert c.scheduler.stats.inferences >= 2
    finally:
        gate.set()
        c.stop()
    assert [o.tick for o in outs] == list(range(20))


def test_deterministic_protocol_executes_prev_then_new():
    """Async at d = 2, s = 4: inference at tau executes prev for ticks tau, tau + 1, then new[start + 2 ...]."""
    layout = ChunkLayout(2, TP, TA)
    execution = EpisodeExecution(layout, ControlSpec(make_mode("prefix"), delay=2, horizon=4))
    executed, chunk = [], 0
    for tick in range(14):
        if execution.needs_inference:
            k = torch.arange(TP, dtype=torch.float64)
            actions = torch.stack([torch.full_like(k, chunk), k], -1)
            execution.commit(Generated(actions, actions, torch.zeros(TP), 3))
            chunk += 1
        executed.append(tuple(execution.pop(np.zeros(2))))
    assert executed[:8] == [(0, 1), (0, 2), (0, 3), (0, 4), (0, 5), (0, 6), (1, 3), (1, 4)]
    assert executed[8:12] == [(1, 5), (1, 6), (2, 3), (2, 4)]
    stats = execution.finish()
    assert stats.nfe == 3 * chunk and stats.underruns == 0 and stats.seam_jump > 0
    sync = EpisodeExecution(layout, ControlSpec(make_mode("sync"), delay=2, horizon=4))
    held, last = [], np.array([-1.0, -1.0])
    for tick in range(10):
        if sync.needs_inference:
            k = torch.arange(TP, dtype=torch.float64)
            sync.commit(Generated(torch.stack([torch.full_like(k, tick), k], -1), None, None, 3))
        last = sync.pop(last)
        held.append(tuple(last))
    # first chunk free; later chunks: two held ticks (the last action), then To - 1 ... To - 1 + s - 1
    assert held == [(0, 1), (0, 2), (0, 3), (0, 4), (0, 4), (0, 4), (4, 1), (4, 2), (4, 3), (4, 4)]
    assert sync.finish().underruns == 0


@pytest.mark.parametrize("mode", ["sync", "ensemble", "rtc", "prefix", "streaming", "warmstart"])
def test_every_mode_runs_in_the_real_time_controller(mode):
    """A real (tiny, untrained) policy behind the controller, one-tick inferences on a fake clock:
    no failed inference, no rejected chunk, one underrun at most (before the first delay is known)."""
    from test_eval_rollout import untrained_policy

    policy = untrained_policy("diffusion")
    policy.set_sampling(inference_steps=4)
    c = RealTimeController(policy, make_mode(mode), RobotProfile.from_dict({**LOOSE, "seam_jump": 1e9}))
    obs = {"agent_pos": np.array([200.0, 200.0], dtype=np.float32), "keypoints": np.full(18, 250.0, np.float32)}
    c.reset(obs, None, now=0.0)
    c.run_pending()
    done_at = None
    for tick in range(40):
        if done_at is not None and tick >= done_at:
            assert c.run_pending() == []
            done_at = None
        c.tick(0.1 * tick)
        c.observe(obs, 0.1 * tick)
        if c.pending is not None and done_at is None:
            done_at = tick + 1
    assert c.last_error is None and c.flags["rejected_chunk"] == 0
    assert c.flags["underrun"] <= (0 if mode == "sync" else 1) and c.scheduler.stats.inferences >= 4
