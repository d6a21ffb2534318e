"""`MLPStateEncoder`: low-dimensional observation keys -> feature vectors.

By default the identity (Diffusion Policy: the conditioning is the flattened normalized
observation history); with `hidden_dims` an MLP (Mish between layers) shared over time steps.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from diffpolicy.errors import InvalidTypeError
from diffpolicy.nn.errors import NNConfigError, NNInputError


class MLPStateEncoder(nn.Module):
    """Encode low-dim keys `{key: (B, To, d_key)}` into `(B, To * step_dim)`.

    Keys are concatenated in sorted order per time step into `(B, To, sum d_key)`; the optional MLP
    maps each step to `hidden_dims[-1]` features. Keys of `obs` not in `key_dims` are ignored.

    Args:
        key_dims: size d_key of each low-dim key.
        obs_horizon: To, the number of observation steps.
        hidden_dims: MLP layer sizes; empty for the identity.
    """

    def __init__(self, key_dims: Mapping[str, int], obs_horizon: int, hidden_dims: Sequence[int] = ()):
        super().__init__()
        if not key_dims or any(int(d) < 1 for d in key_dims.values()):
            raise NNConfigError(
                f"MLPStateEncoder: key_dims must map at least one key to a size >= 1, got {dict(key_dims)}"
            )
        if obs_horizon < 1 or any(int(h) < 1 for h in hidden_dims):
            raise NNConfigError(
                f"MLPStateEncoder: need obs_horizon >= 1 and positive hidden_dims, "
                f"got {obs_horizon}, {list(hidden_dims)}"
            )
        self.keys = sorted(key_dims)
        self.key_dims = {key: int(key_dims[key]) for key in self.keys}
        self.obs_horizon = obs_horizon
        dims = [sum(self.key_dims.values()), *(int(h) for h in hidden_dims)]
        layers: list[nn.Module] = []
        for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
            if i:
                layers.append(nn.Mish())
            layers.append(nn.Linear(d_in, d_out))
        self.mlp = nn.Sequential(*layers)
        self.step_dim = dims[-1]
        self.output_dim = obs_horizon * self.step_dim

    def encode_steps(self, obs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """`{key: (B, To, d_key)} -> (B, To, step_dim)`."""
        parts = []
        for key in self.keys:
            if key not in obs:
                raise NNInputError(f"MLPStateEncoder: observation key {key!r} is missing; got keys {sorted(obs)}")
            value = obs[key]
            expected = (self.obs_horizon, self.key_dims[key])
            batch_mismatch = bool(parts) and value.shape[0] != parts[0].shape[0]
            if value.dim() != 3 or tuple(value.shape[1:]) != expected or batch_mismatch:
                batch = parts[0].shape[0] if parts else "B"
                raise NNInputError(
                    f"MLPStateEncoder: observation {key!r} must have shape ({batch}, To={expected[0]}, "
                    f"d={expected[1]}), got {tuple(value.shape)}"
                )
            if not value.is_floating_point():
                raise InvalidTypeError(f"MLPStateEncoder: observation {key!r} must be floating point, got {value.dtype}")
            parts.append(value)
        return self.mlp(torch.cat(parts, dim=-1))

    def forward(self, obs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        steps = self.encode_steps(obs)
        return steps.reshape(steps.shape[0], self.output_dim)
