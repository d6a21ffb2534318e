"""Images as token sequences: non-overlapping p x p patches in row-major order.

`patchify(images (B, C, H, W), p) -> (B, L, C p p)` with L = (H / p)(W / p); `unpatchify` inverts
it exactly. A DiT over these tokens is an image denoiser (Peebles & Xie 2023).
"""

from __future__ import annotations

import torch

from diffpolicy.errors import InvalidValueError


def check_patch_size(height: int, width: int, patch_size: int, where: str) -> None:
    """Raise unless patch_size >= 1 divides both image sides."""
    if isinstance(patch_size, bool) or not isinstance(patch_size, int) or patch_size < 1 \
            or height % patch_size or width % patch_size:
        raise InvalidValueError(f"{where}: patch_size must be an int >= 1 dividing the image sides "
                                f"{height} x {width}, got {patch_size!r}")


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """`(B, C, H, W) -> (B, (H/p)(W/p), C p p)`; each token is one patch, channels-major inside."""
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        raise InvalidValueError(f"patchify: images must be a (B, C, H, W) tensor, got "
                                f"{tuple(getattr(images, 'shape', ())) or type(images).__name__}")
    batch, channels, height, width = images.shape
    check_patch_size(height, width, patch_size, "patchify")
    p = patch_size
    x = images.reshape(batch, channels, height // p, p, width // p, p)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(batch, (height // p) * (width // p), channels * p * p)


def unpatchify(tokens: torch.Tensor, patch_size: int, channels: int, height: int, width: int) -> torch.Tensor:
    """The inverse of `patchify`: `(B, L, C p p) -> (B, C, H, W)`."""
    check_patch_size(height, width, patch_size, "unpatchify")
    p = patch_size
    expected = ((height // p) * (width // p), channels * p * p)
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 3 or tuple(tokens.shape[1:]) != expected:
        raise InvalidValueError(f"unpatchify: tokens must have shape (B, L, C p p) = (B, {expected[0]}, "
                                f"{expected[1]}), got {tuple(getattr(tokens, 'shape', ()))}")
    x = tokens.reshape(tokens.shape[0], height // p, width // p, channels, p, p)
    return x.permute(0, 3, 1, 4, 2, 5).reshape(tokens.shape[0], channels, height, width)
