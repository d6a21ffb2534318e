"""The sampling loop: one loop for every process, per-token start levels, optional guidance,
per-step noise control, and the recorded chain with its batched re-scoring.

Each token runs on its own uniform grid t_k = t_start (steps - k) / steps, k = 0..steps, from its
t_start down to 0; a token with t_start = 0 never changes (bit-exactly). Every step calls the
denoiser once (through the guidance hook if any) and takes the process's Gaussian transition,
shaped by a `StepNoise` (a std floor, a learned std) the same way in `sample` and in
`chain_log_prob`, so the policy that acted is exactly the policy that is scored (DPPO, ReinFlow).

Inputs are validated once per `sample` call; the steps run inside `checking.values_checked()`, so
no step reads a tensor value on the host (no host-device synchronisation in the loop).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from diffpolicy.core.checking import values_checked
from diffpolicy.core.errors import CoreConfigError, CoreInputError
from diffpolicy.core.guidance import Guidance
from diffpolicy.core.processes import (
    FlowMatching,
    GaussianDiffusion,
    Process,
    StepResult,
    check_tokens,
    check_x,
    gaussian_log_prob,
)
from diffpolicy.core.schedules import check_time
from diffpolicy.errors import InvalidTypeError

Denoiser = Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]
"""denoiser(x_t (B, L, D), t (B, L), cond) -> network output (B, L, D)."""

StdFunction = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, Any], torch.Tensor]
"""std_fn(x_t (B, L, D), t (B, L), s (B, L), cond) -> step std, broadcastable to (B, L, D)."""


@dataclass(frozen=True)
class StepNoise:
    """How much noise each reverse step adds, used identically when sampling and when scoring.

    Attributes:
        std_floor: every moving token's std is at least this (DPPO's exploration floor, 0.1);
            it turns deterministic moves (DDIM eta = 0, Euler, the last step to t = 0) into
            Gaussians of std `std_floor`. 0 keeps the process's std.
        std_fn: a learned std `std_fn(x_t, t, s, cond)` (ReinFlow's noise network, flow only),
            replacing the process's std before the floor.
        eta: DDIM stochasticity for `GaussianDiffusion` (None: the process's own) or `FlowMatching`
            (None: Euler with the std above).
    """

    std_floor: float = 0.0
    std_fn: StdFunction | None = None
    eta: float | None = None

    def __post_init__(self) -> None:
        if isinstance(self.std_floor, bool) or not (isinstance(self.std_floor, (int, float)) and self.std_floor >= 0):
            raise CoreConfigError(f"StepNoise: std_floor must be a number >= 0, got {self.std_floor!r}")
        if self.std_fn is not None and not callable(self.std_fn):
            raise CoreConfigError(f"StepNoise: std_fn must be callable, got {type(self.std_fn).__name__}")

    def check(self, process: Process, where: str) -> None:
        """Raise unless this noise control applies to `process`."""
        if self.std_fn is not None and not isinstance(process, FlowMatching):
            raise CoreConfigError(f"{where}: a learned std (StepNoise.std_fn) needs a FlowMatching process, "
                                  f"got {type(process).__name__}")
        if self.eta is not None and not isinstance(process, (GaussianDiffusion, FlowMatching)):
            raise CoreConfigError(f"{where}: StepNoise.eta needs a GaussianDiffusion or FlowMatching process, "
                                  f"got {type(process).__name__}")
        if self.eta is not None and self.std_fn is not None:
            raise CoreConfigError(f"{where}: StepNoise takes a learned std (std_fn) or an eta, not both")
        if self.std_floor > 0 and not isinstance(process, (GaussianDiffusion, FlowMatching)):
            raise CoreConfigError(f"{where}: StepNoise.std_floor needs a Gaussian process (GaussianDiffusion or "
                                  f"FlowMatching), got {type(process).__name__}")

    def step(self, process: Process, x_t: torch.Tensor, t: torch.Tensor, s: torch.Tensor, out: torch.Tensor,
             cond: Any, draw: torch.Tensor) -> StepResult:
        """One reverse step t -> s with this noise control: x_s = mean + std draw on the moving tokens.

        Without a floor or a learned std it is the process's own `step` (so discrete processes such
        as `MaskedDiffusion` run in the same loop); otherwise the Gaussian `transition` below.
        """
        if self.std_fn is None and self.std_floor == 0:
            return process.step(x_t, t, s, out, noise=draw, **({} if self.eta is None else {"eta": self.eta}))
        mean, std = self.transition(process, x_t, t, s, out, cond)
        return StepResult(torch.where((t > s).unsqueeze(-1), mean + std * draw, x_t), mean, std)

    def transition(self, process: Process, x_t: torch.Tensor, t: torch.Tensor, s: torch.Tensor,
                   out: torch.Tensor, cond: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and std `(B, L, D)` of the step t -> s; tokens with t == s: mean x_t, std 0."""
        kwargs: dict[str, Any] = {}
        if self.std_fn is not None:
            kwargs["std"] = self.std_fn(x_t, t, s, cond)
        if self.eta is not None:
            kwargs["eta"] = self.eta
        mean, std = process.transition(x_t, t, s, out, **kwargs)
        if self.std_floor > 0:
            std = torch.where((t > s).unsqueeze(-1), std.clamp(min=self.std_floor), std)
        return mean, std


DEFAULT_NOISE = StepNoise()


@dataclass
class Chain:
    """A recorded denoising chain, stacked (K steps, B batch elements, L tokens of size D).

    Attributes:
        x: `(B, K+1, L, D)`; x[:, 0] is the start state, x[:, K] the sample at t = 0.
        levels: `(B, K+1, L)`; levels[:, k] is the level of x[:, k] (levels[:, K] = 0).
        mean, std: `(B, K, L, D)`; step k draws x[:, k+1] ~ N(mean[:, k], std[:, k]^2).
        log_prob: `(B, K)`; log N(x[:, k+1]; mean[:, k], std[:, k]^2) over the entries with std > 0.
    """

    x: torch.Tensor
    levels: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    log_prob: torch.Tensor

    @property
    def steps(self) -> int:
        """K, the number of recorded steps."""
        return self.log_prob.shape[1]

    def index(self, rows: torch.Tensor | slice) -> Chain:
        """The chain of the batch elements `rows` (an index tensor or slice on dim 0)."""
        return Chain(self.x[rows], self.levels[rows], self.mean[rows], self.std[rows], self.log_prob[rows])


@dataclass
class SampleResult:
    """x0 `(B, L, D)`: the sample at t = 0; chain: the stacked `Chain` when recorded, else None."""

    x0: torch.Tensor
    chain: Chain | None


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


def _step_denoisers(denoiser: Denoiser | Sequence[Denoiser], steps: int) -> list[Denoiser]:
    """One denoiser per step: `denoiser` repeated, or a sequence of exactly `steps`."""
    if callable(denoiser):
        return [denoiser] * steps
    if isinstance(denoiser, Sequence) and len(denoiser) == steps and all(callable(d) for d in denoiser):
        return list(denoiser)
    got = f"a sequence of {len(denoiser)}" if isinstance(denoiser, Sequence) else type(denoiser).__name__
    raise CoreConfigError(f"sample: denoiser must be callable or a sequence of steps = {steps} callables, got {got}")


def sample(denoiser: Denoiser | Sequence[Denoiser], process: Process, x_init: torch.Tensor, steps: int,
           cond: Any = None, t_start: float | torch.Tensor = 1.0, guidance: Guidance | None = None,
           generator: torch.Generator | None = None, record: bool = False,
           noise: StepNoise = DEFAULT_NOISE) -> SampleResult:
    """Run the reverse process from x_init at level t_start down to t = 0.

    Args:
        denoiser: `denoiser(x_t (B, L, D), t (B, L), cond) -> (B, L, D)`, or a sequence of `steps`
            of them (step k uses denoiser[k]: e.g. a frozen base for the first K - K' steps and a
            fine-tuned copy for the last K').
        process: a `Process` (`GaussianDiffusion`, `FlowMatching`).
        x_init: `(B, L, D)`, the state at t_start (standard normal noise for t_start = 1; a renoised
            guess for a warm start).
        steps: number of steps, >= 1 (each token: `steps` equal steps from its t_start to 0).
        cond: passed through to the denoiser (and to `noise.std_fn`).
        t_start: a float, `(B,)` or `(B, L)` in [0, 1].
        guidance: a `Guidance`: `prepare` may change x_init / t_start; `model_output` produces the
            network output from the denoiser.
        generator: the source of all step noise (None: torch's global generator). Every step draws
            one standard normal tensor the shape of x_init, deterministic steps included, so the
            random stream does not depend on the process's settings.
        record: keep the stacked `Chain` (states, levels, means, stds, log-probabilities).
        noise: per-step noise control (`StepNoise`: std floor, learned std, eta).
    Returns:
        SampleResult(x0 `(B, L, D)`, chain).
    """
    check_x(x_init, "sample", "x_init")
    if not (isinstance(steps, int) and not isinstance(steps, bool) and steps >= 1):
        raise CoreConfigError(f"sample: steps must be an int >= 1, got {steps!r}")
    if not isinstance(process, Process):
        raise InvalidTypeError(f"sample: process must be a Process, got {type(process).__name__}")
    if not isinstance(noise, StepNoise):
        raise InvalidTypeError(f"sample: noise must be a StepNoise, got {type(noise).__name__}")
    noise.check(process, "sample")
    denoisers = _step_denoisers(denoiser, steps)
    t_start = start_levels(t_start, x_init)
    if guidance is not None:
        x_init, t_start = guidance.prepare(x_init, t_start)
        check_tokens(x_init, t_start, f"sample: after {type(guidance).__name__}.prepare", "x_init", "t_start")
    x = x_init
    xs, levels, means, stds, log_probs = [x], [t_start], [], [], []
    with values_checked():  # t_start is in [0, 1], so every grid level is, and s <= t on the grid
        for k in range(steps):
            t = t_start * ((steps - k) / steps)
            s = t_start * ((steps - k - 1) / steps)
            if guidance is None:
                out = denoisers[k](x, t, cond)
            else:
                out = guidance.model_output(denoisers[k], process, x, t, cond)
            draw = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
            x, mean, std = noise.step(process, x, t, s, out, cond, draw)
            if record:
                xs.append(x)
                levels.append(s)
                means.append(mean)
                stds.append(std)
                log_probs.append(gaussian_log_prob(x, mean, std))
    if not record:
        return SampleResult(x, None)
    chain = Chain(torch.stack(xs, 1), torch.stack(levels, 1), torch.stack(means, 1), torch.stack(stds, 1),
                  torch.stack(log_probs, 1))
    return SampleResult(x, chain)


def check_chain(chain: Any, where: str) -> None:
    """Raise unless `chain` is a `Chain` with consistent shapes."""
    if not isinstance(chain, Chain):
        raise InvalidTypeError(f"{where}: chain must be a Chain, got {type(chain).__name__}")
    if chain.x.dim() != 4:
        raise CoreInputError(f"{where}: chain.x must be (B, K+1, L, D), got {tuple(chain.x.shape)}")
    batch, k1, length, dim = chain.x.shape
    expected = {"levels": (batch, k1, length), "mean": (batch, k1 - 1, length, dim),
                "std": (batch, k1 - 1, length, dim), "log_prob": (batch, k1 - 1)}
    for name, shape in expected.items():
        if tuple(getattr(chain, name).shape) != shape:
            raise CoreInputError(f"{where}: chain.{name} must have shape {shape} to match chain.x "
                                 f"{tuple(chain.x.shape)}, got {tuple(getattr(chain, name).shape)}")


def chain_log_prob(denoiser: Denoiser, process: Process, chain: Chain, cond: torch.Tensor | None,
                   steps: Sequence[int] | None = None, noise: StepNoise = DEFAULT_NOISE,
                   tokens: slice | None = None) -> torch.Tensor:
    """Recompute the log-probability of recorded transitions under `denoiser`, in one batched pass.

    Args:
        chain: a recorded `Chain` (B batch elements, K steps).
        cond: `(B, ...)` tensor condition (repeated per scored step) or None.
        steps: which steps k to score (default all K), e.g. the last K' fine-tuned ones.
        noise: the `StepNoise` the chain was sampled with (the same floor / learned std).
        tokens: count only these tokens (e.g. DPPO's executed actions of a chunk); default all.
    Returns:
        `(B, len(steps))`: log N(x[:, k+1]; mean_theta(x[:, k]), std^2), differentiable in the
        denoiser's (and std_fn's) parameters. Without guidance this equals `chain.log_prob[:, steps]`
        for the denoiser that sampled the chain, up to the float rounding of running the network on
        B len(steps) rows instead of B (PPO therefore takes its old log-probabilities from this
        function too, so its ratio is exactly 1 before an update).
    """
    check_chain(chain, "chain_log_prob")
    noise.check(process, "chain_log_prob")
    batch, k1, length, dim = chain.x.shape
    steps = list(range(k1 - 1)) if steps is None else [int(k) for k in steps]
    if not steps or any(not 0 <= k < k1 - 1 for k in steps):
        raise CoreInputError(f"chain_log_prob: steps must be a non-empty list of indices in [0, {k1 - 1}), got {steps}")
    index = torch.tensor(steps, device=chain.x.device)
    n = len(steps)
    x_t = chain.x[:, index].reshape(batch * n, length, dim)
    x_s = chain.x[:, index + 1].reshape(batch * n, length, dim)
    t = chain.levels[:, index].reshape(batch * n, length)
    s = chain.levels[:, index + 1].reshape(batch * n, length)
    if cond is not None:
        if not isinstance(cond, torch.Tensor) or cond.shape[0] != batch:
            raise CoreInputError(f"chain_log_prob: cond must be a tensor (B = {batch}, ...), got "
                                 f"{tuple(cond.shape) if isinstance(cond, torch.Tensor) else type(cond).__name__}")
        cond = cond.repeat_interleave(n, dim=0)
    mean, std = noise.transition(process, x_t, t, s, denoiser(x_t, t, cond), cond)
    if tokens is not None:
        x_s, mean, std = x_s[:, tokens], mean[:, tokens], std[:, tokens]
    return gaussian_log_prob(x_s, mean, std).reshape(batch, n)
