"""Success-rate statistics: the point estimate with its 95 % Wilson score interval."""

from __future__ import annotations

import math
from dataclasses import dataclass

from diffpolicy.errors import InvalidTypeError, InvalidValueError

Z_95 = 1.959963984540054  # two-sided 95 % quantile of the standard normal


@dataclass(frozen=True)
class SuccessRate:
    """`successes` out of `n` episodes, with the Wilson interval [`low`, `high`]."""

    successes: int
    n: int
    rate: float
    low: float
    high: float

    def __str__(self) -> str:
        return f"{self.rate:.3f} [{self.low:.3f}, {self.high:.3f}] ({self.successes}/{self.n})"

    def to_dict(self) -> dict[str, float | int]:
        return {"successes": self.successes, "n": self.n, "rate": self.rate,
                "ci95_low": self.low, "ci95_high": self.high}


def wilson_interval(successes: int, n: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion.

    center = (p + z²/2n) / (1 + z²/n),  half = z / (1 + z²/n) · sqrt(p(1-p)/n + z²/4n²),
    with p = successes / n. Unlike the normal approximation it stays inside [0, 1] and is
    not degenerate at p = 0 or p = 1.
    """
    if isinstance(successes, bool) or isinstance(n, bool) or int(successes) != successes or int(n) != n:
        raise InvalidTypeError(f"wilson_interval: successes and n must be integers, got {successes!r} and {n!r}")
    if n <= 0:
        raise InvalidValueError(f"wilson_interval: need n >= 1 episodes, got n={n}")
    if not 0 <= successes <= n:
        raise InvalidValueError(f"wilson_interval: successes must be in [0, n={n}], got {successes}")
    p = successes / n
    z2 = z * z
    denom = 1.0 + z2 / n
    center = (p + z2 / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    # At p = 0 (p = 1) the lower (upper) bound is exactly 0 (1); in floating point center - half can
    # round to a tiny positive number above the rate itself.
    low = 0.0 if successes == 0 else max(0.0, center - half)
    high = 1.0 if successes == n else min(1.0, center + half)
    return low, high


def success_rate(successes: list[bool] | tuple[bool, ...]) -> SuccessRate:
    """The success rate of a list of per-episode outcomes with its 95 % Wilson interval."""
    n = len(successes)
    k = int(sum(bool(s) for s in successes))
    low, high = wilson_interval(k, n)
    return SuccessRate(successes=k, n=n, rate=k / n, low=low, high=high)
