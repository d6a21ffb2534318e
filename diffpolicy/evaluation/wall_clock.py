"""Wall-clock latency simulation: real threads, real inference time, the environment stepped at
the control rate. The delay is whatever inference takes on this machine (measured, not set).

One environment at a time, batch-1 inference in the controller's worker thread; the control loop
sleeps to the next tick, pops, filters and steps the environment. Slower than the deterministic
harness by construction (an episode of 300 ticks at 10 Hz takes 30 s).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from diffpolicy.control.execution import ExecutionStats
from diffpolicy.control.modes import ChunkMode
from diffpolicy.control.profile import RobotProfile
from diffpolicy.control.realtime import RealTimeController
from diffpolicy.evaluation.rollout import EpisodeResult


def run_wall_clock(policy: Any, make_env: Callable[[], Any], seeds: Sequence[int], mode: ChunkMode,
                   profile: RobotProfile, *, rate_hz: float | None = None, steps: int | None = None,
                   horizon: int | None = None, coverage_key: str = "coverage",
                   progress: Callable[[EpisodeResult], None] | None = None) -> list[EpisodeResult]:
    """One episode per seed under a `RealTimeController`, stepped at `rate_hz` (default: the
    profile's control_hz). Returns `evaluation.rollout.EpisodeResult`s with controller stats
    (`control.nfe`, jerk, seam jump, underruns; `control.delays`: the measured delays)."""
    period = 1.0 / (rate_hz or profile.control_hz)
    results = []
    for index, seed in enumerate(seeds):
        env = make_env()
        try:
            obs, _ = env.reset(seed=int(seed))
            controller = RealTimeController(policy, mode, profile, horizon=horizon, steps=steps, seed=int(seed))
            controller.reset(obs, None, time.monotonic())
            controller.start()
            try:
                controller.wait_first_chunk(timeout=60.0)
                executed, seams, last_chunk = [], 0.0, None
                total, success, coverage, length, done = 0.0, False, None, 0, False
                next_tick = time.monotonic()
                while not done:
                    out = controller.tick(time.monotonic())
                    if out.source is not None:
                        if last_chunk is not None and out.source.chunk_id != last_chunk and executed:
                            seams = max(seams, float(np.linalg.norm(out.command - executed[-1])))
                        last_chunk = out.source.chunk_id
                    executed.append(out.command)
                    obs, reward, terminated, truncated, info = env.step(out.command.astype(np.float32))
                    controller.observe(obs, time.monotonic())
                    total += float(reward)
                    length += 1
                    success |= bool(info.get("is_success", False))
                    if coverage_key in info:
                        coverage = max(coverage or 0.0, float(info[coverage_key]))
                    done = terminated or truncated
                    next_tick += period
                    time.sleep(max(0.0, next_tick - time.monotonic()))
            finally:
                controller.stop()
        finally:
            env.close()
        stats = ExecutionStats(nfe=controller.scheduler.stats.nfe, actions=length,
                               underruns=controller.flags["underrun"], seam_jump=seams)
        if len(executed) >= 4:
            stats.jerk = float(np.linalg.norm(np.diff(np.stack(executed), n=3, axis=0), axis=-1).mean())
        stats.delays = list(controller.scheduler.stats.delays)
        result = EpisodeResult(index=index, seed=int(seed), success=success, episode_return=total, length=length,
                               coverage=coverage, control=stats)
        results.append(result)
        if progress is not None:
            progress(result)
    return results
