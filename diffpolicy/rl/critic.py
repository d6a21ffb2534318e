"""The critic V(s) of the on-policy algorithms: an MLP on the policy's normalized low-dim
observations (the whole To history, flattened)."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from diffpolicy.policies.chunk_policy import ChunkPolicy
from diffpolicy.rl.errors import FinetuneError


class Critic(nn.Module):
    """V(obs {key: (B, To, d)}) -> `(B,)`, with the policy's normalizer (a frozen copy of its stats)."""

    def __init__(self, policy: ChunkPolicy, hidden_dim: int = 256, layers: int = 3) -> None:
        super().__init__()
        config = policy.config
        if config.image_keys:
            raise FinetuneError(f"the critic takes low-dim observations only; this policy has image keys "
                                f"{list(config.image_keys)}")
        self.keys = config.low_dim_keys
        self.normalize = policy.normalizer.normalize
        width = config.obs_horizon * sum(config.obs_shapes[k][0] for k in self.keys)
        modules: list[nn.Module] = []
        for _ in range(layers):
            modules += [nn.Linear(width, hidden_dim), nn.Mish()]
            width = hidden_dim
        modules.append(nn.Linear(width, 1))
        self.net = nn.Sequential(*modules)

    def forward(self, obs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        with torch.no_grad():
            x = torch.cat([self.normalize(k, obs[k]).flatten(1) for k in self.keys], dim=1)
        return self.net(x).squeeze(-1)
