"""The learning-rate schedule every training loop uses: a linear warm-up, then a cosine decay to
zero (or a constant rate), as a multiplier of the base rate for `torch.optim.lr_scheduler.LambdaLR`."""

from __future__ import annotations

import math
from collections.abc import Callable


def warmup_cosine(warmup_steps: int, total_steps: int, decay: bool = True) -> Callable[[int], float]:
    """The multiplier of step `step`: `step / warmup_steps` while `step < warmup_steps`, then
    `0.5 * (1 + cos(pi * progress))` with progress `(step - warmup_steps) / (total_steps - warmup_steps)`
    (clamped to 1, so 0 from `total_steps` on), or 1 after the warm-up when `decay` is False."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return step / max(1, warmup_steps)
        if not decay:
            return 1.0
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor
