"""A ResNet-18-style convolutional trunk with GroupNorm instead of BatchNorm.

Same layout as torchvision's `resnet18` without the average pool and classifier (as Diffusion
Policy / robomimic use it): 7x7 stride-2 stem, 3x3 stride-2 max pool, then stages of BasicBlocks,
the first stage at stride 1 and every later stage at stride 2. GroupNorm uses `channels // 16`
groups, as DP's `replace_bn_with_gn`. BatchNorm is avoided on purpose: EMA weights and small
batches break its running statistics.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from diffpolicy.nn.errors import NNConfigError


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with about 16 channels per group (the largest divisor of `channels` <= channels // 16)."""
    groups = max(1, channels // 16)
    while channels % groups:
        groups -= 1
    return nn.GroupNorm(groups, channels)


class BasicBlock(nn.Module):
    """Two 3x3 convs with a residual: `(N, C_in, h, w) -> (N, C_out, h / stride, w / stride)`."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.norm1 = group_norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.norm2 = group_norm(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), group_norm(out_channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.norm1(self.conv1(x)))
        return self.relu(self.norm2(self.conv2(out)) + self.shortcut(x))


class ResNetTrunk(nn.Module):
    """`(N, in_channels, H, W) float -> (N, widths[-1], h, w)` feature maps.

    Defaults are ResNet-18's: widths (64, 128, 256, 512), two blocks per stage; a 76x76 crop gives
    3x3 maps.
    """

    def __init__(self, widths: Sequence[int] = (64, 128, 256, 512), blocks_per_stage: int = 2, in_channels: int = 3):
        super().__init__()
        widths = [int(w) for w in widths]
        if not widths or min(widths) < 1 or blocks_per_stage < 1:
            raise NNConfigError(
                f"ResNetTrunk: widths must be a non-empty list of positive ints and blocks_per_stage >= 1, "
                f"got widths={widths}, blocks_per_stage={blocks_per_stage}"
            )
        self.out_channels = widths[-1]
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, widths[0], 7, stride=2, padding=3, bias=False),
            group_norm(widths[0]),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, stride=2, padding=1),
        ]
        channels = widths[0]
        for stage, width in enumerate(widths):
            for block in range(blocks_per_stage):
                layers.append(BasicBlock(channels, width, stride=2 if stage > 0 and block == 0 else 1))
                channels = width
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)
