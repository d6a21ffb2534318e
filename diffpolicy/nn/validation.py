"""Input checks shared by the backbones: `(x_t (B, L, D), t (B, L), cond (B, C))`."""

from __future__ import annotations

import torch

from diffpolicy.errors import InvalidTypeError
from diffpolicy.nn.errors import NNInputError


def check_denoiser_inputs(
    where: str,
    x_t: torch.Tensor,
    t: torch.Tensor,
    cond: torch.Tensor | None,
    action_dim: int,
    horizon: int,
    cond_dim: int,
) -> torch.Tensor:
    """Validate a backbone call and return `cond` as a `(B, cond_dim)` tensor.

    `cond` may be None only when `cond_dim == 0` (an unconditional backbone). Shapes are checked
    against the backbone's construction (`where` names it in the message); `t` must be floating
    point (continuous time in [0, 1], not integer DDPM step indices).
    """
    if x_t.dim() != 3 or x_t.shape[1] != horizon or x_t.shape[2] != action_dim:
        raise NNInputError(
            f"{where}: x_t must have shape (B, L={horizon}, D={action_dim}), got {tuple(x_t.shape)}"
        )
    batch = x_t.shape[0]
    if t.shape != (batch, horizon):
        raise NNInputError(
            f"{where}: t must have shape (B={batch}, L={horizon}) (one noise level per token), "
            f"got {tuple(t.shape)}"
        )
    if not t.is_floating_point():
        raise InvalidTypeError(
            f"{where}: t must be a floating point tensor of continuous times in [0, 1], got dtype {t.dtype}"
        )
    if cond is None:
        if cond_dim != 0:
            raise NNInputError(f"{where}: cond of shape (B={batch}, C={cond_dim}) is required, got None")
        return x_t.new_zeros(batch, 0)
    if cond.shape != (batch, cond_dim):
        raise NNInputError(f"{where}: cond must have shape (B={batch}, C={cond_dim}), got {tuple(cond.shape)}")
    return cond
