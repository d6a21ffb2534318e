"""Per-token noise levels for training (`loss.token_times`), so training matches the controller.

Three kinds, drawn per example with the mix's probabilities (`config.token_time_mix`):

- "shared": one level u for the whole chunk (Diffusion Policy's training; `sync`, `ensemble`, `rtc`).
- "prefix": the first P tokens clean (t = 0), the rest at one level u; P uniform in 0..Tp // 2
  (training-time real-time chunking: the controller's `prefix` mode pins the committed actions).
- "ladder": the first P tokens clean, then groups of `group` tokens at rising levels
  (g + u) / G, g = 0..G-1, G = ceil((Tp - P) / group): the levels the `streaming` controller's
  buffer holds while one inference moves every group down by 1 / G.

Levels lie on the discrete training grid k / N when the process has one (`grid`); clean tokens are
reported in a mask so that the loss leaves them out (the network's output there is not trained).
"""

from __future__ import annotations

import math

import torch


def on_grid(u: torch.Tensor, grid: int | None) -> torch.Tensor:
    """Map u in [0, 1) to a level: u itself, or k / N with k uniform in 1..N on a grid of N steps."""
    if grid is None:
        return u
    return (torch.floor(u * grid).clamp(max=grid - 1) + 1) / grid


def draw_token_times(weights: dict[str, float], batch: int, horizon: int, group: int, grid: int | None,
                     uniform) -> tuple[torch.Tensor, torch.Tensor]:
    """Levels `t (B, L)` and the mask of clean tokens `(B, L)` bool, for a mix that is not pure "shared".

    Args:
        weights: `{kind: probability}`.
        horizon: L = Tp; group: the ladder's group size (Ta).
        grid: the process's training grid N (None: continuous levels).
        uniform: `uniform(shape) -> U[0, 1)` tensor (the policy's generator, device and dtype);
            draws, in order: the kind `(B,)`, the level u `(B,)`, the prefix length `(B,)`.
    """
    kinds = list(weights)
    edges = torch.tensor([0.0] + [weights[k] for k in kinds]).cumsum(0)[1:-1]
    choice = torch.bucketize(uniform((batch,)).cpu(), edges, right=True)
    u = uniform((batch,))
    prefix = torch.floor(uniform((batch,)) * (horizon // 2 + 1)).clamp(max=horizon // 2)
    index = torch.arange(horizon, dtype=u.dtype, device=u.device).unsqueeze(0)
    prefix = prefix.unsqueeze(1)
    clean = index < prefix
    level = on_grid(u, grid).unsqueeze(1).expand(batch, horizon)
    groups = torch.ceil((horizon - prefix) / group).clamp(min=1)
    rung = torch.floor((index - prefix).clamp(min=0) / group)
    # (g + u) / G, with u on the grid of one rung: levels stay in (g / G, (g + 1) / G].
    ladder = (rung + on_grid(u, grid).unsqueeze(1)) / groups
    if grid is not None:
        ladder = (torch.ceil(ladder * grid - 1e-6).clamp(min=1)) / grid
    t = torch.zeros(batch, horizon, dtype=u.dtype, device=u.device)
    mask = torch.zeros(batch, horizon, dtype=torch.bool, device=u.device)
    for position, kind in enumerate(kinds):
        rows = (choice == position).to(u.device).unsqueeze(1)
        if kind == "shared":
            t = torch.where(rows, level, t)
        elif kind == "prefix":
            t = torch.where(rows, torch.where(clean, 0.0, level), t)
            mask = mask | (rows & clean)
        else:
            t = torch.where(rows, torch.where(clean, 0.0, ladder), t)
            mask = mask | (rows & clean)
    return t, mask


def ladder_levels(horizon: int, clean: int, group: int) -> tuple[torch.Tensor, int]:
    """The streaming buffer's levels before an inference: `(L,)` and the number of rungs G.

    Tokens [0, clean) are at 0; the rest, in groups of `group`, at (g + 1) / G. One inference
    moves every token down by 1 / G, so group 0 reaches t = 0.
    """
    rungs = max(1, math.ceil((horizon - clean) / group))
    index = torch.arange(horizon, dtype=torch.float64)
    rung = torch.floor((index - clean).clamp(min=0) / group)
    levels = torch.where(index < clean, torch.zeros_like(index), (rung + 1) / rungs)
    return levels, rungs
