"""Build backbones and observation encoders from plain config dicts (YAML/JSON friendly).

Backbone config: `{"type": "unet" | "dit" | "mlp", **constructor keyword arguments}`; keys left
out take the small CPU-friendly values of `BACKBONE_DEFAULTS` (Diffusion Policy's full-size
UNet is `{"type": "unet", "down_dims": [256, 512, 1024], "time_embed_dim": 256}`).

Observation-encoder config: keyword arguments of `ObservationEncoder`; `image_keys` defaults to
the keys whose shape has three entries `(H, W, 3)`.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from diffpolicy.nn.dit import DiT
from diffpolicy.nn.errors import NNConfigError
from diffpolicy.nn.mlp import MLPDenoiser
from diffpolicy.nn.observation_encoder import ObservationEncoder
from diffpolicy.nn.unet1d import ConditionalUnet1D

BACKBONES: dict[str, type[nn.Module]] = {"unet": ConditionalUnet1D, "dit": DiT, "mlp": MLPDenoiser}

BACKBONE_DEFAULTS: dict[str, dict[str, Any]] = {
    "unet": {"down_dims": [64, 128, 256], "time_embed_dim": 64, "kernel_size": 5, "n_groups": 8},
    "dit": {"hidden_dim": 128, "depth": 4, "num_heads": 4, "time_embed_dim": 128},
    "mlp": {"hidden_dim": 256, "num_blocks": 2, "time_embed_dim": 16},
}


def _config_keys(cls: type, exclude: Sequence[str]) -> list[str]:
    return [name for name in inspect.signature(cls.__init__).parameters if name not in ("self", *exclude)]


def _build(where: str, cls: type, kwargs: dict[str, Any], exclude: Sequence[str], **fixed: Any) -> nn.Module:
    allowed = _config_keys(cls, exclude)
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise NNConfigError(f"{where}: unknown config key(s) {unknown}; allowed keys are {allowed}")
    try:
        return cls(**fixed, **kwargs)
    except NNConfigError as exc:
        raise NNConfigError(f"{where}: {exc}") from exc
    except (TypeError, ValueError) as exc:
        raise NNConfigError(f"{where}: invalid config value in {kwargs}: {exc}") from exc


def make_backbone(config: Mapping[str, Any], action_dim: int, horizon: int, cond_dim: int) -> nn.Module:
    """`{"type": name, ...}` -> a denoiser `forward(x_t (B, L, D), t (B, L), cond (B, C)) -> (B, L, D)`."""
    if not isinstance(config, Mapping) or "type" not in config:
        raise NNConfigError(
            f"make_backbone: config must be a mapping with a 'type' in {sorted(BACKBONES)}, got {config!r}"
        )
    kind = config["type"]
    if kind not in BACKBONES:
        raise NNConfigError(f"make_backbone: unknown backbone type {kind!r}; expected one of {sorted(BACKBONES)}")
    kwargs = {**BACKBONE_DEFAULTS[kind], **{k: v for k, v in config.items() if k != "type"}}
    return _build(f"make_backbone(type={kind!r})", BACKBONES[kind], kwargs, ("action_dim", "horizon", "cond_dim"),
                  action_dim=action_dim, horizon=horizon, cond_dim=cond_dim)


def make_observation_encoder(
    config: Mapping[str, Any], obs_shapes: Mapping[str, Sequence[int]], obs_horizon: int
) -> ObservationEncoder:
    """Config of `ObservationEncoder` keyword arguments -> encoder `(obs dict) -> (B, output_dim)`."""
    if not isinstance(config, Mapping):
        raise NNConfigError(f"make_observation_encoder: config must be a mapping, got {config!r}")
    kwargs = dict(config)
    kwargs.setdefault("image_keys", [key for key, shape in obs_shapes.items() if len(shape) == 3])
    return _build("make_observation_encoder", ObservationEncoder, kwargs, ("obs_shapes", "obs_horizon"),
                  obs_shapes=obs_shapes, obs_horizon=obs_horizon)
