"""`ObservationEncoder`: a dict of observation histories -> one conditioning vector per sample."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from diffpolicy.nn.dit_image_encoder import DiTImageEncoder
from diffpolicy.nn.errors import NNConfigError, NNInputError
from diffpolicy.nn.image_encoder import ResNetImageEncoder

IMAGE_BACKBONES = ("resnet", "dit")
from diffpolicy.nn.state_encoder import MLPStateEncoder


class ObservationEncoder(nn.Module):
    """`forward(obs: {key: (B, To, ...)}, generator=None) -> (B, output_dim)`.

    Low-dim keys are float `(B, To, d)`, image keys uint8 `(B, To, H, W, 3)`. Per time step the
    features are concatenated as `[low-dim keys (sorted, through MLPStateEncoder), image keys
    (sorted, one image encoder each)]`, then flattened over To: `output_dim = To * step_dim`
    (the Diffusion Policy layout). Keys of `obs` that are not in `obs_shapes` are ignored.
    `generator` drives the random crops in train mode (torch's global RNG when None).

    Args:
        obs_shapes: shape of one time step of each key: `(d,)` low-dim, `(H, W, 3)` image.
        obs_horizon: To.
        image_keys: which keys are images (all others are low-dim).
        state_hidden_dims: MLP sizes of the state encoder; empty for identity (DP's default).
        crop_shape: image crop (h, w) or None; the same for every camera.
        image_widths, image_blocks_per_stage, num_keypoints, image_feature_dim: image encoder
            settings (see `ResNetImageEncoder`).
        share_image_encoder: one image encoder for all cameras (they must have equal shapes).
        image_backbone: None or `{"type": "resnet"}`: `ResNetImageEncoder` (trained from scratch);
            `{"type": "dit", **kwargs}`: `DiTImageEncoder(**kwargs)`, a generative image model's
            denoiser (`init`: the model's directory; `freeze`: keep it fixed or fine-tune it).
    """

    def __init__(
        self,
        obs_shapes: Mapping[str, Sequence[int]],
        obs_horizon: int,
        image_keys: Sequence[str] = (),
        state_hidden_dims: Sequence[int] = (),
        crop_shape: Sequence[int] | None = None,
        image_widths: Sequence[int] = (64, 128, 256, 512),
        image_blocks_per_stage: int = 2,
        num_keypoints: int = 32,
        image_feature_dim: int = 64,
        share_image_encoder: bool = False,
        image_backbone: Mapping[str, object] | None = None,
    ):
        super().__init__()
        shapes = {key: tuple(int(s) for s in shape) for key, shape in obs_shapes.items()}
        unknown = sorted(set(image_keys) - set(shapes))
        if not shapes or unknown:
            raise NNConfigError(
                f"ObservationEncoder: obs_shapes must be non-empty and contain every image key; "
                f"obs_shapes has {sorted(shapes)}, image_keys not in it: {unknown}"
            )
        if obs_horizon < 1:
            raise NNConfigError(f"ObservationEncoder: obs_horizon must be >= 1, got {obs_horizon}")
        self.obs_horizon = obs_horizon
        self.image_keys = sorted(image_keys)
        self.state_keys = sorted(set(shapes) - set(image_keys))
        for key in self.state_keys:
            if len(shapes[key]) != 1:
                raise NNConfigError(
                    f"ObservationEncoder: low-dim key {key!r} must have shape (d,), got {shapes[key]} "
                    f"(list it in image_keys if it is an (H, W, 3) image)"
                )
        self.state_encoder = (
            MLPStateEncoder({key: shapes[key][0] for key in self.state_keys}, obs_horizon, state_hidden_dims)
            if self.state_keys else None
        )
        if share_image_encoder and len({shapes[key] for key in self.image_keys}) > 1:
            raise NNConfigError(
                "ObservationEncoder: share_image_encoder needs equal image shapes, got "
                + ", ".join(f"{key}={shapes[key]}" for key in self.image_keys)
            )

        backbone = dict(image_backbone or {"type": "resnet"})
        kind = backbone.pop("type", None)
        if kind not in IMAGE_BACKBONES or (kind == "resnet" and backbone):
            raise NNConfigError(f"ObservationEncoder: image_backbone must be None, {{'type': 'resnet'}} or "
                                f"{{'type': 'dit', ...DiTImageEncoder arguments}}, got {image_backbone!r}")

        def image_encoder(key: str) -> nn.Module:
            if kind == "dit":
                try:
                    return DiTImageEncoder(shapes[key], crop_shape, feature_dim=image_feature_dim, **backbone)
                except TypeError as err:
                    raise NNConfigError(f"ObservationEncoder: image_backbone {image_backbone!r}: {err}") from None
            return ResNetImageEncoder(shapes[key], crop_shape, image_widths, image_blocks_per_stage,
                                      num_keypoints, image_feature_dim)

        if share_image_encoder and self.image_keys:
            shared = image_encoder(self.image_keys[0])
            self.image_encoders = nn.ModuleList([shared])
            self._encoder_index = [0] * len(self.image_keys)
        else:
            self.image_encoders = nn.ModuleList(image_encoder(key) for key in self.image_keys)
            self._encoder_index = list(range(len(self.image_keys)))
        self.obs_shapes = shapes
        state_dim = self.state_encoder.step_dim if self.state_encoder else 0
        self.step_dim = state_dim + image_feature_dim * len(self.image_keys)
        self.output_dim = obs_horizon * self.step_dim

    def forward(self, obs: Mapping[str, torch.Tensor], generator: torch.Generator | None = None) -> torch.Tensor:
        features = []
        if self.state_encoder is not None:
            features.append(self.state_encoder.encode_steps(obs))
        for key, index in zip(self.image_keys, self._encoder_index):
            if key not in obs:
                raise NNInputError(f"ObservationEncoder: image key {key!r} is missing; got keys {sorted(obs)}")
            images = obs[key]
            batch = features[0].shape[0] if features else images.shape[0]
            expected = (batch, self.obs_horizon, *self.obs_shapes[key])
            if tuple(images.shape) != expected:
                raise NNInputError(
                    f"ObservationEncoder: image {key!r} must have shape (B, To, H, W, 3) = {expected}, "
                    f"got {tuple(images.shape)}"
                )
            features.append(self.image_encoders[index](images, generator))
        steps = torch.cat(features, dim=-1)
        return steps.reshape(steps.shape[0], self.output_dim)
