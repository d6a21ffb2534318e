"""Deterministic latency simulation of one episode: when chunks are inferred, which ticks each chunk
covers, and what executes at every tick (RTC's Kinetix protocol). Used by `evaluation.rollout`.

An inference from the observation at tick tau takes d ticks. Asynchronous modes start it at tau
while the queue still holds the previous chunk's actions for ticks tau .. tau + d - 1 (those
execute meanwhile); the new chunk then covers ticks tau + d onward (`ChunkLayout`: indices from
start + d) and the next inference starts at tau + s. `sync` (blocking) instead holds the last
command for d ticks after tau, executes the s actions of `ChunkLayout.executed(0, s)` from tick
tau + d, and infers again when they are done. The first chunk of an episode is free (the robot
waits for it before the episode starts). With d = 0 every mode infers at the same ticks as
Diffusion Policy's loop (chunk[To-1 : To-1+Ta], then infer again).

With a robot profile in the `ControlSpec`, every action passes through the profile's
`SafetyFilter` on its way to the environment, as on a robot (the robot starts at rest at the first
action), and a hold commands the profile's hold target (0 on delta dimensions) instead of repeating
the last action; `ExecutionStats.limited` counts the commands the filter changed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from diffpolicy.control.chunking import ChunkLayout
from diffpolicy.control.modes import ChunkMode, Generated, Previous, SyncMode
from diffpolicy.control.profile import RobotProfile
from diffpolicy.control.queue import ActionQueue
from diffpolicy.control.safety import SafetyFilter


@dataclass(frozen=True)
class ControlSpec:
    """How a rollout executes chunks: a mode, a delay d in ticks, an execution horizon s (None: Ta),
    and a robot profile whose safety filter limits every command (None: actions go out unfiltered)."""

    mode: ChunkMode = field(default_factory=SyncMode)
    delay: int = 0
    horizon: int | None = None
    profile: RobotProfile | None = None


@dataclass
class ExecutionStats:
    """Per-episode controller metrics: denoiser calls, executed actions (ticks), queue underruns,
    the mean jerk (norm of the third difference of executed actions, per tick^3) and the largest
    action jump at a chunk seam (norm of a_k - a_{k-1} where a_k comes from a newer chunk); `limited`:
    commands the safety filter changed (with a robot profile); `delays`: the actions consumed during
    each inference, where they were measured (wall clock)."""

    nfe: int = 0
    actions: int = 0
    underruns: int = 0
    limited: int = 0
    jerk: float = 0.0
    seam_jump: float = 0.0
    delays: list[int] | None = None  # measured delays per inference (wall-clock runs)


class EpisodeExecution:
    """The chunk schedule of one environment's episode under a `ControlSpec`."""

    def __init__(self, layout: ChunkLayout, spec: ControlSpec):
        self.layout, self.spec = layout, spec
        self.horizon = layout.check(spec.delay, spec.horizon)
        self.queue = ActionQueue()
        self.tick = 0
        self.next_inference = 0
        self.previous: Previous | None = None
        self.previous_tick = 0
        self.chunks = 0
        self.hold_until = 0
        self.stats = ExecutionStats()
        self.safety = None if spec.profile is None else SafetyFilter(spec.profile)
        self._executed: list[np.ndarray] = []
        self._last_chunk: int | None = None

    @property
    def needs_inference(self) -> bool:
        return self.tick == self.next_inference

    def previous_for_inference(self) -> Previous | None:
        """The previous chunk as the mode sees it from this tick (shift = ticks since its observation);
        None before the first chunk and for modes that keep none."""
        if self.previous is None:
            return None
        return Previous(self.previous.state, self.previous.levels, self.tick - self.previous_tick)

    def commit(self, generated: Generated) -> None:
        """Take a new chunk inferred from the observation at the current tick: one row of a mode's
        output (actions `(Tp, Da)` in data units, state `(Tp, Da)` and levels `(Tp,)` or None)."""
        actions = generated.actions.detach().to("cpu", torch.float64).numpy()[:generated.clean_length()]
        tau, d, s, start = self.tick, self.spec.delay, self.horizon, self.layout.start
        first = self.chunks == 0
        if self.spec.mode.blocking:
            begin = tau if first else tau + d
            self.queue.commit(actions[self.layout.executed(0, s)], begin, self.chunks, start)
            self.hold_until = begin
            self.next_inference = begin + s
        else:
            lag = 0 if first else d
            self.queue.commit(actions[start + lag:], tau + lag, self.chunks, start + lag,
                              ensemble_decay=self.spec.mode.ensemble_decay)
            self.next_inference = tau + s
        if generated.state is not None:
            self.previous = Previous(generated.state, generated.levels, 0)
        self.previous_tick = tau
        self.chunks += 1
        self.stats.nfe += generated.nfe

    def pop(self, last_action: np.ndarray) -> np.ndarray:
        """The action of the current tick (the last one held while a blocking inference runs, or on
        an underrun; through the safety filter with a profile), then advance one tick."""
        entry = self.queue.pop(self.tick)
        if entry is None:
            if self.tick >= self.hold_until:
                self.stats.underruns += 1
            profile = self.spec.profile
            action = np.array(last_action, copy=True) if profile is None else profile.hold_target(last_action)
        else:
            action = entry.action
            if self._last_chunk is not None and entry.chunk_id != self._last_chunk and self._executed:
                jump = float(np.linalg.norm(action - self._executed[-1]))
                self.stats.seam_jump = max(self.stats.seam_jump, jump)
            self._last_chunk = entry.chunk_id
        if self.safety is not None:
            action = self._limit(action)
        self._executed.append(np.asarray(action, dtype=np.float64))
        self.stats.actions += 1
        self.tick += 1
        return action

    def _limit(self, action: np.ndarray) -> np.ndarray:
        command = self.safety.follow(action)
        if not np.allclose(command, action, rtol=0.0, atol=1e-9):
            self.stats.limited += 1
        return command

    def finish(self) -> ExecutionStats:
        """Close the episode: compute the mean jerk of the executed actions."""
        if len(self._executed) >= 4:
            third = np.diff(np.stack(self._executed), n=3, axis=0)
            self.stats.jerk = float(np.linalg.norm(third, axis=-1).mean())
        return self.stats


def stack_previous(executions: list[EpisodeExecution]) -> Previous | None:
    """The batched previous chunk of envs that all have one and the same shift (else None)."""
    previous = [e.previous_for_inference() for e in executions]
    if any(p is None for p in previous):
        return None
    return Previous(torch.stack([p.state for p in previous]), torch.stack([p.levels for p in previous]),
                    previous[0].shift)
