"""The real-time loops: a control tick that pops one action per tick and never waits on inference,
an inference worker thread, and an observation history.

    controller = RealTimeController(policy, make_mode("rtc"), load_profile("pusht"))
    controller.reset(first_obs, position, now=clock())
    controller.start()                         # the inference worker thread
    every 1 / control_hz seconds:
        out = controller.tick(clock())         # out.command (Da,), out.robot_commands (substeps, Da), out.flags
        robot.send(out.robot_commands); controller.observe(robot.observation(), clock())
    controller.stop()

The bookkeeping (`ChunkScheduler`: when to infer, the delay to plan with, where a new chunk lands
in the tick-indexed `ActionQueue`) has no threads and no clock, so simulations drive it with a
fake clock; the controller only adds the thread, the safety filter, the watchdog and the
interpolator around it.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from diffpolicy.control.chunking import ChunkLayout
from diffpolicy.control.delay import DelayEstimator
from diffpolicy.control.errors import ControlError
from diffpolicy.control.modes import ChunkMode, Generated, Previous
from diffpolicy.control.profile import RobotProfile
from diffpolicy.control.queue import ActionQueue, QueuedAction
from diffpolicy.control.safety import FLAGS, Interpolator, SafetyFilter, Watchdog, seam_jump


class ObservationHistory:
    """The last To observations `{key: (To, *shape)}` (the first one repeated until there are To).

    `append` validates every key's shape (and finiteness of low-dim keys) against `obs_shapes`.
    """

    def __init__(self, obs_shapes: dict[str, tuple[int, ...]], horizon: int, image_keys: tuple[str, ...] = ()):
        self.obs_shapes, self.horizon, self.image_keys = dict(obs_shapes), horizon, tuple(image_keys)
        self.steps: deque[dict[str, np.ndarray]] = deque(maxlen=horizon)
        self.tick = -1
        self.time: float | None = None

    def check(self, obs: dict[str, Any]) -> dict[str, np.ndarray]:
        if not isinstance(obs, dict):
            raise ControlError(f"observation: expected a dict {{key: array}}, got {type(obs).__name__}")
        missing = sorted(set(self.obs_shapes) - set(obs))
        if missing:
            raise ControlError(f"observation: missing key {missing[0]!r}; expected keys {sorted(self.obs_shapes)}")
        checked = {}
        for key, shape in self.obs_shapes.items():
            value = np.asarray(obs[key])
            if value.shape != tuple(shape):
                raise ControlError(f"observation {key!r}: expected shape {tuple(shape)}, got {value.shape}")
            if key not in self.image_keys and not np.isfinite(value).all():
                raise ControlError(f"observation {key!r}: non-finite value in {value!r}")
            checked[key] = np.array(value, copy=True)
        return checked

    def append(self, obs: dict[str, Any], tick: int, time: float | None = None) -> None:
        """Add the observation of `tick` (taken at `time` seconds)."""
        step = self.check(obs)
        if not self.steps:
            self.steps.extend([step] * self.horizon)
        else:
            self.steps.append(step)
        self.tick, self.time = tick, time

    def snapshot(self) -> dict[str, np.ndarray]:
        """`{key: (To, *shape)}` arrays of the history (copies; cheap enough for the control tick)."""
        if not self.steps:
            raise ControlError("observation history is empty: reset the controller with a first observation")
        return {k: np.stack([s[k] for s in self.steps]) for k in self.obs_shapes}


@dataclass
class Request:
    """One inference: observations `{key: (To, ...)}` (numpy) of tick `obs_tick`, started at tick
    `started` with the planned delay, the previous chunk, and the chunk's id."""

    obs: dict[str, np.ndarray]
    obs_tick: int
    started: int
    delay: int
    previous: Previous | None
    chunk_id: int


@dataclass
class SchedulerStats:
    inferences: int = 0
    nfe: int = 0
    rejected: int = 0
    delays: list[int] = field(default_factory=list)


class ChunkScheduler:
    """When to infer, what delay to plan with, and where a new chunk lands in the queue.

    Args:
        layout: the policy's horizons; horizon: actions executed per chunk before the next
            inference starts (s, default Ta).
        mode: the controller mode (blocking and ensembling come from it).
        estimator: the `DelayEstimator` (actions consumed per inference).
        action_dim: Da; seam_limit: largest allowed jump to a new chunk's first action (None: no check).
    """

    def __init__(self, layout: ChunkLayout, mode: ChunkMode, estimator: DelayEstimator | None = None,
                 horizon: int | None = None, action_dim: int | None = None, seam_limit: float | None = None):
        self.layout, self.mode = layout, mode
        self.horizon = layout.check(0, horizon)
        self.max_delay = layout.pred_horizon - layout.start - self.horizon
        self.estimator = estimator or DelayEstimator()
        self.queue = ActionQueue()
        self.action_dim, self.seam_limit = action_dim, seam_limit
        self.previous: Previous | None = None
        self.previous_tick = 0
        self.last_obs_tick: int | None = None
        self.running: Request | None = None
        self.chunks = 0
        self.stats = SchedulerStats()
        self.lock = threading.Lock()

    def planned_delay(self) -> int:
        return min(self.estimator.estimate, self.max_delay)

    def should_start(self, tick: int) -> bool:
        """Whether an inference should start at `tick` (the next tick to pop): none is running and
        either there is no chunk yet, the queue would run dry within the estimated delay, or (async
        modes) s ticks have passed since the last chunk's observation. Blocking modes wait for an
        empty queue."""
        with self.lock:
            if self.running is not None:
                return False
            remaining = self.queue.remaining()
            if self.last_obs_tick is None:
                return True
            if self.mode.blocking:
                return remaining == 0
            return remaining <= self.estimator.estimate or tick - self.last_obs_tick >= self.horizon

    def begin(self, obs: dict[str, np.ndarray], obs_tick: int, tick: int) -> Request:
        """Start an inference at `tick` from observations of `obs_tick`."""
        with self.lock:
            if self.running is not None:
                raise ControlError("ChunkScheduler.begin: an inference is already running")
            previous = None
            if self.previous is not None and self.mode.uses_previous:
                shift = obs_tick - self.previous_tick
                if shift < self.layout.pred_horizon:  # the modes take a batch: (1, Tp, Da), (1, Tp)
                    previous = Previous(self.previous.state[None], self.previous.levels[None], shift)
            request = Request(obs, obs_tick, tick, self.planned_delay() if previous is not None else 0, previous,
                              self.chunks)
            self.chunks += 1
            self.running = request
            return request

    def complete(self, request: Request, generated: Generated | None) -> list[str]:
        """Finish `request` with a mode's output for batch row 0 (None: the inference failed).
        Records the delay (ticks popped since it started) and commits the chunk unless it is
        non-finite or jumps too far from `last_command`. Returns the flags raised."""
        with self.lock:
            self.running = None
            consumed = self.queue.next_tick - request.started
            self.estimator.record(max(consumed, 0))
            self.stats.delays.append(consumed)
            self.stats.inferences += 1
            if generated is None:
                self.stats.rejected += 1
                return ["rejected_chunk"]
            self.stats.nfe += generated.nfe
            actions = generated.actions.detach().to("cpu", torch.float64).numpy()
            if actions.ndim == 3:
                actions = actions[0]
            flags = self._check(actions)
            actions = actions[:generated.clean_length()]  # streaming leaves noisy tokens: never queued
            if flags:
                self.stats.rejected += 1
                return flags
            self.last_obs_tick = request.obs_tick
            if generated.state is not None:
                self.previous = Previous(_row(generated.state), _row(generated.levels), 0)
                self.previous_tick = request.obs_tick
            start = self.layout.start
            if self.mode.blocking:
                self.queue.commit(actions[start:start + self.horizon], self.queue.next_tick, request.chunk_id, start)
            else:
                self.queue.commit(actions[start:], request.obs_tick, request.chunk_id, start,
                                  ensemble_decay=self.mode.ensemble_decay)
            return []

    def _check(self, actions: np.ndarray) -> list[str]:
        if self.action_dim is not None and actions.shape != (self.layout.pred_horizon, self.action_dim):
            return ["rejected_chunk"]
        if not np.isfinite(actions).all():
            return ["rejected_chunk"]
        return []

    def check_seam(self, request: Request, actions: np.ndarray, last_command: np.ndarray | None) -> bool:
        """Whether the chunk's action for the next tick stays within the seam limit of `last_command`."""
        if self.seam_limit is None or last_command is None or self.last_obs_tick is None:
            return True
        index = self.layout.start + max(self.queue.next_tick - request.obs_tick, 0)
        index = min(index, len(actions) - 1)
        return seam_jump(last_command, actions[index]) <= self.seam_limit

    def pop(self, tick: int) -> QueuedAction | None:
        return self.queue.pop(tick)


def _row(x: torch.Tensor | None) -> torch.Tensor | None:
    return None if x is None else (x[0] if x.dim() == 3 or (x.dim() == 2 and x.shape[0] == 1) else x)


@dataclass
class TickOutput:
    """One control tick: the command `(Da,)`, the robot commands `(substeps, Da)`, the flags raised."""

    tick: int
    command: np.ndarray
    robot_commands: np.ndarray
    flags: list[str]
    source: QueuedAction | None


class RealTimeController:
    """Control tick + inference worker thread + observation history + safety (module docstring).

    Args:
        policy: a `ChunkPolicy` (used through `sample`, `encode_obs`, `sample_normalized`, ...).
        mode: a `ChunkMode` (`modes.make_mode`).
        profile: the `RobotProfile` (limits, seam jump, watchdog, interpolation rate).
        horizon: actions per chunk before the next inference (s, default Ta).
        estimator: a `DelayEstimator` (default: window 8, 0.75-quantile, first call excluded).
        steps: denoising steps (None: the policy's).
        seed: seed of the generator of every inference's noise.
        infer: replaces the policy call (simulations, tests): `infer(request) -> Generated`.

    Without `start()` no thread runs: a simulation calls `run_pending()` when its simulated
    inference is done (fake clocks, deterministic soaks).
    """

    def __init__(self, policy: Any, mode: ChunkMode, profile: RobotProfile, *, horizon: int | None = None,
                 estimator: DelayEstimator | None = None, steps: int | None = None, seed: int = 0,
                 infer: Callable[[Request], Generated] | None = None):
        config = policy.config
        if profile.action_dim != config.action_dim:
            raise ControlError(f"robot profile {profile.name!r} has action_dim {profile.action_dim}, the policy "
                               f"{config.action_dim}")
        self.policy, self.mode, self.profile, self.steps = policy, mode, profile, steps
        self.layout = ChunkLayout.of(policy)
        self.scheduler = ChunkScheduler(self.layout, mode, estimator, horizon, config.action_dim, profile.seam_jump)
        self.history = ObservationHistory(config.obs_shapes, config.obs_horizon, tuple(config.image_keys))
        self.safety = SafetyFilter(profile)
        self.watchdog = Watchdog.of(profile)
        self.interpolator = Interpolator(profile.substeps)
        self.generator = torch.Generator().manual_seed(seed)
        self._infer = infer or self._policy_infer
        self.flags: dict[str, int] = dict.fromkeys(FLAGS, 0)
        self.last_error: Exception | None = None  # the last exception an inference raised (flagged, held)
        self.tick_index = 0
        self.last_command: np.ndarray | None = None
        self.inference_started: float | None = None
        self._clock_now = 0.0
        self._wake = threading.Condition()
        self._stop = False
        self._thread: threading.Thread | None = None
        self._pending: Request | None = None

    # ------------------------------------------------------------------ lifecycle
    def reset(self, obs: dict[str, Any], position: np.ndarray | None, now: float) -> None:
        """Start an episode: the first observation (tick 0) and the robot's commanded position
        (None: the robot starts at rest at the first chunk's first action)."""
        self.history.steps.clear()
        self.history.append(obs, 0, now)
        self.safety.position = None
        self.last_command = None
        if position is not None:
            self.safety.reset(position)
            self.last_command = self.safety.position.copy()
        self.tick_index = 0
        self._request_if_due(now)

    def start(self) -> None:
        """Start the inference worker thread."""
        self._stop = False
        self._thread = threading.Thread(target=self._work, name="diffpolicy-inference", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        with self._wake:
            self._stop = True
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    # ------------------------------------------------------------------ the two loops
    def observe(self, obs: dict[str, Any], now: float) -> None:
        """The observation taken after the last tick's command (tick = the next tick to run)."""
        self.history.append(obs, self.tick_index, now)

    def tick(self, now: float) -> TickOutput:
        """Pop this tick's action, apply watchdog and safety, interpolate. Never waits on inference."""
        self._request_if_due(now)
        flags = self.watchdog.check(now, self.history.time, self.inference_started)
        entry = self.scheduler.pop(self.tick_index)
        if entry is None and not self.mode.blocking:
            flags.append("underrun")
        if self.safety.position is None:
            if entry is None or not np.isfinite(entry.action).all():
                raise ControlError("RealTimeController.tick: no position to hold yet: pass the robot's position to "
                                   "reset() or wait for the first chunk (wait_first_chunk)")
            self.safety.reset(entry.action)
        hold = self.profile.hold_target(self.safety.position)
        target = entry.action if (entry is not None and not flags) else hold
        if not np.isfinite(target).all():
            flags.append("nonfinite_target")
            target = hold
        command = self.safety(target)
        self.last_command = command
        for flag in flags:
            self.flags[flag] += 1
        out = TickOutput(self.tick_index, command, self.interpolator(command), flags, entry if not flags else None)
        self.tick_index += 1
        return out

    @property
    def pending(self) -> Request | None:
        """The inference requested and not yet completed (None if none)."""
        return self._pending

    def wait_first_chunk(self, timeout: float) -> bool:
        """Block until the first chunk is queued (the robot waits before its first tick)."""
        deadline = time.monotonic() + timeout
        while self.scheduler.queue.remaining() == 0 and time.monotonic() < deadline:
            time.sleep(0.001)
        return self.scheduler.queue.remaining() > 0

    def _request_if_due(self, now: float) -> None:
        if self.scheduler.should_start(self.tick_index):
            with self._wake:
                if self._pending is None:
                    self.inference_started = now
                    self._pending = self.scheduler.begin(self.history.snapshot(), self.history.tick, self.tick_index)
                    self._wake.notify_all()

    def _work(self) -> None:
        while True:
            with self._wake:
                while self._pending is None and not self._stop:
                    self._wake.wait(0.05)
                if self._stop:
                    return
            self.run_pending()

    def run_pending(self) -> list[str]:
        """Run the requested inference now (the worker thread's body) and commit its chunk.
        Returns the flags raised: a failed or non-finite inference, a seam jump (the chunk is
        rejected; the queue keeps what it had, and the tick holds when it runs out)."""
        request = self._pending
        if request is None:
            return []
        try:
            generated = self._infer(request)
        except Exception as err:  # a failed inference is flagged and rejected; the robot holds meanwhile
            self.last_error = err
            generated = None
        flags = []
        if generated is not None:
            actions = generated.actions.detach().to("cpu", torch.float64).numpy().reshape(-1, generated.actions.shape[-1])
            if np.isfinite(actions).all() and not self.scheduler.check_seam(request, actions, self.last_command):
                flags.append("seam_jump")
                generated = None
        flags += self.scheduler.complete(request, generated)
        for flag in flags:
            self.flags[flag] += 1
        self.inference_started = None
        with self._wake:
            self._pending = None
        return flags

    def _policy_infer(self, request: Request) -> Generated:
        noise = torch.randn((1, self.layout.pred_horizon, self.policy.config.action_dim), generator=self.generator)
        obs = {key: torch.as_tensor(value)[None] for key, value in request.obs.items()}
        with torch.no_grad():
            return self.mode.generate(self.policy, self.layout, obs, noise, request.delay, request.previous,
                                      self.generator, self.steps)
