"""Data-parallel on-policy fine-tuning: what the ranks of a `torchrun` job exchange.

`torchrun --nproc_per_node W -m diffpolicy.cli finetune --algo dppo|flowppo ...` joins the same
process group as imitation (`train.distributed.setup_distributed`; gloo on the CPU). Every rank
steps its own `n_envs` environments from its own seeds and samples with its own generator; the
ranks agree on everything else:
- gradients are averaged over ranks before clipping and the optimizer step (the actor and critic
  start from the same seed, so their parameters and optimizer states stay identical);
- advantages are normalized with the mean and std of all ranks' entries (as one process holding
  the concatenated batch would);
- the budget counts every rank's environment steps; episode statistics and CPU time are summed
  over ranks for the curves, which rank 0 alone writes, with the checkpoints;
- an evaluation's batches of seeds are shared out over the ranks and its episodes gathered, which
  gives one process's result exactly;
- a checkpoint keeps every rank's generator states, so a resumed job repeats the uninterrupted one.
With one process (no `torchrun`) each function is the single-process computation, bit for bit.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist

from diffpolicy.train.distributed import DistContext

SINGLE = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def rank_seed(seed: int, ctx: DistContext) -> int:
    """The sampling generator's seed of this rank (rank 0: `seed`, so one process is unchanged)."""
    return seed + 7_919 * ctx.rank


def average_gradients(parameters: Iterable[torch.nn.Parameter], ctx: DistContext) -> None:
    """Replace each parameter's gradient by its mean over ranks (one all-reduce of the flattened
    gradients). Parameters without a gradient must be the same on every rank (e.g. a frozen
    actor during the critic's warm-up) and are skipped."""
    if not ctx.enabled:
        return
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= ctx.world_size
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def normalize_advantages(advantages: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """(A - mean) / (std + 1e-8) over every rank's entries (the unbiased std of the concatenation)."""
    if not ctx.enabled:
        return (advantages - advantages.mean()) / (advantages.std() + 1e-8)
    moments = torch.stack([torch.tensor(float(advantages.numel()), dtype=torch.float64),
                           advantages.double().sum(), advantages.double().pow(2).sum()])
    dist.all_reduce(moments, op=dist.ReduceOp.SUM)
    count, total, squares = moments.tolist()
    mean = total / count
    std = max((squares - count * mean * mean) / (count - 1), 0.0) ** 0.5
    return (advantages - mean) / (std + 1e-8)


def sum_over_ranks(value: float, ctx: DistContext) -> float:
    """The sum of a number over ranks (float64)."""
    if not ctx.enabled:
        return value
    total = torch.tensor(float(value), dtype=torch.float64)
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return float(total)


def gather_rows(rows: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Every rank's rows `(n_r, k)`, concatenated in rank order `(sum n_r, k)` (tensors only: no
    pickling between ranks)."""
    if not ctx.enabled:
        return rows
    counts = [torch.zeros(1, dtype=torch.int64) for _ in range(ctx.world_size)]
    dist.all_gather(counts, torch.tensor([rows.shape[0]]))
    longest = max(int(c) for c in counts)
    padded = torch.zeros(longest, *rows.shape[1:], dtype=rows.dtype)
    padded[:rows.shape[0]] = rows
    parts = [torch.empty_like(padded) for _ in range(ctx.world_size)]
    dist.all_gather(parts, padded)
    return torch.cat([part[:int(c)] for part, c in zip(parts, counts)])
