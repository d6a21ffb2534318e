"""One small training loop for the generative models (AdamW, linear warm-up, optional cosine decay,
gradient clipping)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from diffpolicy.errors import InvalidValueError


@dataclass(frozen=True)
class FitResult:
    """losses: the loss of every step; seconds: wall-clock training time."""

    losses: list[float]
    seconds: float


def fit(model: nn.Module, batch_loss: Callable[[torch.Tensor, torch.Generator], torch.Tensor], num_examples: int,
        steps: int, batch_size: int = 64, lr: float = 1e-3, warmup: int = 100, seed: int = 0,
        cosine: bool = False) -> FitResult:
    """Train `model` for `steps` steps on minibatches of example indices drawn with replacement.

    Args:
        batch_loss: `(indices (batch,) int64, generator) -> scalar loss` of those examples.
        num_examples: the indices range over 0..num_examples-1.
        seed: seeds the one generator behind every draw (indices and the model's own noise).
        cosine: after the warm-up, decay the rate to 0 at `steps` along a cosine (else keep it).
    """
    for name, value, minimum in (("num_examples", num_examples, 1), ("steps", steps, 1),
                                 ("batch_size", batch_size, 1), ("warmup", warmup, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise InvalidValueError(f"fit: {name} must be an int >= {minimum}, got {value!r}")
    if not (isinstance(lr, (int, float)) and lr > 0):
        raise InvalidValueError(f"fit: lr must be a number > 0, got {lr!r}")
    generator = torch.Generator().manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)

    def factor(step: int) -> float:  # the rate of step `step` (0-based) over `lr`
        if step + 1 < warmup or not cosine:
            return min(1.0, (step + 1) / max(warmup, 1))
        return 0.5 * (1.0 + math.cos(math.pi * (step + 1 - warmup) / (steps + 1 - warmup)))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    model.train()
    losses, start = [], time.perf_counter()
    for _ in range(steps):
        indices = torch.randint(num_examples, (batch_size,), generator=generator)
        loss = batch_loss(indices, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        losses.append(float(loss.detach()))
    model.eval()
    return FitResult(losses, time.perf_counter() - start)
