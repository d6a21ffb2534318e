"""Embeddings of continuous time t in [0, 1] (t = 0 clean data, t = 1 pure noise)."""

from __future__ import annotations

import math

import torch
from torch import nn

from diffpolicy.nn.errors import NNConfigError


class SinusoidalTimeEmbedding(nn.Module):
    """Transformer-style sinusoidal features of `scale * t`: `(...,) -> (..., dim)`.

    Frequencies follow Diffusion Policy's `SinusoidalPosEmb`: `exp(-log(max_period) * k / (dim/2 - 1))`
    for `k = 0 .. dim/2 - 1`, first the sines then the cosines. `scale` (default 1000) stretches
    continuous t in [0, 1] over the range integer DDPM steps used to cover, so neighbouring noise
    levels get distinguishable embeddings.
    """

    def __init__(self, dim: int, scale: float = 1000.0, max_period: float = 10000.0):
        super().__init__()
        if dim < 4 or dim % 2:
            raise NNConfigError(f"SinusoidalTimeEmbedding: dim must be an even integer >= 4, got {dim}")
        self.dim = dim
        self.scale = float(scale)
        self.max_period = float(max_period)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.dim // 2
        exponent = torch.arange(half, device=t.device, dtype=torch.float32) * (-math.log(self.max_period) / (half - 1))
        angles = (t.float() * self.scale).unsqueeze(-1) * exponent.exp()
        return torch.cat([angles.sin(), angles.cos()], dim=-1).to(t.dtype)


class TimeEncoder(nn.Module):
    """Sinusoidal embedding followed by a two-layer MLP: `t (...,) -> (..., out_dim)`.

    Diffusion Policy uses `hidden_dim = 4 * dim` with Mish, DPPO `2 * dim` with Mish, DiT SiLU.
    """

    def __init__(self, dim: int, hidden_dim: int, out_dim: int, activation: type[nn.Module] = nn.Mish,
                 scale: float = 1000.0):
        super().__init__()
        self.embedding = SinusoidalTimeEmbedding(dim, scale=scale)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden_dim), activation(), nn.Linear(hidden_dim, out_dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.embedding(t))
