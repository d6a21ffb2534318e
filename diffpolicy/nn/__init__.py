"""Neural networks: denoiser backbones over per-token noise levels, observation encoders, EMA.

Backbones: `forward(x_t (B, L, D), t (B, L), cond (B, C)) -> (B, L, D)`, t in [0, 1] per token.
Encoders: `forward(obs: dict[str, Tensor]) -> (B, C)` (`ResNetImageEncoder` takes an image tensor).
"""

from diffpolicy.nn.dit import DiT
from diffpolicy.nn.dit_image_encoder import DiTImageEncoder, skipping_init
from diffpolicy.nn.ema import EMA
from diffpolicy.nn.embeddings import SinusoidalTimeEmbedding, TimeEncoder
from diffpolicy.nn.errors import NNConfigError, NNInputError
from diffpolicy.nn.factory import BACKBONE_DEFAULTS, BACKBONES, make_backbone, make_observation_encoder
from diffpolicy.nn.image_encoder import ResNetImageEncoder
from diffpolicy.nn.mlp import MLPDenoiser
from diffpolicy.nn.observation_encoder import ObservationEncoder
from diffpolicy.nn.resnet import ResNetTrunk
from diffpolicy.nn.spatial_softmax import SpatialSoftmax
from diffpolicy.nn.state_encoder import MLPStateEncoder
from diffpolicy.nn.unet1d import ConditionalUnet1D

__all__ = [
    "BACKBONES", "BACKBONE_DEFAULTS", "ConditionalUnet1D", "DiT", "DiTImageEncoder", "EMA", "MLPDenoiser", "MLPStateEncoder",
    "NNConfigError", "NNInputError", "ObservationEncoder", "ResNetImageEncoder", "ResNetTrunk",
    "SinusoidalTimeEmbedding", "SpatialSoftmax", "TimeEncoder", "make_backbone", "make_observation_encoder", "skipping_init",
]
