"""Spatial-softmax keypoint pooling (Levine et al. 2016; robomimic's `SpatialSoftmax`)."""

from __future__ import annotations

import torch
from torch import nn

from diffpolicy.nn.errors import NNConfigError, NNInputError


class SpatialSoftmax(nn.Module):
    """Expected image coordinates of each keypoint's softmax attention map.

    `forward(features (N, C, h, w)) -> (N, 2K)` ordered `(x_0, y_0, x_1, y_1, ...)`, where x runs
    over columns and y over rows, both from -1 (first pixel) to +1 (last pixel):
    `x_k = sum_ij softmax(f_k / temperature)_ij * x_j`.

    A 1x1 conv first maps C channels to K = num_keypoints maps; `num_keypoints=None` uses the C
    channels themselves (K = C).
    """

    def __init__(self, in_channels: int, num_keypoints: int | None = 32, temperature: float = 1.0):
        super().__init__()
        if temperature <= 0 or (num_keypoints is not None and num_keypoints < 1):
            raise NNConfigError(
                f"SpatialSoftmax: need temperature > 0 and num_keypoints >= 1 or None, got "
                f"temperature={temperature}, num_keypoints={num_keypoints}"
            )
        self.in_channels = in_channels
        self.num_keypoints = in_channels if num_keypoints is None else num_keypoints
        self.keypoint_conv = nn.Conv2d(in_channels, num_keypoints, 1) if num_keypoints is not None else nn.Identity()
        self.temperature = float(temperature)

    @property
    def output_dim(self) -> int:
        return 2 * self.num_keypoints

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if features.dim() != 4 or features.shape[1] != self.in_channels:
            raise NNInputError(
                f"SpatialSoftmax: features must have shape (N, C={self.in_channels}, h, w), got {tuple(features.shape)}"
            )
        maps = self.keypoint_conv(features)
        n, k, h, w = maps.shape
        attention = torch.softmax(maps.reshape(n, k, h * w) / self.temperature, dim=-1).view(n, k, h, w)
        xs = torch.linspace(-1.0, 1.0, w, device=maps.device, dtype=maps.dtype)
        ys = torch.linspace(-1.0, 1.0, h, device=maps.device, dtype=maps.dtype)
        expected_x = (attention.sum(dim=2) * xs).sum(dim=-1)  # marginal over rows, (N, K)
        expected_y = (attention.sum(dim=3) * ys).sum(dim=-1)  # marginal over columns, (N, K)
        return torch.stack([expected_x, expected_y], dim=-1).reshape(n, 2 * k)
