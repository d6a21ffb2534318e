"""Chunk policies: observation encoder + denoiser + generative process + normalizer, with a
config and a safetensors checkpoint format (see docs/ARCHITECTURE.md, "policies/").
"""

from diffpolicy.policies.checkpoint import FORMAT_VERSION, read_checkpoint, write_checkpoint
from diffpolicy.policies.chunk_policy import ChunkPolicy, make_process
from diffpolicy.policies.config import LossConfig, PolicyConfig, ProcessConfig, diffusion_process, flow_process
from diffpolicy.policies.errors import (
    CheckpointError,
    CheckpointNotFoundError,
    ConfigError,
    NormalizerError,
    ObservationDtypeError,
    ObservationError,
    PickleRefusedError,
)
from diffpolicy.policies.normalizer import Normalizer

__all__ = [
    "FORMAT_VERSION", "CheckpointError", "CheckpointNotFoundError", "ChunkPolicy", "ConfigError", "LossConfig",
    "Normalizer", "NormalizerError", "ObservationDtypeError", "ObservationError", "PickleRefusedError",
    "PolicyConfig", "ProcessConfig", "diffusion_process", "flow_process", "make_process", "read_checkpoint",
    "write_checkpoint",
]
