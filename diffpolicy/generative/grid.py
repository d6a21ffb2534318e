"""Write a batch of images as one PNG grid (atomically)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from diffpolicy.errors import InvalidValueError
from diffpolicy.fsutil import fsync_dir
from diffpolicy.generative.data import to_uint8


def write_png_grid(images: torch.Tensor, path: str | os.PathLike, columns: int, scale: int = 4) -> Path:
    """images `(N, C, H, W)` in [-1, 1] (C = 1 or 3) -> a PNG of ceil(N / columns) rows, each image
    enlarged `scale` times (nearest neighbour) with a 1-pixel border. Returns the path."""
    from PIL import Image

    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] not in (1, 3):
        raise InvalidValueError(f"write_png_grid: images must be (N, C, H, W) with C = 1 or 3, got "
                                f"{tuple(getattr(images, 'shape', ()))}")
    if not (isinstance(columns, int) and columns >= 1 and isinstance(scale, int) and scale >= 1):
        raise InvalidValueError(f"write_png_grid: columns and scale must be ints >= 1, got {columns!r}, {scale!r}")
    frames = to_uint8(images)
    if frames.shape[-1] == 1:
        frames = np.repeat(frames, 3, axis=-1)
    frames = frames.repeat(scale, axis=1).repeat(scale, axis=2)
    n, h, w, _ = frames.shape
    rows = -(-n // columns)
    canvas = np.full((rows * (h + 1) + 1, columns * (w + 1) + 1, 3), 64, dtype=np.uint8)
    for i, frame in enumerate(frames):
        r, c = divmod(i, columns)
        canvas[1 + r * (h + 1):1 + r * (h + 1) + h, 1 + c * (w + 1):1 + c * (w + 1) + w] = frame
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    Image.fromarray(canvas).save(tmp, format="PNG")
    os.replace(tmp, path)
    fsync_dir(path.parent)
    return path
