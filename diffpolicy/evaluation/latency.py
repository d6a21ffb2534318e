"""Inference latency of a chunk policy: the median wall time of one `policy.sample` call."""

from __future__ import annotations

import statistics
import time
from typing import Any

import numpy as np
import torch


def chunk_latency_ms(policy: Any, history: dict[str, np.ndarray], repeats: int = 20, warmup: int = 2,
                     seed: int = 0) -> float:
    """Median wall ms to infer one chunk at batch 1 with the policy's default denoising steps.

    Args:
        policy: a `ChunkPolicy`.
        history: one observation history `{key: (To, ...)}`.
        repeats: timed calls; warmup: untimed calls first (allocation, caches).
    """
    obs = {key: torch.as_tensor(value)[None] for key, value in history.items()}
    generator = torch.Generator().manual_seed(seed)
    policy.eval()
    times = []
    for i in range(warmup + repeats):
        start = time.perf_counter()
        policy.sample(obs, generator=generator)
        if i >= warmup:
            times.append(1e3 * (time.perf_counter() - start))
    return statistics.median(times)
