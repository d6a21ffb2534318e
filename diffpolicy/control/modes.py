"""The six ways the controller turns an observation into the next chunk, for any process.

Each mode samples a chunk from the observations `{key: (B, To, ...)}`, the initial noise
`noise (B, Tp, Da)` (normalized units), the delay d and, once there is one, the previous chunk (its
normalized state and levels, inferred `shift` ticks earlier; `chunking.align_previous`). A cold
chunk (the first one, and every `sync` / `ensemble` chunk) is `policy.sample(obs, steps, noise)`:

- `sync`      cold sampling; the robot holds while the policy infers (the baseline).
- `ensemble`  cold sampling; the queue averages the chunks predicting a tick, ACT's weights exp(-m i).
- `rtc`       guided inpainting toward the previous chunk through the x0 prediction (weights 1 on the
              committed actions, decaying to 0 over the rest of the previous chunk; `GuidedInpainting`).
- `prefix`    the committed actions [0, To - 1 + d) pinned at t = 0, the rest denoised (`loss.token_times`
              "prefix" trains for it).
- `streaming` a persistent buffer whose levels rise along the chunk (SDP): each inference runs
              `calls` denoiser calls that move every token down one rung; the head reaches t = 0 and
              executes; fresh noise enters at the top (`loss.token_times` "ladder" trains for it).
- `warmstart` the previous chunk shifted by the consumed actions (binary dimensions binarised),
              renoised to `level`, denoised with only the remaining steps (real-time iteration).

A mode returns a `Generated`: the actions `(B, Tp, Da)` in data units, the normalized state
`(B, Tp, Da)` and its levels `(B, Tp)` that the next inference starts from (0 where clean; only
streaming leaves tokens noisy; None for modes that do not use them) and the denoiser calls it made
(NFE, per batch row).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from diffpolicy.control.chunking import ChunkLayout, align_previous
from diffpolicy.control.errors import ControlError
from diffpolicy.core.checking import values_checked
from diffpolicy.core.guidance import GuidedInpainting, rtc_prefix_weights
from diffpolicy.policies.token_times import ladder_levels

MODES = ("sync", "ensemble", "rtc", "prefix", "streaming", "warmstart")


@dataclass
class Previous:
    """The previous chunk: `state (B, Tp, Da)` normalized, `levels (B, Tp)`, inferred `shift` ticks ago."""

    state: torch.Tensor
    levels: torch.Tensor
    shift: int


@dataclass
class Generated:
    """A mode's output: `actions (B, Tp, Da)` in data units; `state (B, Tp, Da)` normalized and its
    `levels (B, Tp)` (0 = clean) for the next inference (None where the mode needs none); `nfe` calls."""

    actions: torch.Tensor
    state: torch.Tensor | None
    levels: torch.Tensor | None
    nfe: int

    def clean_length(self) -> int:
        """How many leading tokens are clean (t = 0) in every row: the part that may execute."""
        if self.levels is None:
            return self.actions.shape[-2]
        noisy = (self.levels.reshape(-1, self.levels.shape[-1]) > 0).any(0)
        return int(noisy.nonzero()[0, 0]) if bool(noisy.any()) else int(noisy.shape[0])

    def row(self, i: int) -> Generated:
        """Batch row i (tensors without the batch dimension)."""
        pick = (lambda x: None if x is None else x[i])
        return Generated(self.actions[i], pick(self.state), pick(self.levels), self.nfe)


class ChunkMode:
    """Base of the modes. `blocking`: the robot waits for inference (sync);
    `ensemble_decay`: the queue averages chunks (ensemble) instead of replacing;
    `uses_previous`: the mode starts from the previous chunk."""

    name = ""
    blocking = False
    ensemble_decay: float | None = None
    uses_previous = True

    def generate(self, policy, layout: ChunkLayout, obs, noise: torch.Tensor, delay: int,
                 previous: Previous | None, generator: torch.Generator | None, steps: int | None = None) -> Generated:
        """The next chunk (see the module docstring); `steps`: denoising steps (None: the policy's).
        Call it under `torch.no_grad()` (not `inference_mode`: `rtc` needs autograd inside)."""
        layout.check(delay)
        if previous is None or not self.uses_previous:
            return self._cold(policy, layout, obs, noise, delay, generator, steps)
        if previous.state.shape != noise.shape:
            raise ControlError(f"{self.name}: previous chunk has shape {tuple(previous.state.shape)}, "
                               f"expected {tuple(noise.shape)}")
        cond = policy.encode_obs(obs, generator)
        state, levels, nfe = self._warm(policy, layout, cond, noise, delay, previous, generator, steps)
        return Generated(policy.unnormalize_action(state), state, levels, nfe)

    def _cold(self, policy, layout, obs, noise, delay, generator, steps) -> Generated:
        actions = policy.sample(obs, steps, x_init=noise, generator=generator)
        if not self.uses_previous:
            return Generated(actions, None, None, _steps(policy, steps))
        state = policy.normalize_action(actions)
        return Generated(actions, state, _clean(state), _steps(policy, steps))

    def _warm(self, policy, layout, cond, noise, delay, previous, generator, steps):
        """(state, levels, nfe) of a chunk that starts from `previous`."""
        raise NotImplementedError


def _steps(policy, steps: int | None) -> int:
    return policy.config.inference_steps if steps is None else steps


def _clean(state: torch.Tensor) -> torch.Tensor:
    return torch.zeros(state.shape[:2], dtype=state.dtype, device=state.device)


class SyncMode(ChunkMode):
    name, blocking, uses_previous = "sync", True, False


class EnsembleMode(ChunkMode):
    """ACT temporal ensembling, weights exp(-decay i) (i = 0 the oldest chunk; ACT's m = 0.01)."""

    name, uses_previous = "ensemble", False

    def __init__(self, decay: float = 0.01):
        if not (isinstance(decay, (int, float)) and math.isfinite(decay) and decay >= 0):
            raise ControlError(f"ensemble: decay must be a finite number >= 0, got {decay!r}")
        self.ensemble_decay = float(decay)


class RTCMode(ChunkMode):
    """Real-time chunking by guided inpainting (`core.guidance.GuidedInpainting`), for any process."""

    name = "rtc"

    def __init__(self, max_weight: float = 5.0):
        self.max_weight = max_weight

    def _warm(self, policy, layout, cond, noise, delay, previous, generator, steps):
        target, _ = align_previous(previous.state, previous.shift)
        horizon = layout.pred_horizon
        committed = layout.committed(delay).stop
        if committed + previous.shift > horizon:
            raise ControlError(f"rtc: the previous chunk ({horizon} actions, inferred {previous.shift} ticks ago) "
                               f"does not cover the {committed} committed actions")
        weights = rtc_prefix_weights(horizon, committed, previous.shift, dtype=noise.dtype, device=noise.device)
        guidance = GuidedInpainting(target, weights, self.max_weight)
        x0 = policy.sample_normalized(cond, steps, x_init=noise, guidance=guidance, generator=generator).x0
        return x0, _clean(x0), _steps(policy, steps)


class PrefixMode(ChunkMode):
    """The committed actions pinned at t = 0 (hard inpainting by per-token start levels)."""

    name = "prefix"

    def _warm(self, policy, layout, cond, noise, delay, previous, generator, steps):
        aligned, _ = align_previous(previous.state, previous.shift)
        committed = layout.committed(delay).stop
        pinned = torch.arange(noise.shape[1], device=noise.device) < committed
        x_init = torch.where(pinned[None, :, None], aligned, noise)
        t_start = (~pinned).to(noise.dtype).expand(noise.shape[0], -1)
        x0 = policy.sample_normalized(cond, steps, x_init=x_init, t_start=t_start, generator=generator).x0
        return x0, _clean(x0), _steps(policy, steps)


class StreamingMode(ChunkMode):
    """Streaming diffusion (SDP): a buffer on a noise ladder, `calls` denoiser calls per inference
    (default: `calls_per_inference`).

    Before an inference, tokens [0, To - 1 + d) are clean (committed) and the rest sit in rungs of
    `group` tokens (default Ta) at levels (g + 1) / G (`token_times.ladder_levels`); the inference
    moves every token to g / G, so rung 0 (the next `group` actions) comes out clean. The first
    chunk of an episode is denoised from noise onto the ladder with the policy's inference steps.
    """

    name = "streaming"

    def __init__(self, calls: int | None = None, group: int | None = None):
        for name, value in (("calls", calls), ("group", group)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ControlError(f"streaming: {name} must be an int >= 1 or None, got {value!r}")
        self.calls, self.group = calls, group

    def calls_per_inference(self, policy, layout: ChunkLayout, delay: int, steps: int | None) -> int:
        """`calls`, or by default ceil(steps / G): each token then gets about the policy's number
        of denoising steps on its way from 1 to 0 through the G rungs."""
        if self.calls is not None:
            return self.calls
        _, rungs = ladder_levels(layout.pred_horizon, layout.committed(delay).stop, self.group or layout.action_horizon)
        return max(1, math.ceil(_steps(policy, steps) / rungs))

    def targets(self, layout: ChunkLayout, delay: int, dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
        """Levels `(Tp,)` before and after one inference at delay d."""
        group = self.group or layout.action_horizon
        before, rungs = ladder_levels(layout.pred_horizon, layout.committed(delay).stop, group)
        after = (before - 1.0 / rungs).clamp(min=0.0)
        return before.to(dtype=dtype, device=device), after.to(dtype=dtype, device=device)

    def _cold(self, policy, layout, obs, noise, delay, generator, steps):
        """The first buffer: denoised from noise onto the ladder with the policy's inference steps."""
        _, after = self.targets(layout, delay, noise.dtype, noise.device)
        after = after.expand(noise.shape[0], -1)
        cond = policy.encode_obs(obs, generator)
        state = denoise_between(policy, cond, noise, torch.ones_like(after), after, _steps(policy, steps), generator)
        return Generated(policy.unnormalize_action(state), state, after, _steps(policy, steps))

    def _warm(self, policy, layout, cond, noise, delay, previous, generator, steps):
        _, after = self.targets(layout, delay, noise.dtype, noise.device)
        state, _ = align_previous(previous.state, previous.shift)
        levels, valid = align_previous(previous.levels.unsqueeze(-1), previous.shift)
        levels, fresh = levels.squeeze(-1), ~valid
        state = torch.where(fresh[None, :, None], noise, state)
        levels = torch.where(fresh[None, :], torch.ones_like(levels), levels)
        target = torch.minimum(levels, after.expand_as(levels))
        calls = self.calls_per_inference(policy, layout, delay, steps)
        return denoise_between(policy, cond, state, levels, target, calls, generator), target, calls


def denoise_between(policy, cond: torch.Tensor, x: torch.Tensor, t_from: torch.Tensor, t_to: torch.Tensor,
                    calls: int, generator: torch.Generator | None) -> torch.Tensor:
    """Move every token from level t_from to t_to `(B, Tp)` (t_to <= t_from) in `calls` equal steps of
    the policy's process (its denoiser `policy.backbone`, its step `policy.process.step`).

    Tokens with t_from == t_to come back bit-exactly. Returns the state `(B, Tp, Da)` at t_to. The
    step noise comes from `generator`, one standard normal draw per call like the core sampler.
    """
    if bool((t_to > t_from).any()) or bool((t_to < 0).any()) or bool((t_from > 1).any()):
        raise ControlError("denoise_between: expected 0 <= t_to <= t_from <= 1 for every token")
    with values_checked():
        for k in range(calls):
            t = t_from - (t_from - t_to) * (k / calls)
            s = t_to if k == calls - 1 else t_from - (t_from - t_to) * ((k + 1) / calls)
            out = policy.backbone(x, t, cond)
            step_noise = torch.randn(x.shape, generator=generator, dtype=x.dtype,
                                     device=generator.device if generator is not None else x.device).to(x.device)
            x = policy.process.step(x, t, s, out, noise=step_noise)[0]
    return x


class WarmStartMode(ChunkMode):
    """Real-time iteration: the shifted previous chunk renoised to `level`, then ceil(level * steps)
    steps. `binary_dims`: action dimensions that are binary (grippers), snapped to -1 / +1 in
    normalized units (the midpoint of their range) in the guess. At level 1 the guess is unused and
    the start is the noise itself: exactly cold sampling."""

    name = "warmstart"

    def __init__(self, level: float = 0.5, binary_dims: tuple[int, ...] = ()):
        if not (isinstance(level, (int, float)) and 0.0 < level <= 1.0):
            raise ControlError(f"warmstart: level must be in (0, 1], got {level!r}")
        self.level, self.binary_dims = float(level), tuple(binary_dims)

    def _warm(self, policy, layout, cond, noise, delay, previous, generator, steps):
        guess, _ = align_previous(previous.state, previous.shift)
        if self.binary_dims:
            dims = list(self.binary_dims)
            if max(dims) >= guess.shape[-1] or min(dims) < 0:
                raise ControlError(f"warmstart: binary dims {dims} out of range for {guess.shape[-1]} action dims")
            guess = guess.clone()
            guess[..., dims] = torch.where(guess[..., dims] >= 0, 1.0, -1.0).to(guess.dtype)
        run = max(1, math.ceil(_steps(policy, steps) * self.level - 1e-9))
        if self.level == 1.0:
            x_init = noise
        else:
            t = torch.full(noise.shape[:2], self.level, dtype=noise.dtype, device=noise.device)
            x_init = policy.process.corrupt(guess, t, noise)
        x0 = policy.sample_normalized(cond, run, x_init=x_init, t_start=self.level, generator=generator).x0
        return x0, _clean(x0), run


def make_mode(name: str, **options) -> ChunkMode:
    """The mode called `name` (one of `MODES`) with its options (e.g. `calls`, `level`, `decay`)."""
    classes = {"sync": SyncMode, "ensemble": EnsembleMode, "rtc": RTCMode, "prefix": PrefixMode,
               "streaming": StreamingMode, "warmstart": WarmStartMode}
    if name not in classes:
        raise ControlError(f"unknown controller mode {name!r}; expected one of {list(MODES)}")
    try:
        return classes[name](**options)
    except TypeError as err:
        raise ControlError(f"controller mode {name!r}: {err}") from None
