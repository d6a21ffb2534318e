"""Variance-preserving noise schedules over continuous time t in [0, 1].

t = 0 is clean data, t = 1 is pure noise. A schedule gives the signal and noise scales
(alpha(t), sigma(t)) of x_t = alpha x0 + sigma noise, with alpha^2 + sigma^2 = 1, through the
log signal-to-noise ratio log_snr(t) = log(alpha^2 / sigma^2):

    alpha^2 = sigmoid(log_snr),  sigma^2 = sigmoid(-log_snr).

Kinds (`make_schedule(name, **kwargs)`):
    "linear":  `LinearBetaSchedule`, continuous-time DDPM with betas linear in the step index;
               alpha_bar(k / N) equals the discrete DDPM `alphas_cumprod[k - 1]` (k = 1..N).
    "cosine":  `CosineSchedule`, squared cosine (Nichol & Dhariwal 2021), offset s = 0.008.
    "sigmoid": `SigmoidSchedule` (Jabri et al. 2022 / Chen 2023), start -3, end 3, tau 1.

Shift (every kind): log_snr_shifted(t) = log_snr(t) - 2 log(shift). shift = 1 is the plain
schedule; shift > 1 lowers the SNR at every t (noisier, the "resolution shift" of SD3-style
samplers); shift < 1 makes it cleaner. t = 0 stays exactly clean (log_snr = +inf) for any shift.

Clamp: log_snr is clamped from below at `LOG_SNR_MIN` = -15, so alpha(1) = sqrt(sigmoid(-15))
~ 5.5e-4 > 0 and predictions of x0 that divide by alpha stay finite.

Everything is computed in float64 and returned in t's floating dtype.
"""

from __future__ import annotations

import math

import torch

from diffpolicy.core.checking import must_check_values
from diffpolicy.core.errors import CoreConfigError, CoreInputError
from diffpolicy.errors import InvalidTypeError

LOG_SNR_MIN = -15.0


def check_time(t: torch.Tensor, name: str = "t") -> None:
    """Raise unless `t` is a floating tensor with every entry finite and in [0, 1] (the range is
    not read inside `checking.values_checked()`)."""
    if not isinstance(t, torch.Tensor):
        raise InvalidTypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise InvalidTypeError(f"{name}: expected a floating-point tensor, got dtype {t.dtype}")
    if not must_check_values():
        return
    bad = ~((t >= 0) & (t <= 1))  # also catches NaN
    if bool(bad.any()):
        index = tuple(int(i) for i in bad.nonzero()[0])
        raise CoreInputError(
            f"{name}: expected every entry in [0, 1] (0 = clean, 1 = noise), "
            f"got {float(t[index])} at index {index}")


def _as_time(t: torch.Tensor | float) -> torch.Tensor:
    """A float becomes a 0-d tensor of the default dtype; the result is checked with `check_time`."""
    if not isinstance(t, torch.Tensor):
        t = torch.as_tensor(t, dtype=torch.get_default_dtype())
    check_time(t)
    return t


class NoiseSchedule:
    """Base class: a subclass defines `_alpha_bar(t)` returning (alpha^2, 1 - alpha^2) in float64.

    Args:
        shift: logSNR shift, > 0 (see the module docstring: shift > 1 means noisier).
    """

    name: str = ""

    def __init__(self, shift: float = 1.0):
        if not (isinstance(shift, (int, float)) and math.isfinite(shift) and shift > 0):
            raise CoreConfigError(f"{type(self).__name__}: shift must be a finite number > 0, got {shift!r}")
        self.shift = float(shift)

    def _alpha_bar(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def to_config(self) -> dict:
        """The keyword arguments that rebuild this schedule with `make_schedule(**config)`."""
        raise NotImplementedError

    def log_snr(self, t: torch.Tensor | float) -> torch.Tensor:
        """log(alpha^2 / sigma^2) at t (any shape), shifted and clamped; +inf at t = 0."""
        t = _as_time(t)
        return self._log_snr64(t).to(t.dtype)

    def alpha_sigma(self, t: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor]:
        """(alpha, sigma) at t (any shape), each shaped like t; alpha(0) = 1, sigma(0) = 0 exactly."""
        t = _as_time(t)
        lam = self._log_snr64(t)
        return torch.sigmoid(lam).sqrt().to(t.dtype), torch.sigmoid(-lam).sqrt().to(t.dtype)

    def _log_snr64(self, t: torch.Tensor) -> torch.Tensor:
        alpha_bar, one_minus = self._alpha_bar(t.to(torch.float64))
        lam = torch.log(alpha_bar) - torch.log(one_minus) - 2.0 * math.log(self.shift)
        return lam.clamp(min=LOG_SNR_MIN)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.to_config().items() if k != "name")
        return f"{type(self).__name__}({args})"


class LinearBetaSchedule(NoiseSchedule):
    """DDPM's linear betas in continuous time.

    The discrete schedule has betas b_i = beta_start + (beta_end - beta_start) i / (N - 1),
    i = 0..N-1, and alphas_cumprod[k - 1] = prod_{i < k} (1 - b_i). In continuous time the step
    index runs as x = N t - 1/2 and

        log alpha_bar(t) = N * integral_0^t log(1 - b(N u - 1/2)) du,

    the midpoint rule of that sum, in closed form; it matches the discrete product at t = k / N to
    about 1e-9 relative (log(1 - b) is nearly linear in i). The discrete DDPM timestep index j
    (0-based, as in diffusers) corresponds to t = (j + 1) / N.

    Args:
        beta_start, beta_end: 0 <= beta_start <= beta_end < 1.
        num_train_steps: N >= 2.
        shift: logSNR shift (module docstring).
    """

    name = "linear"

    def __init__(self, beta_start: float = 1e-4, beta_end: float = 0.02, num_train_steps: int = 1000,
                 shift: float = 1.0):
        super().__init__(shift)
        if not (0.0 <= beta_start <= beta_end < 1.0):
            raise CoreConfigError(
                f"LinearBetaSchedule: expected 0 <= beta_start <= beta_end < 1, "
                f"got beta_start={beta_start!r}, beta_end={beta_end!r}")
        if not (isinstance(num_train_steps, int) and num_train_steps >= 2):
            raise CoreConfigError(f"LinearBetaSchedule: num_train_steps must be an int >= 2, got {num_train_steps!r}")
        self.beta_start, self.beta_end, self.num_train_steps = float(beta_start), float(beta_end), num_train_steps
        if self._beta(1.0) >= 1.0:
            raise CoreConfigError(f"LinearBetaSchedule: beta at t = 1 is {self._beta(1.0)} >= 1")

    def _beta(self, t):
        n = self.num_train_steps
        return self.beta_start + (self.beta_end - self.beta_start) * (n * t - 0.5) / (n - 1)

    def _alpha_bar(self, t):
        n = self.num_train_steps
        slope = self.beta_end - self.beta_start
        if slope == 0.0:
            log_ab = n * t * math.log1p(-self.beta_start)
        else:
            def antiderivative(b):  # d/db [-(1 - b) log(1 - b) - b] = log(1 - b)
                return -(1.0 - b) * torch.log1p(-b) - b
            b0 = torch.as_tensor(self._beta(0.0), dtype=torch.float64)
            log_ab = (n - 1) / slope * (antiderivative(self._beta(t)) - antiderivative(b0))
        return torch.exp(log_ab), -torch.expm1(log_ab)

    def to_config(self) -> dict:
        return {"name": self.name, "beta_start": self.beta_start, "beta_end": self.beta_end,
                "num_train_steps": self.num_train_steps, "shift": self.shift}


class CosineSchedule(NoiseSchedule):
    """Squared cosine: alpha_bar(t) = cos^2(theta(t)) / cos^2(theta(0)), theta(t) = (t + s) / (1 + s) * pi / 2.

    alpha_bar(k / N) equals diffusers' "squaredcos_cap_v2" `alphas_cumprod[k - 1]` for k < N (its
    last beta is capped at 0.999; here t = 1 is the log_snr clamp instead).

    Args:
        s: small offset, >= 0 (0.008 in Nichol & Dhariwal).
        shift: logSNR shift (module docstring).
    """

    name = "cosine"

    def __init__(self, s: float = 0.008, shift: float = 1.0):
        super().__init__(shift)
        if not (isinstance(s, (int, float)) and 0.0 <= s < 1.0):
            raise CoreConfigError(f"CosineSchedule: expected 0 <= s < 1, got s={s!r}")
        self.s = float(s)

    def _alpha_bar(self, t):
        theta0 = self.s / (1.0 + self.s) * math.pi / 2
        theta = (t + self.s) / (1.0 + self.s) * math.pi / 2
        norm = math.cos(theta0) ** 2
        # 1 - alpha_bar = (cos^2 theta0 - cos^2 theta) / cos^2 theta0, in product form for precision.
        return torch.cos(theta) ** 2 / norm, torch.sin(theta - theta0) * torch.sin(theta + theta0) / norm

    def to_config(self) -> dict:
        return {"name": self.name, "s": self.s, "shift": self.shift}


class SigmoidSchedule(NoiseSchedule):
    """Sigmoid: alpha_bar(t) = (v_end - sigmoid((start + t (end - start)) / tau)) / (v_end - v_start),

    v_start = sigmoid(start / tau), v_end = sigmoid(end / tau) (Chen 2023, "On the importance of
    noise scheduling for diffusion models", Algorithm 1).

    Args:
        start < end, tau > 0: shape of the sigmoid.
        shift: logSNR shift (module docstring).
    """

    name = "sigmoid"

    def __init__(self, start: float = -3.0, end: float = 3.0, tau: float = 1.0, shift: float = 1.0):
        super().__init__(shift)
        if not (start < end and tau > 0):
            raise CoreConfigError(f"SigmoidSchedule: expected start < end and tau > 0, "
                                  f"got start={start!r}, end={end!r}, tau={tau!r}")
        self.start, self.end, self.tau = float(start), float(end), float(tau)

    def _alpha_bar(self, t):
        def curve(x):  # the same float64 operations at t = 0 as for v_start, so alpha_bar(0) = 1 exactly
            return torch.sigmoid((self.start + x * (self.end - self.start)) / self.tau)
        v_start, v_end = curve(torch.zeros((), dtype=torch.float64)), curve(torch.ones((), dtype=torch.float64))
        v = curve(t)
        return (v_end - v) / (v_end - v_start), (v - v_start) / (v_end - v_start)

    def to_config(self) -> dict:
        return {"name": self.name, "start": self.start, "end": self.end, "tau": self.tau, "shift": self.shift}


SCHEDULES: dict[str, type[NoiseSchedule]] = {
    cls.name: cls for cls in (LinearBetaSchedule, CosineSchedule, SigmoidSchedule)
}


def make_schedule(name: str, **kwargs) -> NoiseSchedule:
    """Build a schedule by name ("linear", "cosine", "sigmoid") with its keyword arguments."""
    if name not in SCHEDULES:
        raise CoreConfigError(f"make_schedule: unknown schedule {name!r}; expected one of {sorted(SCHEDULES)}")
    try:
        return SCHEDULES[name](**kwargs)
    except TypeError as err:  # an unexpected keyword
        raise CoreConfigError(f"make_schedule({name!r}): {err}") from None
