"""Processes: the forward corruption and the reverse step, with per-token time.

Shapes: tokens x are `(B, L, D)`; times t, s are `(B, L)` (one level per token, broadcast over D);
t = 0 is clean data, t = 1 is pure noise. Both processes write x_t = alpha(t) x0 + sigma(t) noise:

- `GaussianDiffusion(schedule, prediction, eta, clip_x0)`: variance preserving, (alpha, sigma) from
  a `NoiseSchedule`; the network predicts "epsilon" (the noise), "sample" (x0) or "v"
  (alpha noise - sigma x0). The reverse step is DDIM with eta (eta = 1: DDPM ancestral step with
  the posterior variance; eta = 0: deterministic DDIM).
- `FlowMatching(std)`: the linear path alpha = 1 - t, sigma = t; the network predicts the velocity
  dx/dt = noise - x0. The reverse step is Euler, optionally with Gaussian noise of an explicit std
  (ReinFlow-style).

Every step from level t to level s <= t is a Gaussian N(mean, std^2) (std = 0: deterministic), so
`gaussian_log_prob` / `Process.transition_log_prob` give the log-probability of a recorded
transition (DPPO, ReinFlow). A token with t == s comes back bit-exactly unchanged with std 0.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from diffpolicy.core.checking import must_check_values
from diffpolicy.core.errors import CoreConfigError, CoreInputError
from diffpolicy.core.schedules import NoiseSchedule, check_time
from diffpolicy.errors import InvalidTypeError

PREDICTIONS = ("epsilon", "sample", "v")


class StepResult(NamedTuple):
    """One reverse step: x_s = mean + std * noise, all `(B, L, D)`."""

    x_s: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor


def check_x(x: torch.Tensor, where: str, x_name: str = "x_t") -> None:
    """Raise unless x is a floating `(B, L, D)` tensor."""
    if not isinstance(x, torch.Tensor):
        raise InvalidTypeError(f"{where}: {x_name} must be a torch.Tensor (B, L, D), got {type(x).__name__}")
    if not x.is_floating_point():
        raise InvalidTypeError(f"{where}: {x_name} must be a floating-point tensor, got dtype {x.dtype}")
    if x.dim() != 3:
        raise CoreInputError(f"{where}: {x_name} must have shape (B, L, D), got {tuple(x.shape)}")


def check_tokens(x: torch.Tensor, t: torch.Tensor, where: str, x_name: str = "x_t", t_name: str = "t") -> None:
    """Raise unless x is a floating `(B, L, D)` tensor and t a `(B, L)` tensor of times in [0, 1]."""
    check_x(x, where, x_name)
    if not isinstance(t, torch.Tensor) or tuple(t.shape) != tuple(x.shape[:2]):
        got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise CoreInputError(f"{where}: {t_name} must have shape (B, L) = {tuple(x.shape[:2])} "
                             f"matching {x_name} {tuple(x.shape)}, got {got}")
    check_time(t, f"{where}: {t_name}")


def check_like(y: torch.Tensor, x: torch.Tensor, where: str, y_name: str, x_name: str = "x_t") -> None:
    """Raise unless y is a tensor with the same shape as x."""
    if not isinstance(y, torch.Tensor) or y.shape != x.shape:
        got = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
        raise CoreInputError(f"{where}: {y_name} must have the shape of {x_name} {tuple(x.shape)}, got {got}")


def _over_sigma(numerator: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """numerator / sigma, and 0 where sigma == 0 (t = 0), with finite gradients everywhere."""
    positive = sigma > 0
    return torch.where(positive, numerator / torch.where(positive, sigma, torch.ones_like(sigma)),
                       torch.zeros_like(numerator))


def _ddim_from_variance(x0: torch.Tensor, noise: torch.Tensor, alpha_s: torch.Tensor, sigma_s: torch.Tensor,
                        var: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """DDIM's step to s given the x0 and noise estimates and the step's variance (clamped at 0):
    mean = alpha_s x0 + sqrt(sigma_s^2 - var) noise, std = sqrt(var)."""
    var = var.clamp(min=0.0)
    return alpha_s * x0 + (sigma_s ** 2 - var).clamp(min=0.0).sqrt() * noise, var.sqrt()


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor | float) -> torch.Tensor:
    """log N(x; mean, std^2) summed over every entry with std > 0, per batch element.

    Args:
        x, mean: `(B, ...)`, the same shape.
        std: broadcastable to x; entries with std == 0 (deterministic) are left out of the sum.
    Returns:
        `(B,)`.
    """
    if not isinstance(x, torch.Tensor) or not isinstance(mean, torch.Tensor) or x.shape != mean.shape:
        raise CoreInputError(f"gaussian_log_prob: x and mean must be tensors of the same shape, got "
                             f"{getattr(x, 'shape', type(x).__name__)} and "
                             f"{getattr(mean, 'shape', type(mean).__name__)}")
    std = torch.as_tensor(std, dtype=x.dtype, device=x.device)
    try:
        std = std.expand_as(x)
    except RuntimeError:
        raise CoreInputError(f"gaussian_log_prob: std of shape {tuple(std.shape)} does not broadcast to "
                             f"x {tuple(x.shape)}") from None
    if must_check_values() and bool((std < 0).any()):
        raise CoreInputError("gaussian_log_prob: std must be >= 0")
    random = std > 0
    safe_std = torch.where(random, std, torch.ones_like(std))
    log_p = -0.5 * ((x - mean) / safe_std) ** 2 - torch.log(safe_std) - 0.5 * math.log(2 * math.pi)
    return torch.where(random, log_p, torch.zeros_like(log_p)).flatten(1).sum(1)


class Process:
    """Common API of the processes (see the module docstring). Subclasses define the coefficients,
    the parameterization (`_x0`, `_noise`, `_output`, `_target`) and the step (`_mean_std`).

    Attribute `prediction`: what the network outputs ("epsilon", "sample", "v", or "velocity").
    """

    prediction: str

    # --- to be defined by a subclass ------------------------------------------------------------
    def _coefficients(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(alpha, sigma) shaped like t (already validated)."""
        raise NotImplementedError

    def _x0(self, x_t, alpha, sigma, out):
        raise NotImplementedError

    def _noise(self, x_t, alpha, sigma, out):
        raise NotImplementedError

    def _output(self, x_t, alpha, sigma, x0):
        raise NotImplementedError

    def _target(self, x0, noise, alpha, sigma):
        raise NotImplementedError

    def _mean_std(self, x_t, t, s, out, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean `(B, L, D)` and std (broadcastable to it) of the step, for t > s everywhere."""
        raise NotImplementedError

    # --- shared helpers -------------------------------------------------------------------------
    def _coeffs3(self, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(alpha, sigma) as `(B, L, 1)` in the dtype of `like`."""
        alpha, sigma = self._coefficients(t)
        return alpha.to(like.dtype).unsqueeze(-1), sigma.to(like.dtype).unsqueeze(-1)

    def _where(self, name: str) -> str:
        return f"{type(self).__name__}.{name}"

    # --- public API -----------------------------------------------------------------------------
    def alpha_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(alpha(t), sigma(t)), each shaped like t (any shape), with x_t = alpha x0 + sigma noise."""
        check_time(t, f"{self._where('alpha_sigma')}: t")
        return self._coefficients(t)

    def corrupt(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = alpha(t) x0 + sigma(t) noise. x0, noise `(B, L, D)`, t `(B, L)` -> `(B, L, D)`."""
        check_tokens(x0, t, self._where("corrupt"), "x0")
        check_like(noise, x0, self._where("corrupt"), "noise", "x0")
        alpha, sigma = self._coeffs3(t, x0)
        return alpha * x0 + sigma * noise

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The training target of the network for `corrupt(x0, t, noise)`. -> `(B, L, D)`."""
        check_tokens(x0, t, self._where("target"), "x0")
        check_like(noise, x0, self._where("target"), "noise", "x0")
        return self._target(x0, noise, *self._coeffs3(t, x0))

    def predict_x0(self, x_t: torch.Tensor, t: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """The x0 estimate from the network output (unclipped). -> `(B, L, D)`."""
        check_tokens(x_t, t, self._where("predict_x0"))
        check_like(out, x_t, self._where("predict_x0"), "out")
        return self._x0(x_t, *self._coeffs3(t, x_t), out)

    def predict_noise(self, x_t: torch.Tensor, t: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """The noise estimate from the network output; 0 where t = 0 (noise undetermined). -> `(B, L, D)`."""
        check_tokens(x_t, t, self._where("predict_noise"))
        check_like(out, x_t, self._where("predict_noise"), "out")
        return self._noise(x_t, *self._coeffs3(t, x_t), out)

    def output_from_x0(self, x_t: torch.Tensor, t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """The network output that `predict_x0` maps to x0 (its inverse); 0 where t = 0 for outputs
        that are undetermined there (epsilon, v, velocity). -> `(B, L, D)`."""
        check_tokens(x_t, t, self._where("output_from_x0"))
        check_like(x0, x_t, self._where("output_from_x0"), "x0")
        return self._output(x_t, *self._coeffs3(t, x_t), x0)

    def transition(self, x_t: torch.Tensor, t: torch.Tensor, s: torch.Tensor, out: torch.Tensor,
                   **step_kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and std `(B, L, D)` of the Gaussian step from level t to level s <= t (per token).

        Tokens with t == s get mean = x_t (bit-exact) and std = 0. `step_kwargs`: `eta` for
        `GaussianDiffusion`, `std` for `FlowMatching`.
        """
        _, mean, std = self._transition(x_t, t, s, out, "transition", step_kwargs)
        return mean, std

    def step(self, x_t: torch.Tensor, t: torch.Tensor, s: torch.Tensor, out: torch.Tensor,
             noise: torch.Tensor | None = None, **step_kwargs) -> StepResult:
        """One reverse step x_t -> x_s = mean + std * noise.

        Args:
            x_t: `(B, L, D)`; t, s: `(B, L)` with 0 <= s <= t <= 1; out: network output `(B, L, D)`.
            noise: standard normal `(B, L, D)`; required when any std > 0.
            step_kwargs: `eta` (GaussianDiffusion) or `std` (FlowMatching), overriding the process's.
        Returns:
            StepResult(x_s, mean, std), each `(B, L, D)`; tokens with t == s are x_t bit-exactly, std 0.
        """
        active, mean, std = self._transition(x_t, t, s, out, "step", step_kwargs)
        if noise is None:
            if bool((std > 0).any()):
                raise CoreInputError(f"{self._where('step')}: the step is stochastic (std > 0) but noise is None; "
                                     "pass standard normal noise of the shape of x_t")
            return StepResult(mean, mean, std)
        check_like(noise, x_t, self._where("step"), "noise")
        x_s = torch.where(active, mean + std * noise, x_t)
        return StepResult(x_s, mean, std)

    def transition_log_prob(self, x_t: torch.Tensor, t: torch.Tensor, s: torch.Tensor, out: torch.Tensor,
                            x_s: torch.Tensor, std_floor: float = 0.0, **step_kwargs) -> torch.Tensor:
        """log-probability `(B,)` of a recorded transition x_t -> x_s under network output `out`
        (e.g. of a fine-tuned model).

        std_floor: the std of every moving token (t > s) is clamped to at least this value (DPPO
        uses 0.1), which also turns deterministic moves (DDIM, the last DDPM step to s = 0) into
        Gaussians of std `std_floor`. Tokens with t == s never count.
        """
        if not (isinstance(std_floor, (int, float)) and std_floor >= 0):
            raise CoreConfigError(f"{self._where('transition_log_prob')}: std_floor must be >= 0, got {std_floor!r}")
        active, mean, std = self._transition(x_t, t, s, out, "transition_log_prob", step_kwargs)
        check_like(x_s, x_t, self._where("transition_log_prob"), "x_s")
        if std_floor > 0:
            std = torch.where(active, std.clamp(min=std_floor), std)
        return gaussian_log_prob(x_s, mean, std)

    def _transition(self, x_t, t, s, out, name, step_kwargs):
        where = self._where(name)
        check_tokens(x_t, t, where)
        check_tokens(x_t, s, where, t_name="s")
        check_like(out, x_t, where, "out")
        if must_check_values():
            later = s > t
            if bool(later.any()):
                index = tuple(int(i) for i in later.nonzero()[0])
                raise CoreInputError(f"{where}: a reverse step needs s <= t, got s = {float(s[index])} > "
                                     f"t = {float(t[index])} at index {index}")
        active = (t > s).unsqueeze(-1)
        # Tokens that do not move are computed as a dummy 1 -> 0 step (finite values and gradients)
        # and replaced by x_t.
        t_move = torch.where(t > s, t, torch.ones_like(t))
        s_move = torch.where(t > s, s, torch.zeros_like(s))
        mean, std = self._mean_std(x_t, t_move, s_move, out, **step_kwargs)
        mean = torch.where(active, mean, x_t)
        std = torch.where(active, std, torch.zeros_like(std)).expand_as(x_t)
        return active, mean, std


class GaussianDiffusion(Process):
    """Variance-preserving Gaussian diffusion with DDPM / DDIM steps.

    Args:
        schedule: a `NoiseSchedule`.
        prediction: "epsilon" (out = noise), "sample" (out = x0) or "v" (out = alpha noise - sigma x0).
        eta: in [0, 1]; the DDIM stochasticity of `step` (1 = DDPM posterior variance, 0 = deterministic).
        clip_x0: if set (> 0), `step` clamps the x0 estimate to [-clip_x0, clip_x0] (Diffusion
            Policy clips to [-1, 1]) and recomputes the noise estimate from it and x_t.

    Step from t to s (DDIM, Song et al. 2021, eq. 12), with x0_hat, eps_hat from the output:
        std^2 = eta^2 (sigma_s^2 / sigma_t^2) (1 - alpha_t^2 / alpha_s^2)
        mean  = alpha_s x0_hat + sqrt(sigma_s^2 - std^2) eps_hat
    With eta = 1 this is the DDPM posterior q(x_s | x_t, x0_hat); a step to s = 0 returns x0_hat.
    """

    def __init__(self, schedule: NoiseSchedule, prediction: str = "epsilon", eta: float = 1.0,
                 clip_x0: float | None = None):
        if not isinstance(schedule, NoiseSchedule):
            raise InvalidTypeError(f"GaussianDiffusion: schedule must be a NoiseSchedule, got {type(schedule).__name__}")
        if prediction not in PREDICTIONS:
            raise CoreConfigError(f"GaussianDiffusion: unknown prediction {prediction!r}; "
                                  f"expected one of {PREDICTIONS}")
        self._check_eta(eta)
        if clip_x0 is not None and not (isinstance(clip_x0, (int, float)) and clip_x0 > 0):
            raise CoreConfigError(f"GaussianDiffusion: clip_x0 must be None or a number > 0, got {clip_x0!r}")
        self.schedule, self.prediction, self.eta = schedule, prediction, float(eta)
        self.clip_x0 = None if clip_x0 is None else float(clip_x0)

    @staticmethod
    def _check_eta(eta) -> None:
        if not (isinstance(eta, (int, float)) and 0.0 <= eta <= 1.0):
            raise CoreConfigError(f"GaussianDiffusion: eta must be a number in [0, 1], got {eta!r}")

    def __repr__(self) -> str:
        return (f"GaussianDiffusion({self.schedule!r}, prediction={self.prediction!r}, eta={self.eta}, "
                f"clip_x0={self.clip_x0})")

    def _coefficients(self, t):
        return self.schedule.alpha_sigma(t)

    def _x0(self, x_t, alpha, sigma, out):
        if self.prediction == "epsilon":
            return (x_t - sigma * out) / alpha
        if self.prediction == "sample":
            return out
        return alpha * x_t - sigma * out

    def _noise(self, x_t, alpha, sigma, out):
        if self.prediction == "epsilon":
            return out
        if self.prediction == "sample":
            return _over_sigma(x_t - alpha * out, sigma)
        return sigma * x_t + alpha * out

    def _output(self, x_t, alpha, sigma, x0):
        if self.prediction == "epsilon":
            return _over_sigma(x_t - alpha * x0, sigma)
        if self.prediction == "sample":
            return x0
        return _over_sigma(alpha * x_t - x0, sigma)

    def _target(self, x0, noise, alpha, sigma):
        if self.prediction == "epsilon":
            return noise
        if self.prediction == "sample":
            return x0
        return alpha * noise - sigma * x0

    def _mean_std(self, x_t, t, s, out, eta: float | None = None):
        if eta is None:
            eta = self.eta
        self._check_eta(eta)
        alpha_t, sigma_t = self._coeffs3(t, x_t)
        alpha_s, sigma_s = self._coeffs3(s, x_t)
        x0 = self._x0(x_t, alpha_t, sigma_t, out)
        if self.clip_x0 is None:
            noise = self._noise(x_t, alpha_t, sigma_t, out)
        else:
            x0 = x0.clamp(-self.clip_x0, self.clip_x0)
            noise = (x_t - alpha_t * x0) / sigma_t  # sigma_t > 0: t > s >= 0 here
        var = (eta ** 2) * (sigma_s / sigma_t) ** 2 * (1.0 - (alpha_t / alpha_s) ** 2)
        return _ddim_from_variance(x0, noise, alpha_s, sigma_s, var)


class FlowMatching(Process):
    """Flow matching on the linear path x_t = (1 - t) x0 + t noise (alpha = 1 - t, sigma = t).

    The network predicts the velocity v = dx_t/dt = noise - x0; x0 = x_t - t v.
    Step from t to s: mean = x_t + (s - t) v (Euler); x_s = mean + std * noise, where std is given
    explicitly (not scaled by the step size): None / 0 = deterministic Euler, a float, or a tensor
    broadcastable to `(B, L, D)` (ReinFlow's learned noise, x_{k+1} = x_k + v dt + sigma_theta eps).

    Or `step(..., eta=e)`: the DDIM step of the same path (alpha = 1 - t, sigma = t) with
    x0_hat = x_t - t v and noise_hat = x_t + (1 - t) v:
        std^2 = e^2 (sigma_s / sigma_t)^2 (sigma_t^2 - (alpha_t / alpha_s)^2 sigma_s^2)
        mean  = alpha_s x0_hat + sqrt(sigma_s^2 - std^2) noise_hat
    e = 0 is the Euler step; e = 1 the posterior q(x_s | x_t, x0_hat), whose noise the later steps
    draw back towards the model's marginals (ancestral sampling), where Euler plus a std keeps it.

    Args:
        std: default step std (None = deterministic); `step(..., std=...)` overrides it per call.
    """

    prediction = "velocity"

    def __init__(self, std: float | None = None):
        if std is not None and not (isinstance(std, (int, float)) and std >= 0):
            raise CoreConfigError(f"FlowMatching: std must be None or a number >= 0, got {std!r}")
        self.std = None if std is None else float(std)

    def __repr__(self) -> str:
        return f"FlowMatching(std={self.std})"

    def _coefficients(self, t):
        return 1.0 - t, t

    def _x0(self, x_t, alpha, sigma, out):
        return x_t - sigma * out

    def _noise(self, x_t, alpha, sigma, out):
        return x_t + alpha * out

    def _output(self, x_t, alpha, sigma, x0):
        return _over_sigma(x_t - x0, sigma)

    def _target(self, x0, noise, alpha, sigma):
        return noise - x0

    def _mean_std(self, x_t, t, s, out, std: float | torch.Tensor | None = None, eta: float | None = None):
        if eta is not None:
            if std is not None:
                raise CoreConfigError("FlowMatching.step: give a std or an eta, not both")
            return self._ddim_mean_std(x_t, t, s, out, eta)
        if std is None:
            std = self.std
        if std is None:
            std = 0.0
        if isinstance(std, torch.Tensor):
            try:
                std = std.to(x_t.dtype).expand_as(x_t)
            except RuntimeError:
                raise CoreInputError(f"FlowMatching.step: std of shape {tuple(std.shape)} does not broadcast "
                                     f"to x_t {tuple(x_t.shape)}") from None
            if must_check_values() and bool((std < 0).any()):
                raise CoreInputError("FlowMatching.step: std must be >= 0 everywhere")
        elif not (isinstance(std, (int, float)) and std >= 0):
            raise CoreConfigError(f"FlowMatching.step: std must be None, a number >= 0 or a tensor, got {std!r}")
        else:
            std = torch.full_like(x_t, float(std))
        mean = x_t + (s - t).to(x_t.dtype).unsqueeze(-1) * out
        return mean, std

    def _ddim_mean_std(self, x_t, t, s, out, eta: float):
        if not (isinstance(eta, (int, float)) and 0.0 <= eta <= 1.0):
            raise CoreConfigError(f"FlowMatching.step: eta must be a number in [0, 1], got {eta!r}")
        alpha_t, sigma_t = self._coeffs3(t, x_t)
        alpha_s, sigma_s = self._coeffs3(s, x_t)  # alpha_s > 0: s < t <= 1 for every moving token
        x0, noise = self._x0(x_t, alpha_t, sigma_t, out), self._noise(x_t, alpha_t, sigma_t, out)
        var = (eta ** 2) * (sigma_s / sigma_t) ** 2 * (sigma_t ** 2 - (alpha_t / alpha_s * sigma_s) ** 2)
        mean, std = _ddim_from_variance(x0, noise, alpha_s, sigma_s, var)
        return mean, std.expand_as(x_t)
