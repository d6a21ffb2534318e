"""`DiTImageEncoder`: an image model's DiT denoiser as a perception backbone.

uint8 HWC images -> crop (random in train mode, centered in eval mode, as `ResNetImageEncoder`)
-> [-1, 1] -> non-overlapping p x p patch tokens `(N, L, 3 p p)` -> `DiT.features` at the clean
level t = `level` (no condition) -> `(N, L, H)` -> a per-token Linear to `token_features` ->
flattened over the L tokens (keeping where each patch is) -> Linear to `feature_dim`.

The DiT has exactly the architecture of an unconditional `generative.ImageModel` whose images are
the crops (`image_size` = crop side, `channels` 3, the same `patch_size` and DiT arguments), so its
weights can start from a trained image model: `init` names that model's directory, whose
`model.safetensors` holds the DiT under the `denoiser.` prefix. `freeze` keeps the DiT fixed (its
parameters do not require gradients); otherwise it is fine-tuned with the policy. Inside
`skipping_init()` (a policy being loaded from its own checkpoint, which holds every weight) `init`
is not read.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path

import torch
from torch import nn

from diffpolicy.errors import InvalidTypeError, MissingFileError
from diffpolicy.nn.dit import DiT, square_patch_grid
from diffpolicy.nn.errors import NNConfigError, NNInputError
from diffpolicy.nn.image_encoder import crop_images

_SKIP_INIT: ContextVar[bool] = ContextVar("diffpolicy_nn_skip_init", default=False)
DENOISER_PREFIX = "denoiser."


@contextmanager
def skipping_init() -> Iterator[None]:
    """Build modules without reading their `init` weight files (the caller loads every weight)."""
    token = _SKIP_INIT.set(True)
    try:
        yield
    finally:
        _SKIP_INIT.reset(token)


def read_denoiser_weights(directory: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The `denoiser.*` tensors of a generative model directory, without the prefix."""
    from safetensors.torch import load_file

    path = Path(directory) / "model.safetensors"
    if not path.is_file():
        raise MissingFileError(f"DiTImageEncoder: init {os.fspath(directory)!r} has no model.safetensors; train "
                               f"an image model there first (diffpolicy generate image --data pusht ...)")
    tensors = load_file(str(path))
    weights = {k[len(DENOISER_PREFIX):]: v for k, v in tensors.items() if k.startswith(DENOISER_PREFIX)}
    if not weights:
        raise NNConfigError(f"DiTImageEncoder: {path} holds no '{DENOISER_PREFIX}*' tensors (not an image model)")
    return weights


class DiTImageEncoder(nn.Module):
    """`forward(images (..., H, W, 3) uint8, generator=None) -> (..., feature_dim)` (module docstring).

    Args:
        image_shape: (H, W, 3). crop_shape: (h, w) square crop or None (then H must equal W).
        patch_size: p, dividing the crop side. hidden_dim, depth, num_heads, mlp_ratio,
            time_embed_dim, position: the DiT's (as in the image model; rotary positions are
            axial over the patch grid, as the image model's). level: t of the features, in [0, 1].
        token_features: per-token projection size. feature_dim: output size.
        freeze: keep the DiT fixed. init: image-model directory to start the DiT from, or None.
    """

    def __init__(self, image_shape: Sequence[int], crop_shape: Sequence[int] | None = None, patch_size: int = 12,
                 hidden_dim: int = 128, depth: int = 4, num_heads: int = 4, mlp_ratio: float = 4.0,
                 time_embed_dim: int = 128, position: str = "learned", level: float = 0.0, token_features: int = 16,
                 feature_dim: int = 64, freeze: bool = False, init: str | None = None):
        super().__init__()
        image_shape = tuple(int(s) for s in image_shape)
        if len(image_shape) != 3 or image_shape[2] != 3:
            raise NNConfigError(f"DiTImageEncoder: image_shape must be (H, W, 3), got {image_shape}")
        crop = tuple(int(s) for s in crop_shape) if crop_shape is not None else image_shape[:2]
        if len(crop) != 2 or crop[0] != crop[1] or not (crop[0] <= image_shape[0] and crop[1] <= image_shape[1]):
            raise NNConfigError(f"DiTImageEncoder: crop_shape must be a square (s, s) within {image_shape[:2]}, "
                                f"got {crop_shape}")
        if not isinstance(patch_size, int) or patch_size < 1 or crop[0] % patch_size:
            raise NNConfigError(f"DiTImageEncoder: patch_size must be an int >= 1 dividing the crop side "
                                f"{crop[0]}, got {patch_size!r}")
        if not (isinstance(level, (int, float)) and 0.0 <= level <= 1.0):
            raise NNConfigError(f"DiTImageEncoder: level must be a number in [0, 1], got {level!r}")
        if not isinstance(freeze, bool):
            raise NNConfigError(f"DiTImageEncoder: freeze must be a bool, got {freeze!r}")
        self.image_shape, self.crop_shape, self.patch_size, self.level = image_shape, crop, patch_size, float(level)
        side = crop[0] // patch_size
        self.num_tokens = side ** 2
        self.dit = DiT(3 * patch_size ** 2, self.num_tokens, 0, hidden_dim, depth, num_heads, mlp_ratio,
                       time_embed_dim, position=position, grid=square_patch_grid(position, side))
        if init is not None and not _SKIP_INIT.get():
            weights = read_denoiser_weights(init)
            try:
                self.dit.load_state_dict(weights, strict=True)
            except RuntimeError as err:
                raise NNConfigError(f"DiTImageEncoder: the image model in {init!r} does not match this encoder's "
                                    f"DiT (crop {crop}, patch_size {patch_size}, hidden_dim {hidden_dim}, depth "
                                    f"{depth}, num_heads {num_heads}, time_embed_dim {time_embed_dim}, position "
                                    f"{position!r}, unconditional): {err}") from None
        self.dit.requires_grad_(not freeze)
        self.token_projection = nn.Linear(hidden_dim, token_features)
        self.projection = nn.Linear(self.num_tokens * token_features, feature_dim)
        self.output_dim = feature_dim

    def forward(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if images.dtype != torch.uint8:
            raise InvalidTypeError(f"DiTImageEncoder: images must be uint8 (..., H, W, 3), got dtype {images.dtype}")
        if images.dim() < 4 or tuple(images.shape[-3:]) != self.image_shape:
            raise NNInputError(f"DiTImageEncoder: images must have shape (..., {', '.join(map(str, self.image_shape))}),"
                               f" got {tuple(images.shape)}")
        leading = images.shape[:-3]
        flat = crop_images(images.reshape(-1, *self.image_shape), self.crop_shape, self.training, generator)
        x = flat.permute(0, 3, 1, 2).float().div(127.5).sub(1.0)  # (N, 3, s, s)
        n, channels, side, _ = x.shape
        p = self.patch_size
        tokens = x.reshape(n, channels, side // p, p, side // p, p).permute(0, 2, 4, 1, 3, 5)
        tokens = tokens.reshape(n, self.num_tokens, channels * p * p)  # generative.patches.patchify's layout
        t = tokens.new_full((n, self.num_tokens), self.level)
        features, _ = self.dit.features(tokens, t, None)
        out = self.projection(self.token_projection(features).flatten(1))
        return out.view(*leading, self.output_dim)
