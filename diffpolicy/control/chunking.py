"""Chunk execution in one place: which slice of a chunk executes, and how a new chunk lines up
with the actions already committed from the previous one.

Indexing. A chunk of Tp actions is inferred from the observation history ending at tick tau (the
To-th observation). Its index `start = To - 1` is the action for tick tau (as the training windows
align them), so index `start + j` is the action for tick tau + j.

Timing (RTC's protocol). Inference from the observation at tau takes d ticks ("the delay"), during
which the committed actions of the previous chunk execute. The new chunk then executes indices
[start + d, start + s + d): s actions, after which the next inference starts, so that the previous
chunk covers that inference's d ticks again. With d = 0 this is Diffusion Policy's
`chunk[To-1 : To-1+Ta]` for s = Ta. It needs start + s + d <= Tp.

Alignment. A previous chunk inferred `shift` ticks earlier predicts, for the new chunk's index i,
its own index i + shift (`align_previous`): the target of `rtc`, the pinned prefix of `prefix`,
the guess of `warmstart` and the buffer of `streaming` all come from it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from diffpolicy.control.errors import ControlError


@dataclass(frozen=True)
class ChunkLayout:
    """The horizons of a chunk policy: To (obs_horizon), Tp (pred_horizon), Ta (action_horizon)."""

    obs_horizon: int
    pred_horizon: int
    action_horizon: int

    @classmethod
    def of(cls, policy) -> ChunkLayout:
        """The layout of a `ChunkPolicy` (from its config)."""
        config = policy.config
        return cls(config.obs_horizon, config.pred_horizon, config.action_horizon)

    @property
    def start(self) -> int:
        """Index of the action aligned with the newest observation: To - 1."""
        return self.obs_horizon - 1

    @property
    def available(self) -> int:
        """Actions of a chunk at or after its observation's tick: Tp - To + 1."""
        return self.pred_horizon - self.start

    def check(self, delay: int, horizon: int | None = None) -> int:
        """Validate a delay d (and execution horizon s, default Ta): ints, 0 <= d, 1 <= s, and
        start + s + d <= Tp (the chunk must cover the next inference's delay). Returns s."""
        horizon = self.action_horizon if horizon is None else horizon
        for name, value in (("delay", delay), ("execution horizon", horizon)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise ControlError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
        if delay < 0 or horizon < 1:
            raise ControlError(f"expected delay >= 0 and execution horizon >= 1, got delay={delay}, "
                               f"horizon={horizon}")
        if self.start + horizon + delay > self.pred_horizon:
            raise ControlError(
                f"delay {delay} is larger than the chunk allows: executing s = {horizon} actions from index "
                f"To - 1 = {self.start} after a delay of d ticks needs To - 1 + s + d <= Tp = {self.pred_horizon}, "
                f"so d <= {self.pred_horizon - self.start - horizon} here")
        return horizon

    def executed(self, delay: int = 0, horizon: int | None = None) -> slice:
        """The indices a new chunk executes after a delay of d ticks: [start + d, start + s + d)."""
        horizon = self.check(delay, horizon)
        return slice(self.start + delay, self.start + horizon + delay)

    def committed(self, delay: int) -> slice:
        """Indices of the new chunk that the previous chunk has already committed: [0, start + d)
        (the past, and the d actions executing while the new chunk is inferred)."""
        return slice(0, self.start + delay)


def align_previous(previous: torch.Tensor, shift: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Line a previous chunk up with a chunk inferred `shift` ticks later.

    Args:
        previous: `(B, Tp, D)` (or `(Tp, D)`), the previous chunk.
        shift: ticks between the two chunks' observations, >= 0.
    Returns:
        `(aligned, valid)`: aligned `(B, Tp, D)` with aligned[:, i] = previous[:, i + shift] where
        i + shift < Tp, and the last valid action repeated beyond (a hold); valid `(Tp,)` bool.
    """
    if isinstance(shift, bool) or not isinstance(shift, int) or shift < 0:
        raise ControlError(f"align_previous: shift must be an int >= 0, got {shift!r}")
    horizon = previous.shape[-2]
    if shift >= horizon:
        raise ControlError(f"align_previous: the previous chunk ({horizon} actions) ended {shift - horizon + 1} "
                           f"tick(s) before the new one starts (shift {shift} >= Tp {horizon})")
    index = torch.arange(horizon, device=previous.device)
    source = (index + shift).clamp(max=horizon - 1)
    return previous.index_select(-2, source), index + shift < horizon
