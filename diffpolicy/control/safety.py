"""Safety between the action queue and the robot: limits, NaN guard, seam check, watchdog, interpolation.

`SafetyFilter` turns any target (finite or not) into a command that respects the profile's
position, velocity and acceleration limits per dimension. Velocities and accelerations are
per tick: V = velocity / control_hz, A = acceleration / control_hz^2. Each command moves by a step
v with
    |v| <= V,   |v - v_prev| <= A,   and x + v plus the braking distance of v stays in [low, high],
where the braking distance of a step v under deceleration A is sum_{k >= 1} max(|v| - k A, 0). The
last condition keeps a stop inside the limits always possible, so all three limits hold at every
tick, whatever the targets (by induction from a state at rest inside the limits). A non-finite
target is replaced by the hold target (`RobotProfile.hold_target`: the last command, 0 on delta
dimensions) and flagged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from diffpolicy.control.errors import ControlError
from diffpolicy.control.profile import RobotProfile

FLAGS = ("nonfinite_target", "stale_observation", "stalled_inference", "rejected_chunk", "seam_jump", "underrun")


def max_safe_step(distance: float, decel: float) -> float:
    """The largest step v >= 0 with v + braking(v) <= distance (clipped at 0), under deceleration A.

    With n = floor((sqrt(1 + 8 D / A) - 1) / 2), v + braking(v) = (n + 1) v - A n (n + 1) / 2 on
    [n A, (n + 1) A], so v = (D + A n (n + 1) / 2) / (n + 1).
    """
    distance = max(distance, 0.0)
    n = math.floor((math.sqrt(1.0 + 8.0 * distance / decel) - 1.0) / 2.0)
    return (distance + decel * n * (n + 1.0) / 2.0) / (n + 1.0)


@dataclass
class SafetyFilter:
    """Limits every command to the profile (module docstring). Call `reset(position)` first.

    `flags` counts the events it handled (`FLAGS`).
    """

    profile: RobotProfile
    flags: dict[str, int] = field(default_factory=lambda: dict.fromkeys(FLAGS, 0))

    def __post_init__(self) -> None:
        p = self.profile
        self.low, self.high = p.position_low, p.position_high
        self.max_step = p.velocity / p.control_hz
        self.max_change = p.acceleration / p.control_hz ** 2
        self.position: np.ndarray | None = None
        self.step = np.zeros(p.action_dim)
        self._low, self._high = self.low.tolist(), self.high.tolist()
        self._step, self._change = self.max_step.tolist(), self.max_change.tolist()

    def reset(self, position: np.ndarray) -> None:
        """Start at rest at `position (Da,)` (clipped into the limits; must be finite)."""
        position = np.asarray(position, dtype=np.float64)
        if position.shape != (self.profile.action_dim,) or not np.isfinite(position).all():
            raise ControlError(f"SafetyFilter.reset: expected a finite position of shape ({self.profile.action_dim},), "
                               f"got {position!r}")
        self.position = np.clip(position, self.low, self.high)
        self.step = np.zeros_like(self.position)

    def __call__(self, target: np.ndarray) -> np.ndarray:
        """The command `(Da,)` for `target (Da,)` (any values; NaN / inf hold the last command)."""
        if self.position is None:
            raise ControlError("SafetyFilter: call reset(position) before filtering commands")
        target = np.asarray(target, dtype=np.float64)
        if target.shape != self.position.shape:
            raise ControlError(f"SafetyFilter: expected a target of shape {self.position.shape}, got {target.shape}")
        if not all(map(math.isfinite, target.tolist())):
            self.flags["nonfinite_target"] += 1
            target = self.profile.hold_target(self.position)
        # Per dimension in plain floats: a few microseconds for a handful of dimensions, where
        # numpy's per-call overhead would dominate the control tick.
        command = []
        for i, (x, v_prev, goal) in enumerate(zip(self.position.tolist(), self.step.tolist(), target.tolist())):
            a, v_max, low, high = self._change[i], self._step[i], self._low[i], self._high[i]
            slowest = max(v_prev - a, -v_max, -max_safe_step(x - low, a))
            fastest = min(v_prev + a, v_max, max_safe_step(high - x, a))
            # slowest <= fastest holds by induction; should rounding cross them, take `fastest` (braking).
            step = min(max(goal - x, slowest), fastest)
            command.append(min(max(x + step, low), high))
        new = np.array(command)
        self.step = new - self.position
        self.position = new
        return new.copy()

    def follow(self, target: np.ndarray) -> np.ndarray:
        """`self(target)`, starting at rest at the first target when not `reset` yet (a robot whose
        position is unknown and that waited for its first command)."""
        if self.position is None:
            self.reset(target)
        return self(target)

    def hold(self) -> np.ndarray:
        """The command toward the hold target (`RobotProfile.hold_target`), within the limits."""
        return self(self.profile.hold_target(self.position))


def check_chunk(actions: np.ndarray, action_dim: int, where: str = "chunk") -> None:
    """Raise `ControlError` unless `actions (N, Da)` is finite with Da = action_dim."""
    actions = np.asarray(actions)
    if actions.ndim != 2 or actions.shape[1] != action_dim:
        raise ControlError(f"{where}: expected actions of shape (N, {action_dim}), got {actions.shape}")
    bad = np.argwhere(~np.isfinite(actions))
    if bad.size:
        raise ControlError(f"{where}: non-finite action value {actions[tuple(bad[0])]} at index {tuple(int(i) for i in bad[0])}")


def seam_jump(last_command: np.ndarray | None, first_action: np.ndarray) -> float:
    """Largest per-dimension step from the last command to a new chunk's first executed action."""
    if last_command is None:
        return 0.0
    return float(np.max(np.abs(np.asarray(first_action) - np.asarray(last_command))))


@dataclass
class Watchdog:
    """Stale observations and stalled inference: `check` returns the flags that demand a hold."""

    max_observation_age_s: float
    max_inference_s: float

    @classmethod
    def of(cls, profile: RobotProfile) -> Watchdog:
        return cls(profile.max_observation_age_s, profile.max_inference_s)

    def check(self, now: float, observation_time: float | None, inference_started: float | None) -> list[str]:
        """Flags at time `now` (seconds): "stale_observation" if the newest observation is older than
        the limit (or there is none), "stalled_inference" if a running inference exceeds its limit."""
        flags = []
        if observation_time is None or now - observation_time > self.max_observation_age_s:
            flags.append("stale_observation")
        if inference_started is not None and now - inference_started > self.max_inference_s:
            flags.append("stalled_inference")
        return flags


class Interpolator:
    """Commands a robot `substeps` times per control tick: linear steps from the previous tick's
    command to the new one (convex combinations, so position limits hold at the robot's rate)."""

    def __init__(self, substeps: int):
        if isinstance(substeps, bool) or not isinstance(substeps, int) or substeps < 1:
            raise ControlError(f"Interpolator: substeps must be an int >= 1, got {substeps!r}")
        self.substeps = substeps
        self.last: np.ndarray | None = None

    def __call__(self, command: np.ndarray) -> np.ndarray:
        """`(substeps, Da)` robot commands ending at `command (Da,)`."""
        command = np.asarray(command, dtype=np.float64)
        start = command if self.last is None else self.last
        fractions = (np.arange(1, self.substeps + 1) / self.substeps)[:, None]
        self.last = command.copy()
        return start + fractions * (command - start)


def within_limits(profile: RobotProfile, commands: np.ndarray, tolerance: float = 1e-9) -> np.ndarray:
    """Per command `(N,)` bool: position, velocity and acceleration limits hold (the first two
    commands have no acceleration, the first no velocity; the start is at rest)."""
    commands = np.asarray(commands, dtype=np.float64)
    scale = tolerance * (1.0 + np.abs(profile.position_high - profile.position_low))
    ok = np.all((commands >= profile.position_low - scale) & (commands <= profile.position_high + scale), axis=-1)
    ok &= np.isfinite(commands).all(axis=-1)
    step = np.diff(commands, axis=0, prepend=commands[:1])
    ok &= np.all(np.abs(step) <= profile.velocity / profile.control_hz + scale, axis=-1)
    change = np.diff(step, axis=0, prepend=np.zeros_like(step[:1]))
    ok &= np.all(np.abs(change) <= profile.acceleration / profile.control_hz ** 2 + scale, axis=-1)
    return ok
