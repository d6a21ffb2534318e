"""Per-key normalization of actions and observations to [-1, 1].

Low-dimensional keys (actions, states) are min-max scaled per dimension: the fit data's minimum
maps to -1 and its maximum to +1. A dimension that is constant in the fit data (range below
`CONSTANT_RANGE`) is only shifted: its value maps to 0 and offsets keep unit scale, so nothing is
divided by zero and unseen values stay finite. Images (uint8 `(..., H, W, 3)`) are scaled
[0, 255] -> [-1, 1] and need no statistics.

The statistics are buffers of this module (`ranges.<key>.min`, `ranges.<key>.max`, float32
`(d,)`), so they move with `.to(device)` and are saved in the policy's safetensors file.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
import torch
from torch import nn

from diffpolicy.policies.errors import NormalizerError, ObservationDtypeError

CONSTANT_RANGE = 1e-6
"""Dimensions whose fit range (max - min) is below this are treated as constant."""


class _Range(nn.Module):
    """Per-dimension minimum and maximum of one key, shape `(d,)` each."""

    def __init__(self, minimum: torch.Tensor, maximum: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("min", minimum.detach().to(torch.float32).clone())
        self.register_buffer("max", maximum.detach().to(torch.float32).clone())


def _check_key_name(key: str) -> None:
    if not isinstance(key, str) or not key or "." in key:
        raise NormalizerError(f"normalizer key must be a non-empty string without '.', got {key!r}")


class Normalizer(nn.Module):
    """Maps actions and observations to [-1, 1] and back.

    Args:
        ranges: `{key: (min (d,), max (d,))}` per low-dimensional key (e.g. "action", "state").
        image_keys: keys holding uint8 images, scaled [0, 255] -> [-1, 1].
    """

    def __init__(
        self,
        ranges: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
        image_keys: Iterable[str] = (),
    ) -> None:
        super().__init__()
        self.image_keys: tuple[str, ...] = tuple(image_keys)
        self.ranges = nn.ModuleDict()
        for key, (minimum, maximum) in ranges.items():
            _check_key_name(key)
            if key in self.image_keys:
                raise NormalizerError(f"key {key!r} is listed both as an image key and with min/max stats")
            minimum, maximum = torch.as_tensor(minimum), torch.as_tensor(maximum)
            if minimum.ndim != 1 or minimum.shape != maximum.shape:
                raise NormalizerError(
                    f"stats for key {key!r} must be two 1-D tensors of equal shape (d,), "
                    f"got min {tuple(minimum.shape)} and max {tuple(maximum.shape)}"
                )
            if bool((maximum < minimum).any()):
                index = int(torch.nonzero(maximum < minimum)[0, 0])
                raise NormalizerError(
                    f"stats for key {key!r} have max < min at dimension {index}: "
                    f"min {float(minimum[index])}, max {float(maximum[index])}"
                )
            self.ranges[key] = _Range(minimum, maximum)

    # ------------------------------------------------------------------ construction
    @classmethod
    def fit(cls, data: Mapping[str, np.ndarray], image_keys: Iterable[str] = ()) -> Normalizer:
        """Fit per-dimension min/max from data.

        Args:
            data: `{key: array (..., d)}` for low-dimensional keys (all leading axes are pooled)
                and `{key: uint8 array (..., H, W, 3)}` for the keys in `image_keys`.
            image_keys: which keys of `data` are images (they get fixed [0, 255] scaling).
        """
        image_keys = tuple(image_keys)
        missing = [k for k in image_keys if k not in data]
        if missing:
            raise NormalizerError(f"image key(s) {missing} not found in fit data with keys {sorted(data)}")
        ranges = {}
        for key, array in data.items():
            array = np.asarray(array)
            if key in image_keys:
                if array.dtype != np.uint8:
                    raise ObservationDtypeError(f"image key {key!r} must be uint8, got {array.dtype}")
                continue
            if not np.issubdtype(array.dtype, np.floating) and not np.issubdtype(array.dtype, np.integer):
                raise NormalizerError(f"key {key!r} must be numeric to fit min/max, got dtype {array.dtype}")
            if array.ndim < 1 or array.size == 0:
                raise NormalizerError(f"key {key!r} needs a non-empty array (..., d) to fit, got shape {array.shape}")
            flat = array.reshape(-1, array.shape[-1]).astype(np.float64)
            bad = ~np.isfinite(flat)
            if bad.any():
                index = np.unravel_index(int(np.argmax(bad.reshape(-1))), array.shape)
                raise NormalizerError(f"key {key!r} has a non-finite value at index {tuple(map(int, index))}")
            ranges[key] = (torch.from_numpy(flat.min(axis=0)), torch.from_numpy(flat.max(axis=0)))
        return cls(ranges, image_keys)

    @classmethod
    def placeholder(cls, dims: Mapping[str, int], image_keys: Iterable[str] = ()) -> Normalizer:
        """A normalizer of the right structure with zero stats, to be filled by `load_state_dict`."""
        return cls({k: (torch.zeros(d), torch.zeros(d)) for k, d in dims.items()}, image_keys)

    # ------------------------------------------------------------------ queries
    @property
    def dims(self) -> dict[str, int]:
        """`{key: d}` for every low-dimensional key."""
        return {key: int(r.min.shape[0]) for key, r in self.ranges.items()}

    def _range(self, key: str) -> _Range:
        if key not in self.ranges:
            raise NormalizerError(
                f"no normalizer statistics for key {key!r}; have stats for {sorted(self.ranges)} "
                f"and image keys {list(self.image_keys)}"
            )
        return self.ranges[key]

    def _mid_half(self, key: str, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Center and half-range of `key` in float64 (constant dims get half-range 1)."""
        stats = self._range(key)
        d = stats.min.shape[0]
        if x.ndim < 1 or x.shape[-1] != d:
            raise NormalizerError(
                f"key {key!r}: expected last dimension {d} (stats shape ({d},)), got tensor of shape {tuple(x.shape)}"
            )
        lo, hi = stats.min.to(torch.float64), stats.max.to(torch.float64)
        half = (hi - lo) / 2
        half = torch.where(half < CONSTANT_RANGE / 2, torch.ones_like(half), half)
        return (hi + lo) / 2, half

    # ------------------------------------------------------------------ transforms
    def normalize(self, key: str, x: torch.Tensor) -> torch.Tensor:
        """Map `x (..., d)` (or a uint8 image `(..., H, W, 3)`) of `key` to [-1, 1]; float32 out."""
        if key in self.image_keys:
            if x.dtype != torch.uint8:
                raise ObservationDtypeError(f"image key {key!r} must be uint8, got {x.dtype}")
            return x.to(torch.float32) / 127.5 - 1.0
        mid, half = self._mid_half(key, x)
        return ((x.to(torch.float64) - mid.to(x.device)) / half.to(x.device)).to(torch.float32)

    def unnormalize(self, key: str, x: torch.Tensor) -> torch.Tensor:
        """Inverse of `normalize` for a low-dimensional key: `x (..., d)` in [-1, 1] -> data units."""
        if key in self.image_keys:
            raise NormalizerError(f"unnormalize is defined for low-dimensional keys, {key!r} is an image key")
        mid, half = self._mid_half(key, x)
        return (x.to(torch.float64) * half.to(x.device) + mid.to(x.device)).to(torch.float32)

    def extra_repr(self) -> str:
        return f"dims={self.dims}, image_keys={list(self.image_keys)}"
