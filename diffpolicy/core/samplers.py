"""The sampling loop: one loop for every process, per-token start levels, optional guidance.

Each token runs on its own uniform grid t_k = t_start (steps - k) / steps, k = 0..steps, from its
t_start down to 0; a token with t_start = 0 never changes (bit-exactly). Every step calls the
denoiser once (through the guidance hook if any) and `process.step`.

Inputs are validated once per `sample` call; the steps run inside `checking.values_checked()`, so
no step reads a tensor value on the host (no host-device synchronisation in the loop).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from diffpolicy.core.checking import values_checked
from diffpolicy.core.errors import CoreConfigError, CoreInputError
from diffpolicy.core.guidance import Guidance
from diffpolicy.core.processes import Process, check_tokens, check_x, gaussian_log_prob
from diffpolicy.core.schedules import check_time
from diffpolicy.errors import InvalidTypeError

Denoiser = Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]
"""denoiser(x_t (B, L, D), t (B, L), cond) -> network output (B, L, D)."""


@dataclass
class ChainStep:
    """One recorded step x_t -> x_s: tensors `(B, L, D)` except t, s `(B, L)` and log_prob `(B,)`
    (log N(x_s; mean, std^2) over the entries with std > 0)."""

    x_t: torch.Tensor
    t: torch.Tensor
    s: torch.Tensor
    x_s: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    log_prob: torch.Tensor


@dataclass
class SampleResult:
    """x0 `(B, L, D)`: the sample at t = 0; chain: the steps in order when recorded, else None."""

    x0: torch.Tensor
    chain: list[ChainStep] | None


def start_levels(t_start: float | torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """t_start as a float, `(B,)` or `(B, L)` -> `(B, L)` in x's dtype and device (validated)."""
    batch, length = x.shape[:2]
    t_start = torch.as_tensor(t_start, dtype=x.dtype, device=x.device)
    if t_start.dim() == 0:
        t_start = t_start.expand(batch, length)
    elif tuple(t_start.shape) == (batch,):
        t_start = t_start.unsqueeze(1).expand(batch, length)
    elif tuple(t_start.shape) != (batch, length):
        raise CoreInputError(f"sample: t_start must be a float, (B,) = ({batch},) or (B, L) = {(batch, length)}, "
                             f"got shape {tuple(t_start.shape)}")
    check_time(t_start, "sample: t_start")
    return t_start


def sample(denoiser: Denoiser, process: Process, x_init: torch.Tensor, steps: int, cond: Any = None,
           t_start: float | torch.Tensor = 1.0, guidance: Guidance | None = None,
           generator: torch.Generator | None = None, record: bool = False) -> SampleResult:
    """Run the reverse process from x_init at level t_start down to t = 0.

    Args:
        denoiser: `denoiser(x_t (B, L, D), t (B, L), cond) -> (B, L, D)`.
        process: a `Process` (`GaussianDiffusion`, `FlowMatching`).
        x_init: `(B, L, D)`, the state at t_start (standard normal noise for t_start = 1; a renoised
            guess for a warm start).
        steps: number of steps, >= 1 (each token: `steps` equal steps from its t_start to 0).
        cond: passed through to the denoiser.
        t_start: a float, `(B,)` or `(B, L)` in [0, 1].
        guidance: a `Guidance`: `prepare` may change x_init / t_start; `model_output` produces the
            network output from the denoiser.
        generator: the source of all step noise (None: torch's global generator). Every step draws
            one standard normal tensor the shape of x_init, deterministic steps included, so the
            random stream does not depend on the process's settings.
        record: keep every step's x_t, t, s, x_s, mean, std and log_prob in `chain`.
    Returns:
        SampleResult(x0 `(B, L, D)`, chain).
    """
    check_x(x_init, "sample", "x_init")
    if not (isinstance(steps, int) and not isinstance(steps, bool) and steps >= 1):
        raise CoreConfigError(f"sample: steps must be an int >= 1, got {steps!r}")
    if not isinstance(process, Process):
        raise InvalidTypeError(f"sample: process must be a Process, got {type(process).__name__}")
    t_start = start_levels(t_start, x_init)
    if guidance is not None:
        x_init, t_start = guidance.prepare(x_init, t_start)
        check_tokens(x_init, t_start, f"sample: after {type(guidance).__name__}.prepare", "x_init", "t_start")
    x = x_init
    chain: list[ChainStep] | None = [] if record else None
    with values_checked():  # t_start is in [0, 1], so every grid level is, and s <= t on the grid
        for k in range(steps):
            t = t_start * ((steps - k) / steps)
            s = t_start * ((steps - k - 1) / steps)
            if guidance is None:
                out = denoiser(x, t, cond)
            else:
                out = guidance.model_output(denoiser, process, x, t, cond)
            noise = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
            x_s, mean, std = process.step(x, t, s, out, noise=noise)
            if chain is not None:
                chain.append(ChainStep(x, t, s, x_s, mean, std, gaussian_log_prob(x_s, mean, std)))
            x = x_s
    return SampleResult(x, chain)
