"""Guidance: hooks the sampler calls to steer a sample.

A `Guidance` has two hooks (both optional; the base class passes through):
    prepare(x_init (B, L, D), t_start (B, L)) -> (x_init, t_start)      once, before sampling
    model_output(model_fn, process, x_t, t, cond) -> out (B, L, D)      every step
where `model_fn(x_t, t, cond)` is the denoiser (or the next inner guidance).

- `ClassifierFreeGuidance(scale, null_cond)`: out = uncond + scale (cond - uncond).
- `PrefixInpainting(prefix)`: the first P tokens are set to the prefix and held at t = 0, so they come
  back exactly (the training-time RTC variant / prefix conditioning).
- `GuidedInpainting(target, weights, max_weight)`: RTC-style soft inpainting through a
  vector-Jacobian product of the x0 prediction (Black et al. 2025), for any process.
- `ComposedGuidance([g1, g2, ...])`: g1 is applied closest to the model, the last one outermost.
- `rtc_prefix_weights(horizon, delay, exec_horizon)`: RTC's weights W for `GuidedInpainting`.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch

from diffpolicy.core.errors import CoreConfigError, CoreInputError
from diffpolicy.core.processes import Process, check_like, check_x
from diffpolicy.errors import InvalidStateError, InvalidTypeError

ModelFn = Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]


class Guidance:
    """The interface the sampler calls (see the module docstring); the base class changes nothing."""

    def prepare(self, x_init: torch.Tensor, t_start: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x_init `(B, L, D)`, t_start `(B, L)` -> possibly changed (new tensors; inputs untouched)."""
        return x_init, t_start

    def model_output(self, model_fn: ModelFn, process: Process, x_t: torch.Tensor, t: torch.Tensor,
                     cond: Any) -> torch.Tensor:
        """The network output `(B, L, D)` to step with at x_t `(B, L, D)`, t `(B, L)`."""
        return model_fn(x_t, t, cond)


class ClassifierFreeGuidance(Guidance):
    """out = uncond + scale (cond - uncond), uncond = model_fn(x_t, t, null_cond).

    When cond and null_cond are both tensors (null_cond broadcastable to cond, e.g. `(C,)` against
    `(B, C)`), both passes run as one batch of 2B; otherwise as two calls.
    """

    def __init__(self, scale: float, null_cond: Any):
        if not (isinstance(scale, (int, float)) and math.isfinite(scale)):
            raise CoreConfigError(f"ClassifierFreeGuidance: scale must be a finite number, got {scale!r}")
        self.scale, self.null_cond = float(scale), null_cond

    def model_output(self, model_fn, process, x_t, t, cond):
        if isinstance(cond, torch.Tensor) and isinstance(self.null_cond, torch.Tensor):
            try:
                null = self.null_cond.to(dtype=cond.dtype, device=cond.device).expand_as(cond)
            except RuntimeError:
                raise CoreInputError(f"ClassifierFreeGuidance: null_cond of shape {tuple(self.null_cond.shape)} "
                                     f"does not broadcast to cond {tuple(cond.shape)}") from None
            both = model_fn(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([cond, null]))
            conditional, unconditional = both.chunk(2)
        else:
            conditional, unconditional = model_fn(x_t, t, cond), model_fn(x_t, t, self.null_cond)
        return unconditional + self.scale * (conditional - unconditional)


class PrefixInpainting(Guidance):
    """Hard inpainting of a committed prefix: tokens [0, P) are set to `prefix` and held at t = 0.

    Args:
        prefix: `(B, P, D)` clean tokens (in the model's normalized space), P <= L.
    """

    def __init__(self, prefix: torch.Tensor):
        check_x(prefix, "PrefixInpainting", "prefix")
        self.prefix = prefix

    def prepare(self, x_init, t_start):
        batch, length, dim = x_init.shape
        p_batch, p_len, p_dim = self.prefix.shape
        if p_batch != batch or p_dim != dim or p_len > length:
            raise CoreInputError(f"PrefixInpainting: prefix (B, P, D) = {tuple(self.prefix.shape)} does not fit "
                                 f"x_init (B, L, D) = {tuple(x_init.shape)}; "
                                 f"expected B = {batch}, D = {dim}, P <= {length}")
        x_init, t_start = x_init.clone(), t_start.clone()
        x_init[:, :p_len] = self.prefix.to(x_init)
        t_start[:, :p_len] = 0.0
        return x_init, t_start


class GuidedInpainting(Guidance):
    """RTC-style guided inpainting (Black et al. 2025, "Real-time execution of action chunking flow
    policies"), for any process.

    Each step, with x0_hat = process.predict_x0(x_t, t, model_fn(x_t, t, cond)):
        correction = J^T [W * (Y - x0_hat)],    J = d x0_hat / d x_t   (a vector-Jacobian product)
        x0_guided  = x0_hat + g(t) correction,  g(t) = min((alpha^2 + sigma^2) / alpha, max_weight * sigma)
        out        = process.output_from_x0(x_t, t, x0_guided)
    with (alpha, sigma) = process.alpha_sigma(t). For `FlowMatching` (alpha = 1 - t, sigma = t) this is
    exactly RTC's velocity update in its own time tau = 1 - t (0 = noise there):
        v_rtc <- v_rtc + min(beta, w(tau)) correction,  w(tau) = ((1 - tau) / tau) (tau^2 + (1 - tau)^2) / (1 - tau)^2,
    since v_rtc = -v and x0_hat = x_t - t v. For variance-preserving diffusion the unclipped gain 1 / alpha is
    the same PiGDM guidance (score correction J^T W (Y - x0_hat) / r^2, r^2 = sigma^2 / (alpha^2 + sigma^2),
    mapped to x0 by Tweedie's sigma^2 / alpha), and the clip is RTC's, taken on the equivalent linear path.
    Tokens at t = 0 get no correction (sigma = 0).

    The vector-Jacobian product needs autograd: it runs under `torch.enable_grad()`, so sampling under
    `torch.no_grad()` works; it cannot work under `torch.inference_mode()` (inference tensors cannot
    be recorded), which raises a RuntimeError.

    Args:
        target: Y `(B, L, D)`, the previous chunk's not-yet-executed tokens aligned to the new chunk
            (entries where the weight is 0 are ignored).
        weights: W `(L,)` or `(B, L)`, >= 0 (`rtc_prefix_weights`).
        max_weight: beta, the clip on RTC's guidance weight (5 in Kinetix, 10 in LeRobot).
    """

    def __init__(self, target: torch.Tensor, weights: torch.Tensor, max_weight: float = 5.0):
        check_x(target, "GuidedInpainting", "target")
        batch, length = target.shape[:2]
        if not isinstance(weights, torch.Tensor) or tuple(weights.shape) not in ((length,), (batch, length)):
            raise CoreInputError(f"GuidedInpainting: weights must have shape (L,) = ({length},) or (B, L) = "
                                 f"{(batch, length)} to match target {tuple(target.shape)}, "
                                 f"got {getattr(weights, 'shape', type(weights).__name__)}")
        if bool((weights < 0).any()) or not bool(torch.isfinite(weights).all()):
            raise CoreInputError("GuidedInpainting: weights must be finite and >= 0")
        if not (isinstance(max_weight, (int, float)) and max_weight >= 0):
            raise CoreConfigError(f"GuidedInpainting: max_weight must be a number >= 0, got {max_weight!r}")
        self.target, self.max_weight = target, float(max_weight)
        self.weights = weights.expand(batch, length)

    def model_output(self, model_fn, process, x_t, t, cond):
        check_like(self.target, x_t, "GuidedInpainting", "target")
        if torch.is_inference_mode_enabled():
            raise InvalidStateError("GuidedInpainting needs autograd for its vector-Jacobian product and cannot run "
                               "under torch.inference_mode(); sample under torch.no_grad() instead")
        target = self.target.to(x_t)
        weights = self.weights.to(x_t).unsqueeze(-1)
        with torch.enable_grad():
            x = x_t.detach().requires_grad_(True)
            out = model_fn(x, t, cond)
            x0 = process.predict_x0(x, t, out)
            correction = None
            if x0.requires_grad:
                residual = (weights * (target - x0)).detach()
                (correction,) = torch.autograd.grad(x0, x, grad_outputs=residual, allow_unused=True)
        if correction is None:  # x0_hat does not depend on x_t (e.g. a constant "sample" model)
            correction = torch.zeros_like(x_t)
        alpha, sigma = process.alpha_sigma(t)
        gain = torch.minimum((alpha ** 2 + sigma ** 2) / alpha, self.max_weight * sigma).unsqueeze(-1)
        return process.output_from_x0(x_t, t, x0.detach() + gain.to(x_t.dtype) * correction)


class ComposedGuidance(Guidance):
    """Several guidances in order: `prepare` runs first to last; in `model_output` the first is applied
    closest to the model (e.g. [ClassifierFreeGuidance, GuidedInpainting] takes the VJP through the
    CFG-combined output)."""

    def __init__(self, guidances: Sequence[Guidance]):
        bad = [i for i, g in enumerate(guidances) if not isinstance(g, Guidance)]
        if bad:
            raise InvalidTypeError(f"ComposedGuidance: every element must be a Guidance, got "
                            f"{type(guidances[bad[0]]).__name__} at index {bad[0]}")
        self.guidances = list(guidances)

    def prepare(self, x_init, t_start):
        for guidance in self.guidances:
            x_init, t_start = guidance.prepare(x_init, t_start)
        return x_init, t_start

    def model_output(self, model_fn, process, x_t, t, cond):
        for guidance in self.guidances:
            model_fn = _wrapped(guidance, model_fn, process)
        return model_fn(x_t, t, cond)


def _wrapped(guidance: Guidance, inner: ModelFn, process: Process) -> ModelFn:
    return lambda x_t, t, cond: guidance.model_output(inner, process, x_t, t, cond)


def rtc_prefix_weights(horizon: int, delay: int, exec_horizon: int, dtype: torch.dtype = torch.float32,
                       device: torch.device | str | None = None) -> torch.Tensor:
    """RTC's soft-mask weights W `(horizon,)` (Black et al. 2025, eq. 5):

        W_i = 1                             for i < d          (executed while inference runs)
        W_i = c_i (e^{c_i} - 1) / (e - 1)   for d <= i < H - s, c_i = (H - s - i) / (H - s - d + 1)
        W_i = 0                             for i >= H - s     (beyond the previous chunk)

    Args:
        horizon: H, the chunk length (>= 1).
        delay: d >= 0, actions consumed while inference ran.
        exec_horizon: s >= 0, actions of the previous chunk executed before this inference started;
            d + s <= H (the previous chunk must cover the delay).
    """
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (horizon, delay, exec_horizon)):
        raise CoreConfigError(f"rtc_prefix_weights: horizon, delay and exec_horizon must be ints, got "
                              f"{horizon!r}, {delay!r}, {exec_horizon!r}")
    if not (horizon >= 1 and delay >= 0 and exec_horizon >= 0 and delay + exec_horizon <= horizon):
        raise CoreConfigError(f"rtc_prefix_weights: expected H >= 1, d >= 0, s >= 0 and d + s <= H, got "
                              f"H = {horizon}, d = {delay}, s = {exec_horizon}")
    end = horizon - exec_horizon
    i = torch.arange(horizon, dtype=torch.float64)
    c = ((end - i) / (end - delay + 1)).clamp(0.0, 1.0)
    decay = c * torch.expm1(c) / math.expm1(1.0)
    weights = torch.where(i < delay, torch.ones_like(i), torch.where(i < end, decay, torch.zeros_like(i)))
    return weights.to(dtype=dtype, device=device)
