"""Image data that needs no download.

- `digits(image_size)`: scikit-learn's 1797 handwritten 8 x 8 digits (bundled with the package,
  the `generative` extra), upsampled bilinearly, as `(N, 1, S, S)` floats in [-1, 1] with labels.
- `pusht_frames(count, image_size, seed)`: frames of the PushT scene rendered by the package's own
  `PushTEnv` from `count` random initial states, `(N, 3, S, S)` floats in [-1, 1].
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from diffpolicy.errors import InvalidValueError

DIGITS_MAX = 16.0  # scikit-learn's digits are integers 0..16


def _check_size(image_size, where: str) -> None:
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 8:
        raise InvalidValueError(f"{where}: image_size must be an int >= 8, got {image_size!r}")


def digits(image_size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """-> images `(1797, 1, S, S)` in [-1, 1] (ink bright), labels `(1797,)` int64 in 0..9."""
    _check_size(image_size, "digits")
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:
        raise InvalidValueError("digits: scikit-learn is needed (pip install 'diffpolicy[generative]')") from err
    data = load_digits()
    images = torch.as_tensor(data.images, dtype=torch.float32).unsqueeze(1) / DIGITS_MAX * 2.0 - 1.0
    if image_size != 8:
        images = F.interpolate(images, size=(image_size, image_size), mode="bilinear", align_corners=False)
    return images.clamp(-1.0, 1.0), torch.as_tensor(data.target, dtype=torch.int64)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """`(N, C, H, W)` in [-1, 1] -> `(N, H, W, C)` uint8."""
    return ((images.clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def from_uint8(frames: np.ndarray) -> torch.Tensor:
    """`(N, H, W, C)` uint8 -> `(N, C, H, W)` floats in [-1, 1] (the scaling of the image encoders)."""
    return torch.as_tensor(np.asarray(frames)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def pusht_frames(count: int, image_size: int = 96, seed: int = 0) -> torch.Tensor:
    """`count` PushT scenes from `PushTEnv.reset(seed=seed + i)`: `(count, 3, S, S)` in [-1, 1]."""
    _check_size(image_size, "pusht_frames")
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise InvalidValueError(f"pusht_frames: count must be an int >= 1, got {count!r}")
    from diffpolicy.envs.pusht import PushTEnv

    env = PushTEnv(obs_type="image", image_size=image_size)
    try:
        frames = np.stack([env.reset(seed=seed + i)[0]["image"] for i in range(count)])
    finally:
        env.close()
    return from_uint8(frames)


def random_crops(images: torch.Tensor, size: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """An independent random `size x size` crop of each image: `(N, C, H, W) -> (N, C, size, size)`."""
    n, _, height, width = images.shape
    if not 1 <= size <= min(height, width):
        raise InvalidValueError(f"random_crops: size must be in 1..{min(height, width)}, got {size!r}")
    top = torch.randint(0, height - size + 1, (n,), generator=generator)
    left = torch.randint(0, width - size + 1, (n,), generator=generator)
    rows = (top.view(n, 1) + torch.arange(size)).view(n, 1, size, 1)
    cols = (left.view(n, 1) + torch.arange(size)).view(n, 1, 1, size)
    return images[torch.arange(n).view(n, 1, 1, 1), torch.arange(images.shape[1]).view(1, -1, 1, 1), rows, cols]
