"""Diffusion Policy's `ConditionalUnet1D` with per-token time.

Layout as in Chi et al.'s reference implementation: per level two FiLM residual blocks (Conv1d,
GroupNorm, Mish, kernel 5) and a strided-conv downsample, two middle blocks, mirrored up path with
skip concatenation and transposed-conv upsample, then a final conv block and a 1x1 conv to the
action dimension. FiLM predicts a scale and a bias from `[time embedding, global condition]`.

Per-token time: the time embedding is computed for each token `(B, L, E)` and average-pooled by 2
per level, so every position of every resolution gets its own FiLM scale and bias (the global
condition is shared by all positions). With a constant `t` along the chunk this is exactly DP's
network; the parameter count is DP's too.

Horizons that are not multiples of `2 ** (len(down_dims) - 1)` are edge-padded at the end (actions
and time embeddings), run, and cropped back to L.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from diffpolicy.nn.embeddings import TimeEncoder
from diffpolicy.nn.errors import NNConfigError
from diffpolicy.nn.validation import check_denoiser_inputs


class Conv1dBlock(nn.Sequential):
    """Conv1d -> GroupNorm -> Mish: `(B, C_in, L) -> (B, C_out, L)`."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, n_groups: int):
        super().__init__(
            nn.Conv1d(in_channels, out_channels, kernel_size, padding=kernel_size // 2),
            nn.GroupNorm(n_groups, out_channels),
            nn.Mish(),
        )


class FiLMResidualBlock1D(nn.Module):
    """Two conv blocks with a per-position FiLM (scale, bias) between them, plus a residual.

    `forward(x (B, C_in, L), film_cond (B, L, film_dim)) -> (B, C_out, L)`.
    """

    def __init__(self, in_channels: int, out_channels: int, film_dim: int, kernel_size: int, n_groups: int):
        super().__init__()
        self.conv1 = Conv1dBlock(in_channels, out_channels, kernel_size, n_groups)
        self.conv2 = Conv1dBlock(out_channels, out_channels, kernel_size, n_groups)
        self.film = nn.Sequential(nn.Mish(), nn.Linear(film_dim, 2 * out_channels))
        self.residual = nn.Conv1d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor, film_cond: torch.Tensor) -> torch.Tensor:
        scale, bias = self.film(film_cond).transpose(1, 2).chunk(2, dim=1)
        out = self.conv2(scale * self.conv1(x) + bias)
        return out + self.residual(x)


class ConditionalUnet1D(nn.Module):
    """Temporal U-Net denoiser: `forward(x_t (B, L, D), t (B, L), cond (B, C)) -> (B, L, D)`.

    Args:
        action_dim: D, channels of each token.
        horizon: L, number of tokens (any positive length; see the module docstring on padding).
        cond_dim: C, global condition size (observation features); 0 for unconditional.
        down_dims: channels per level (DP: (256, 512, 1024) state, (512, 1024, 2048) image).
        time_embed_dim: size E of the time embedding (DP: 256); its MLP has 4E hidden units.
        kernel_size: conv kernel (DP: 5). n_groups: GroupNorm groups (DP: 8), must divide every
            entry of down_dims.
        time_scale: multiplier of t in [0, 1] inside the sinusoidal embedding.
    """

    def __init__(
        self,
        action_dim: int,
        horizon: int,
        cond_dim: int,
        down_dims: Sequence[int] = (256, 512, 1024),
        time_embed_dim: int = 256,
        kernel_size: int = 5,
        n_groups: int = 8,
        time_scale: float = 1000.0,
    ):
        super().__init__()
        down_dims = [int(d) for d in down_dims]
        if not down_dims or any(d <= 0 or d % n_groups for d in down_dims):
            raise NNConfigError(
                f"ConditionalUnet1D: down_dims must be a non-empty list of positive multiples of "
                f"n_groups={n_groups}, got {down_dims}"
            )
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise NNConfigError(f"ConditionalUnet1D: kernel_size must be a positive odd integer, got {kernel_size}")
        if action_dim < 1 or horizon < 1 or cond_dim < 0:
            raise NNConfigError(
                f"ConditionalUnet1D: need action_dim >= 1, horizon >= 1, cond_dim >= 0, "
                f"got {action_dim}, {horizon}, {cond_dim}"
            )
        self.action_dim, self.horizon, self.cond_dim = action_dim, horizon, cond_dim
        self.n_down = len(down_dims) - 1
        self.time_encoder = TimeEncoder(time_embed_dim, 4 * time_embed_dim, time_embed_dim, nn.Mish, time_scale)
        film_dim = time_embed_dim + cond_dim

        def block(c_in: int, c_out: int) -> FiLMResidualBlock1D:
            return FiLMResidualBlock1D(c_in, c_out, film_dim, kernel_size, n_groups)

        in_out = list(zip([action_dim, *down_dims[:-1]], down_dims))
        self.down_levels = nn.ModuleList(
            nn.ModuleList([
                block(c_in, c_out),
                block(c_out, c_out),
                nn.Conv1d(c_out, c_out, 3, stride=2, padding=1) if level < self.n_down else nn.Identity(),
            ])
            for level, (c_in, c_out) in enumerate(in_out)
        )
        self.mid_blocks = nn.ModuleList([block(down_dims[-1], down_dims[-1]), block(down_dims[-1], down_dims[-1])])
        self.up_levels = nn.ModuleList(
            nn.ModuleList([
                block(2 * c_out, c_in),
                block(c_in, c_in),
                nn.ConvTranspose1d(c_in, c_in, 4, stride=2, padding=1),
            ])
            for c_in, c_out in reversed(in_out[1:])
        )
        self.final = nn.Sequential(
            Conv1dBlock(down_dims[0], down_dims[0], kernel_size, n_groups),
            nn.Conv1d(down_dims[0], action_dim, 1),
        )

    def _film_conditions(self, t: torch.Tensor, cond: torch.Tensor, length: int) -> list[torch.Tensor]:
        """Per-level FiLM inputs `(B, length / 2**level, E + C)` for level 0 .. n_down."""
        temb = self.time_encoder(t).transpose(1, 2)  # (B, E, L)
        if length > temb.shape[-1]:
            temb = F.pad(temb, (0, length - temb.shape[-1]), mode="replicate")
        conds = []
        for level in range(self.n_down + 1):
            if level:
                temb = F.avg_pool1d(temb, 2)
            g = cond.unsqueeze(1).expand(-1, temb.shape[-1], -1)
            conds.append(torch.cat([temb.transpose(1, 2), g], dim=-1))
        return conds

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        cond = check_denoiser_inputs("ConditionalUnet1D", x_t, t, cond, self.action_dim, self.horizon, self.cond_dim)
        length = x_t.shape[1]
        padded = -(-length // 2**self.n_down) * 2**self.n_down
        x = x_t.transpose(1, 2)
        if padded > length:
            x = F.pad(x, (0, padded - length), mode="replicate")
        conds = self._film_conditions(t, cond, padded)

        skips = []
        for level, (block1, block2, downsample) in enumerate(self.down_levels):
            x = block2(block1(x, conds[level]), conds[level])
            skips.append(x)
            x = downsample(x)
        for block in self.mid_blocks:
            x = block(x, conds[self.n_down])
        for i, (block1, block2, upsample) in enumerate(self.up_levels):
            level = self.n_down - i
            x = torch.cat([x, skips.pop()], dim=1)
            x = upsample(block2(block1(x, conds[level]), conds[level]))
        return self.final(x)[..., :length].transpose(1, 2)
