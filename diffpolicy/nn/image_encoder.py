"""`ResNetImageEncoder`: uint8 HWC images -> feature vectors (Diffusion Policy's vision encoder).

Pipeline: crop (random in train mode, centered in eval mode, the same size in both) -> scale
uint8 [0, 255] to float [-1, 1] -> ResNet-18-style GroupNorm trunk -> spatial softmax keypoints ->
Linear to `feature_dim`.

Random crops draw their offsets from the `generator` passed to `forward`; with none, from torch's
global RNG (so `torch.manual_seed` makes them reproducible too). Every image gets its own offset.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from diffpolicy.errors import InvalidTypeError
from diffpolicy.nn.errors import NNConfigError, NNInputError
from diffpolicy.nn.resnet import ResNetTrunk
from diffpolicy.nn.spatial_softmax import SpatialSoftmax


def random_crop(images: torch.Tensor, crop_h: int, crop_w: int, generator: torch.Generator | None) -> torch.Tensor:
    """Independent random crop of each image: `(N, H, W, C) -> (N, crop_h, crop_w, C)`."""
    n, height, width, _ = images.shape
    rng_device = generator.device if generator is not None else torch.device("cpu")
    top = torch.randint(0, height - crop_h + 1, (n, 1, 1), generator=generator, device=rng_device).to(images.device)
    left = torch.randint(0, width - crop_w + 1, (n, 1, 1), generator=generator, device=rng_device).to(images.device)
    rows = top + torch.arange(crop_h, device=images.device).view(1, crop_h, 1)
    cols = left + torch.arange(crop_w, device=images.device).view(1, 1, crop_w)
    return images[torch.arange(n, device=images.device).view(n, 1, 1), rows, cols]


def center_crop(images: torch.Tensor, crop_h: int, crop_w: int) -> torch.Tensor:
    """Deterministic central crop: `(N, H, W, C) -> (N, crop_h, crop_w, C)`."""
    _, height, width, _ = images.shape
    top, left = (height - crop_h) // 2, (width - crop_w) // 2
    return images[:, top:top + crop_h, left:left + crop_w]


class ResNetImageEncoder(nn.Module):
    """`forward(images (..., H, W, 3) uint8, generator=None) -> (..., feature_dim)`.

    Args:
        image_shape: (H, W, 3) of the images this encoder accepts.
        crop_shape: (h, w) crop, or None for no crop (DP: 84x84 -> 76x76, 96x96 -> 84x84).
        widths, blocks_per_stage: ResNet trunk (ResNet-18: (64, 128, 256, 512), 2).
        num_keypoints: spatial-softmax keypoints K (DP/robomimic: 32).
        feature_dim: output size (DP/robomimic: 64).
    """

    def __init__(
        self,
        image_shape: Sequence[int],
        crop_shape: Sequence[int] | None = None,
        widths: Sequence[int] = (64, 128, 256, 512),
        blocks_per_stage: int = 2,
        num_keypoints: int = 32,
        feature_dim: int = 64,
    ):
        super().__init__()
        image_shape = tuple(int(s) for s in image_shape)
        if len(image_shape) != 3 or image_shape[2] != 3 or min(image_shape) < 1:
            raise NNConfigError(f"ResNetImageEncoder: image_shape must be (H, W, 3), got {image_shape}")
        crop = tuple(int(s) for s in crop_shape) if crop_shape is not None else image_shape[:2]
        if len(crop) != 2 or not (1 <= crop[0] <= image_shape[0] and 1 <= crop[1] <= image_shape[1]):
            raise NNConfigError(
                f"ResNetImageEncoder: crop_shape must be (h, w) with 1 <= h <= {image_shape[0]} and "
                f"1 <= w <= {image_shape[1]} for images of shape {image_shape}, got {crop_shape}"
            )
        if feature_dim < 1:
            raise NNConfigError(f"ResNetImageEncoder: feature_dim must be >= 1, got {feature_dim}")
        self.image_shape = image_shape
        self.crop_shape = crop
        self.trunk = ResNetTrunk(widths, blocks_per_stage, in_channels=3)
        self.keypoints = SpatialSoftmax(self.trunk.out_channels, num_keypoints)
        self.projection = nn.Linear(self.keypoints.output_dim, feature_dim)
        self.output_dim = feature_dim

    def crop(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Random (train mode) or center (eval mode) crop: `(N, H, W, 3) -> (N, h, w, 3)`."""
        crop_h, crop_w = self.crop_shape
        if (crop_h, crop_w) == images.shape[1:3]:
            return images
        if self.training:
            return random_crop(images, crop_h, crop_w, generator)
        return center_crop(images, crop_h, crop_w)

    def forward(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if images.dtype != torch.uint8:
            raise InvalidTypeError(
                f"ResNetImageEncoder: images must be uint8 in [0, 255] with layout (..., H, W, 3), got dtype "
                f"{images.dtype}"
            )
        if images.dim() < 4 or tuple(images.shape[-3:]) != self.image_shape:
            channels = images.shape[-1] if images.dim() else None
            raise NNInputError(
                f"ResNetImageEncoder: images must have shape (..., H, W, C) = "
                f"(..., {', '.join(map(str, self.image_shape))}) (channels last, C = 3 RGB), "
                f"got {tuple(images.shape)} (C = {channels})"
            )
        leading = images.shape[:-3]
        flat = self.crop(images.reshape(-1, *self.image_shape), generator)
        x = flat.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)
        features = self.projection(self.keypoints(self.trunk(x)))
        return features.view(*leading, self.output_dim)
