"""`MLPDenoiser`: DPPO's residual MLP over the flattened action chunk, with per-token time.

Input vector per sample: `[flatten(x_t) (L*D), flatten(time_mlp(t)) (L*E), cond (C)]`; each token's
time embedding occupies its own slot, so the network knows every token's noise level. Layout as in
DPPO's `ResidualMLP`: a Linear to the hidden width, pre-activation residual blocks
(`x + Linear(act(norm(Linear(act(norm(x))))))`, LayerNorm optional), a Linear to `L*D`.
"""

from __future__ import annotations

import torch
from torch import nn

from diffpolicy.nn.embeddings import TimeEncoder
from diffpolicy.nn.errors import NNConfigError
from diffpolicy.nn.validation import check_denoiser_inputs

# Activations by config name. Mish is DPPO's (and the default, so older checkpoints load as they
# were); SiLU is close in shape and cheaper on a CPU: a PushT training step of the 512 x 3 network
# takes 48 ms with SiLU vs 62 ms with Mish on one core (`python benchmarks/train_speed.py`).
ACTIVATIONS: dict[str, type[nn.Module]] = {"mish": nn.Mish, "silu": nn.SiLU}


class ResidualMLPBlock(nn.Module):
    """Two-layer pre-activation residual block: `(B, H) -> (B, H)`."""

    def __init__(self, hidden_dim: int, use_layernorm: bool, activation: type[nn.Module] = nn.Mish):
        super().__init__()
        def norm() -> nn.Module:
            return nn.LayerNorm(hidden_dim) if use_layernorm else nn.Identity()
        self.layers = nn.Sequential(
            norm(), activation(), nn.Linear(hidden_dim, hidden_dim),
            norm(), activation(), nn.Linear(hidden_dim, hidden_dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.layers(x)


class MLPDenoiser(nn.Module):
    """Residual MLP denoiser: `forward(x_t (B, L, D), t (B, L), cond (B, C)) -> (B, L, D)`.

    Args:
        action_dim: D. horizon: L. cond_dim: C (0 for unconditional).
        hidden_dim: width of the residual stream (DPPO gym: 512).
        num_blocks: residual blocks of two layers each (DPPO's `mlp_dims=[512]*3`: 1 block).
        time_embed_dim: E, time features per token (DPPO: 16); the time MLP has 2E hidden units.
        use_layernorm: LayerNorm before each activation inside the blocks.
        time_scale: multiplier of t in [0, 1] inside the sinusoidal embedding.
        activation: "mish" (DPPO's) or "silu", in the blocks and the time MLP.
    """

    def __init__(
        self,
        action_dim: int,
        horizon: int,
        cond_dim: int,
        hidden_dim: int = 512,
        num_blocks: int = 1,
        time_embed_dim: int = 16,
        use_layernorm: bool = False,
        time_scale: float = 1000.0,
        activation: str = "mish",
    ):
        super().__init__()
        if hidden_dim < 1 or num_blocks < 1 or action_dim < 1 or horizon < 1 or cond_dim < 0:
            raise NNConfigError(
                f"MLPDenoiser: need hidden_dim >= 1, num_blocks >= 1, action_dim >= 1, horizon >= 1, "
                f"cond_dim >= 0, got {hidden_dim}, {num_blocks}, {action_dim}, {horizon}, {cond_dim}"
            )
        if activation not in ACTIVATIONS:
            raise NNConfigError(f"MLPDenoiser: activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        act = ACTIVATIONS[activation]
        self.action_dim, self.horizon, self.cond_dim = action_dim, horizon, cond_dim
        self.time_encoder = TimeEncoder(time_embed_dim, 2 * time_embed_dim, time_embed_dim, act, time_scale)
        in_dim = horizon * (action_dim + time_embed_dim) + cond_dim
        self.net = nn.Sequential(
            nn.Linear(in_dim, hidden_dim),
            *(ResidualMLPBlock(hidden_dim, use_layernorm, act) for _ in range(num_blocks)),
            nn.Linear(hidden_dim, horizon * action_dim),
        )

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        cond = check_denoiser_inputs("MLPDenoiser", x_t, t, cond, self.action_dim, self.horizon, self.cond_dim)
        batch = x_t.shape[0]
        features = torch.cat([x_t.reshape(batch, -1), self._time_features(t).reshape(batch, -1), cond], dim=-1)
        return self.net(features).view(batch, self.horizon, self.action_dim)

    def _time_features(self, t: torch.Tensor) -> torch.Tensor:
        """`time_encoder(t)`: t `(B, L)` -> `(B, L, E)`. On a CPU, when every token of each chunk shares
        its level (training with shared token times, plain sampling), the embedding is computed once
        per chunk and repeated (about 0.4 ms of the main job's 20 ms training step, docs/RESULTS.md).
        The check reads t, a device sync, so on other devices (CUDA graphs) every token is embedded."""
        if t.device.type == "cpu" and t.shape[1] > 1 and bool((t == t[:, :1]).all()):
            return self.time_encoder(t[:, :1]).expand(-1, t.shape[1], -1)
        return self.time_encoder(t)
