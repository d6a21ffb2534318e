"""The inference delay, in actions consumed while an inference ran, estimated robustly.

A running maximum never forgets a slow warm-up call (the first call compiles, allocates, fills
caches): it keeps skipping actions long after inference became fast (lerobot PR #4223). Here the
first `warmup` calls are not recorded at all, and the estimate is a quantile over the last `window`
calls only, so one slow call leaves the estimate after `window` more.
"""

from __future__ import annotations

import math
from collections import deque

from diffpolicy.control.errors import ControlError


class DelayEstimator:
    """Windowed quantile of observed delays (actions consumed per inference), warm-up excluded.

    Args:
        window: the last N recorded delays the estimate looks at (>= 1).
        quantile: q in [0, 1]; the estimate is the ceil of the q-quantile (nearest rank) of the window.
        warmup: how many first calls are ignored (>= 0).
    """

    def __init__(self, window: int = 8, quantile: float = 0.75, warmup: int = 1):
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ControlError(f"DelayEstimator: window must be an int >= 1, got {window!r}")
        if not (isinstance(quantile, (int, float)) and 0.0 <= quantile <= 1.0):
            raise ControlError(f"DelayEstimator: quantile must be in [0, 1], got {quantile!r}")
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
            raise ControlError(f"DelayEstimator: warmup must be an int >= 0, got {warmup!r}")
        self.quantile, self.warmup = float(quantile), warmup
        self.samples: deque[int] = deque(maxlen=window)
        self.calls = 0

    def record(self, consumed: int) -> None:
        """Record one inference during which `consumed` actions left the queue (an int >= 0)."""
        if isinstance(consumed, bool) or not isinstance(consumed, int) or consumed < 0:
            raise ControlError(f"DelayEstimator.record: consumed must be an int >= 0, got {consumed!r}")
        self.calls += 1
        if self.calls > self.warmup:
            self.samples.append(consumed)

    @property
    def estimate(self) -> int:
        """The delay to plan with: 0 before any recorded call, else the window's q-quantile."""
        if not self.samples:
            return 0
        ordered = sorted(self.samples)
        rank = max(1, math.ceil(self.quantile * len(ordered)))
        return ordered[rank - 1]
