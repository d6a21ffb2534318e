"""`DiT`: a transformer denoiser over L tokens with adaLN-Zero (Peebles & Xie, 2023).

The tokens are whatever the model generates: action chunks (the policies), image patches and
one-hot text tokens (`diffpolicy.generative`). Each token carries its own conditioning vector
`c_i = time_mlp(t_i) + cond_proj(cond)` (without the time term when `time_input=False`, e.g. for
masked diffusion, where the mask itself tells the level), which modulates (shift, scale, gate)
every block's LayerNorms and residual branches at that token.
The modulation layers and the output projection start at zero, so at initialization every block
is the identity and the output is exactly zero (the "Zero" in adaLN-Zero).

Position reaches the tokens one of two ways (`position`): a learned absolute embedding added to
the input ("learned", the policies' default), or rotary embeddings of the queries and keys in
every attention layer ("rotary", Su et al. 2021), so an attention score depends on the two
tokens and their offset. Text needs the latter: with a learned embedding the masked text model
stayed near a character-frequency model (docs/RESULTS.md, "Text"). Tokens laid out on a grid
(image patches, row-major) take axial rotary positions (`grid=(rows, cols)`): the first half of
each head's pairs turn with the token's row, the second half with its column, so a score depends
on the two-dimensional offset. "both" adds the learned embedding to rotary attention: images need
it, as a purely relative model cannot tell where in the frame a patch lies (docs/RESULTS.md, "Images").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from diffpolicy.nn.embeddings import TimeEncoder
from diffpolicy.nn.errors import NNConfigError
from diffpolicy.nn.validation import check_denoiser_inputs

POSITIONS = ("learned", "rotary", "both")
ROTARY = ("rotary", "both")  # the positions that turn queries and keys


def square_patch_grid(position: str, side: int) -> tuple[int, int] | None:
    """The DiT `grid` for a side x side layout of image patches: axial rotary positions over it
    when `position` turns queries and keys, None (positions along the sequence) otherwise."""
    return (side, side) if position in ROTARY else None


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation, all `(B, L, H)`."""
    return x * (1 + scale) + shift


def rotary_tables(length: int, head_dim: int, base: float = 10_000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotary angles `(length, head_dim / 2)`: position p, pair j turns by
    p * base^(-2j / head_dim)."""
    frequencies = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.arange(length, dtype=torch.float64)[:, None] * frequencies[None]
    return angles.cos().float(), angles.sin().float()


def axial_rotary_tables(rows: int, cols: int, head_dim: int, base: float = 10_000.0
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin `(rows * cols, head_dim / 2)` for tokens on a row-major grid: the first
    head_dim / 4 pairs turn as `rotary_tables` of the token's row (over head_dim / 2 features), the
    other head_dim / 4 as those of its column."""
    row_cos, row_sin = rotary_tables(rows, head_dim // 2, base)
    col_cos, col_sin = rotary_tables(cols, head_dim // 2, base)
    row, col = torch.arange(rows).repeat_interleave(cols), torch.arange(cols).repeat(rows)
    return torch.cat([row_cos[row], col_cos[col]], dim=-1), torch.cat([row_sin[row], col_sin[col]], dim=-1)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Turn each pair (x[..., 2j], x[..., 2j + 1]) of `x (B, heads, L, head_dim)` by its angle
    (`cos`, `sin` `(L, head_dim / 2)`)."""
    even, odd = x[..., 0::2], x[..., 1::2]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1).flatten(-2)


class SelfAttention(nn.Module):
    """Bidirectional multi-head self-attention: `(B, L, H) -> (B, L, H)`; `rotary`: the tables of
    `rotary_tables(L, H / heads)` turning queries and keys, or None."""

    def __init__(self, hidden_dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(hidden_dim, 3 * hidden_dim)
        self.proj = nn.Linear(hidden_dim, hidden_dim)

    def forward(self, x: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        batch, length, hidden = x.shape
        qkv = self.qkv(x).view(batch, length, 3, self.num_heads, hidden // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, L, head_dim)
        if rotary is not None:
            q, k = rotate(q, *rotary), rotate(k, *rotary)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(batch, length, hidden))


class DiTBlock(nn.Module):
    """`forward(x (B, L, H), c (B, L, H), rotary) -> (B, L, H)` with per-token adaLN-Zero modulation
    (`rotary`: `SelfAttention`'s)."""

    def __init__(self, hidden_dim: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_dim, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(hidden_dim, num_heads)
        self.norm2 = nn.LayerNorm(hidden_dim, elementwise_affine=False, eps=1e-6)
        mlp_hidden = int(hidden_dim * mlp_ratio)
        self.mlp = nn.Sequential(
            nn.Linear(hidden_dim, mlp_hidden), nn.GELU(approximate="tanh"), nn.Linear(mlp_hidden, hidden_dim)
        )
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_dim, 6 * hidden_dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor,
                rotary: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(c).chunk(6, dim=-1)
        x = x + gate1 * self.attn(modulate(self.norm1(x), shift1, scale1), rotary)
        return x + gate2 * self.mlp(modulate(self.norm2(x), shift2, scale2))


class DiT(nn.Module):
    """Transformer denoiser: `forward(x_t (B, L, D), t (B, L), cond (B, C)) -> (B, L, D)`.

    Args:
        action_dim: D. horizon: L (the learned positional embedding has L entries).
        position: "learned" (an absolute embedding added to the input), "rotary" (rotary
            queries and keys in every block; no position parameters; H / num_heads even) or
            "both" (the two together: absolute and relative position).
        grid: (rows, cols) with rows * cols = L: rotary positions are axial over this row-major
            grid (`axial_rotary_tables`; H / num_heads a multiple of 4); None: along the sequence.
        cond_dim: C, global condition size; 0 for unconditional.
        hidden_dim: token width H, divisible by num_heads. depth: number of blocks.
        mlp_ratio: MLP width / H. time_embed_dim: sinusoidal features per token before the MLP.
        time_scale: multiplier of t in [0, 1] inside the sinusoidal embedding.
        time_input: False drops the time embedding (no `time_encoder` parameters); t is still
            validated but does not reach the network.
    """

    def __init__(
        self,
        action_dim: int,
        horizon: int,
        cond_dim: int,
        hidden_dim: int = 256,
        depth: int = 6,
        num_heads: int = 8,
        mlp_ratio: float = 4.0,
        time_embed_dim: int = 256,
        time_scale: float = 1000.0,
        time_input: bool = True,
        position: str = "learned",
        grid: tuple[int, int] | list[int] | None = None,
    ):
        super().__init__()
        if hidden_dim < 1 or num_heads < 1 or hidden_dim % num_heads:
            raise NNConfigError(
                f"DiT: hidden_dim must be a positive multiple of num_heads, got hidden_dim={hidden_dim}, "
                f"num_heads={num_heads}"
            )
        if depth < 1 or mlp_ratio <= 0 or action_dim < 1 or horizon < 1 or cond_dim < 0:
            raise NNConfigError(
                f"DiT: need depth >= 1, mlp_ratio > 0, action_dim >= 1, horizon >= 1, cond_dim >= 0, got "
                f"{depth}, {mlp_ratio}, {action_dim}, {horizon}, {cond_dim}"
            )
        if position not in POSITIONS or (position in ROTARY and (hidden_dim // num_heads) % 2):
            raise NNConfigError(f"DiT: position must be 'learned', 'rotary' or 'both' (rotary needs an even head width "
                                f"hidden_dim / num_heads, here {hidden_dim // num_heads}), got {position!r}")
        head_dim = hidden_dim // num_heads
        if grid is not None:
            if position not in ROTARY or not (isinstance(grid, (tuple, list)) and len(grid) == 2 and all(
                    isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in grid)) \
                    or grid[0] * grid[1] != horizon or head_dim % 4:
                raise NNConfigError(f"DiT: grid must be (rows, cols) with rows * cols = horizon = {horizon}, given "
                                    f"with rotary positions and a head width hidden_dim / num_heads divisible by "
                                    f"4 (here {head_dim}, position {position!r}), got {grid!r}")
        self.action_dim, self.horizon, self.cond_dim, self.position = action_dim, horizon, cond_dim, position
        self.input_proj = nn.Linear(action_dim, hidden_dim)
        self.pos_embedding = nn.Parameter(torch.zeros(1, horizon, hidden_dim)) if position != "rotary" else None
        if position in ROTARY:
            cos, sin = rotary_tables(horizon, head_dim) if grid is None else axial_rotary_tables(*grid, head_dim)
            self.register_buffer("rotary_cos", cos, persistent=False)
            self.register_buffer("rotary_sin", sin, persistent=False)
        if not isinstance(time_input, bool):
            raise NNConfigError(f"DiT: time_input must be a bool, got {time_input!r}")
        self.hidden_dim = hidden_dim
        self.time_encoder = (TimeEncoder(time_embed_dim, hidden_dim, hidden_dim, nn.SiLU, time_scale)
                             if time_input else None)
        self.cond_proj = nn.Linear(cond_dim, hidden_dim) if cond_dim else None
        self.blocks = nn.ModuleList(DiTBlock(hidden_dim, num_heads, mlp_ratio) for _ in range(depth))
        self.final_norm = nn.LayerNorm(hidden_dim, elementwise_affine=False, eps=1e-6)
        self.final_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_dim, 2 * hidden_dim))
        self.output_proj = nn.Linear(hidden_dim, action_dim)
        self._initialize()

    def _initialize(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        if self.pos_embedding is not None:
            nn.init.normal_(self.pos_embedding, std=0.02)
        for linear in self.time_encoder.mlp if self.time_encoder is not None else ():
            if isinstance(linear, nn.Linear):
                nn.init.normal_(linear.weight, std=0.02)
        zero_init = [block.modulation[-1] for block in self.blocks] + [self.final_modulation[-1], self.output_proj]
        for linear in zero_init:
            nn.init.zeros_(linear.weight)
            nn.init.zeros_(linear.bias)

    def features(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """The last block's token features and the conditioning: `(B, L, H)` each (inputs as `forward`)."""
        cond = check_denoiser_inputs("DiT", x_t, t, cond, self.action_dim, self.horizon, self.cond_dim)
        if self.time_encoder is not None:
            c = self.time_encoder(t)  # (B, L, H)
        else:
            c = x_t.new_zeros(*x_t.shape[:2], self.hidden_dim)
        if self.cond_proj is not None:
            c = c + self.cond_proj(cond).unsqueeze(1)
        x = self.input_proj(x_t)
        if self.pos_embedding is not None:
            x = x + self.pos_embedding
        rotary = (self.rotary_cos, self.rotary_sin) if self.position in ROTARY else None
        for block in self.blocks:
            x = block(x, c, rotary)
        return x, c

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        x, c = self.features(x_t, t, cond)
        shift, scale = self.final_modulation(c).chunk(2, dim=-1)
        return self.output_proj(modulate(self.final_norm(x), shift, scale))
